"""Simulation loop: N patients, a CGM sensor, a pump and a bolus calculator, minute by minute.

The loop reproduces simglucose's `T1DSimEnv` + `SimObj` semantics: the controller acts once per
sensor interval, its action is held for that interval, meals are eaten at 5 g/min, the sensor reads
at multiples of its interval with zero-order hold in between, and the controller sees the mean of
those held readings over the last interval.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np

from models.uva_padova.ode import SUBSTEPS, advance_minutes, pack_parameters
from models.uva_padova.params import PatientParams
from models.uva_padova.pump import PumpSpec, get_pump
from models.uva_padova.sensor import CGMSensorSpec

RESET_READINGS = 2  # simglucose's env reads the sensor twice at t=0 before the first step


@dataclass(frozen=True)
class DosingPlan:
    """What the patient's pump is told per control step; boluses are computed when delivered.

    A bolus at step k is `scale * (carbs / CR + correction)`, the correction being
    `(CGM - target) / CF` when the CGM the controller sees is above `correction_above_mg_dl`.
    """

    basal_u_per_min: np.ndarray  # (N, K) commanded basal rate
    bolus_carbs_g: np.ndarray  # (N, K) carbs entered into the bolus calculator (0: no bolus)
    bolus_scale: np.ndarray  # (N, K) multiplier on the calculated bolus
    cr_g_per_u: np.ndarray  # (N,)
    cf_mg_dl_per_u: np.ndarray  # (N,)
    target_mg_dl: np.ndarray  # (N,)
    correction_above_mg_dl: float = 150.0
    # Hypo treatment: fast carbs eaten when the CGM the patient sees drops below the threshold,
    # at most once per `hypo_recheck_min` (the "15-15 rule"). None disables it, as simglucose has none.
    hypo_treat_below_mg_dl: float | None = None
    hypo_treat_carbs_g: np.ndarray | None = None  # (N,)
    hypo_recheck_min: int = 15

    @property
    def steps(self) -> int:
        """Number of control steps the plan covers."""
        return int(self.basal_u_per_min.shape[1])


@dataclass(frozen=True)
class SimState:
    """Everything needed to continue a simulation exactly from a control-step boundary."""

    step: int  # control steps since the run's start; indexes the sensor noise sequence
    x: np.ndarray  # (13, N) model state
    planned_meal_g: np.ndarray  # announced carbs not yet eaten
    last_cho_g: np.ndarray  # carbs eaten in the previous minute
    eating: np.ndarray  # bool
    last_qsto_mg: np.ndarray  # stomach content when the current meal started
    last_food_g: np.ndarray  # carbs eaten since the current meal started
    last_cgm: np.ndarray  # sensor reading held since the last sample
    cgm_obs: np.ndarray  # mean held reading over the last interval: what the controller sees
    since_hypo_treat_min: np.ndarray  # minutes since the patient last ate hypo-treatment carbs

    def take(self, index: np.ndarray | list[int]) -> SimState:
        """Return the state of the patients at `index`."""
        idx = np.asarray(index, dtype=int)
        picked = {f.name: getattr(self, f.name)[..., idx].copy() for f in fields(self) if f.name != "step"}
        return SimState(step=self.step, **picked)


@dataclass(frozen=True)
class SimResult:
    """Trajectories of one run. Time 0 is the run's start; K = minutes / sample_time."""

    sample_time: int
    bg: np.ndarray  # (N, minutes + 1) true plasma glucose each minute, mg/dL
    cgm: np.ndarray  # (N, K + 1) sensor reading at each sample time, mg/dL
    cgm_obs: np.ndarray  # (N, K + 1) what the controller saw (mean of held readings)
    cho_eaten_g: np.ndarray  # (N, minutes) carbs ingested in each minute
    basal_u_per_min: np.ndarray  # (N, K) delivered basal rate per control step
    bolus_u: np.ndarray  # (N, K) delivered bolus units per control step
    hypo_treat_g: np.ndarray  # (N, K) hypo-treatment carbs announced at the start of each step
    final_state: SimState
    step_states: SimState | None = None  # states at every step boundary, arrays (K + 1, ..., N)

    @property
    def minutes(self) -> int:
        """Simulated minutes."""
        return int(self.cho_eaten_g.shape[1])

    def bg_step_mean(self) -> np.ndarray:
        """Mean glucose over each control step (simglucose's BG history after t=0), (N, K)."""
        n, _ = self.bg.shape
        return self.bg[:, 1:].reshape(n, -1, self.sample_time).mean(axis=2)

    def insulin_u_per_min(self) -> np.ndarray:
        """Delivered insulin rate each minute, basal plus bolus, (N, minutes)."""
        rate = self.basal_u_per_min + self.bolus_u / self.sample_time
        return np.repeat(rate, self.sample_time, axis=1)

    def state_at(self, step: int) -> SimState:
        """Return the full state at the boundary before control step `step` (needs record_states)."""
        if self.step_states is None:
            raise ValueError("state_at needs a run made with record_states=True")
        local = step - (self.final_state.step - self.basal_u_per_min.shape[1])
        return replace(
            self.step_states,
            step=step,
            **{f.name: getattr(self.step_states, f.name)[local].copy() for f in fields(SimState) if f.name != "step"},
        )


def initial_state(params: PatientParams, sensor: CGMSensorSpec, noise: np.ndarray) -> SimState:
    """The state simglucose's env starts from: steady state, sensor read twice at t=0."""
    x = params.x0.T.copy()
    n = len(params)
    bg0 = x[12] / params.values["Vg"]
    reading = sensor.measure(bg0, noise[:, RESET_READINGS - 1])
    zeros = np.zeros(n)
    return SimState(
        step=0,
        x=x,
        planned_meal_g=zeros.copy(),
        last_cho_g=zeros.copy(),
        eating=np.zeros(n, dtype=bool),
        last_qsto_mg=x[0] + x[1],
        last_food_g=zeros.copy(),
        last_cgm=reading,
        cgm_obs=reading.copy(),
        since_hypo_treat_min=np.full(n, np.inf),
    )


def first_cgm_reading(params: PatientParams, sensor: CGMSensorSpec, noise: np.ndarray) -> np.ndarray:
    """The reading simglucose stores as the first CGM history entry (first noise sample)."""
    return sensor.measure(params.x0[:, 12] / params.values["Vg"], noise[:, 0])


def simulate(
    params: PatientParams,
    *,
    meals_g: np.ndarray,
    dosing: DosingPlan,
    sensor: CGMSensorSpec,
    sensor_seeds: np.ndarray,
    pump: PumpSpec | None = None,
    start: SimState | None = None,
    record_states: bool = False,
) -> SimResult:
    """Run N patients for `dosing.steps` control steps of `sensor.sample_time` minutes.

    `meals_g` (N, minutes) holds the carbs announced at each minute; a patient eats them at
    5 g/min as simglucose does. `start` continues from a saved state (see `replay`).
    """
    pump = pump or get_pump()
    n, steps, st = len(params), dosing.steps, sensor.sample_time
    minutes = steps * st
    if meals_g.shape != (n, minutes):
        raise ValueError(f"meals_g has shape {meals_g.shape}; expected {(n, minutes)} for {steps} steps of {st} min")
    step0 = 0 if start is None else start.step
    noise = sensor.noise(sensor_seeds, step0 + steps + RESET_READINGS)
    state = initial_state(params, sensor, noise) if start is None else start
    packed = pack_parameters(params)
    vg = params.values["Vg"]

    x = np.ascontiguousarray(state.x, dtype=np.float64).copy()
    # Eating bookkeeping rows, as advance_minutes reads them.
    eat = np.stack(
        [state.planned_meal_g, state.last_cho_g, state.eating.astype(float), state.last_qsto_mg, state.last_food_g]
    ).astype(np.float64)
    last_cgm, cgm_obs = state.last_cgm.copy(), state.cgm_obs.copy()
    since_treat = state.since_hypo_treat_min.copy()
    meals_g = np.ascontiguousarray(meals_g, dtype=np.float64)

    bg = np.empty((n, minutes + 1))
    bg[:, 0] = x[12] / vg
    cgm = np.empty((n, steps + 1))
    cgm_seen = np.empty((n, steps + 1))
    cgm[:, 0] = last_cgm if start is not None else first_cgm_reading(params, sensor, noise)
    cgm_seen[:, 0] = cgm_obs
    eaten = np.zeros((n, minutes))
    basal_out = np.empty((n, steps))
    bolus_out = np.empty((n, steps))
    treat_out = np.zeros((n, steps))
    recorded: list[SimState] = []

    def snapshot(step: int) -> SimState:
        return SimState(
            step, x.copy(), eat[0].copy(), eat[1].copy(), eat[2] > 0, eat[3].copy(), eat[4].copy(),
            last_cgm.copy(), cgm_obs.copy(), since_treat.copy(),
        )  # fmt: skip

    for k in range(steps):
        if record_states:
            recorded.append(snapshot(step0 + k))
        treat = _hypo_treatment_g(dosing, cgm_obs, since_treat)
        treat_out[:, k] = treat
        since_treat = np.where(treat > 0, 0.0, since_treat) + st
        bolus_rate = _bolus_u(dosing, k, cgm_obs) / st
        basal = pump.deliver_basal(dosing.basal_u_per_min[:, k])
        bolus = pump.deliver_bolus(bolus_rate)
        basal_out[:, k] = basal
        bolus_out[:, k] = bolus * st
        window = slice(k * st, (k + 1) * st)
        x = advance_minutes(
            x, packed, eat, meals_g[:, window], treat, basal + bolus, SUBSTEPS,
            bg[:, k * st + 1 : (k + 1) * st + 1], eaten[:, window], vg,
        )  # fmt: skip
        # The sensor holds its last reading until the interval ends; the controller sees the mean.
        held_sum = np.zeros(n)
        for _ in range(st - 1):
            held_sum += last_cgm / st
        last_cgm = sensor.measure(bg[:, (k + 1) * st], noise[:, step0 + k + RESET_READINGS])
        cgm_obs = held_sum + last_cgm / st
        cgm[:, k + 1] = last_cgm
        cgm_seen[:, k + 1] = cgm_obs

    final = snapshot(step0 + steps)
    step_states = None
    if record_states:
        recorded.append(final)
        step_states = SimState(
            step=step0,
            **{f.name: np.stack([getattr(s, f.name) for s in recorded]) for f in fields(SimState) if f.name != "step"},
        )
    return SimResult(
        sample_time=st,
        bg=bg,
        cgm=cgm,
        cgm_obs=cgm_seen,
        cho_eaten_g=eaten,
        basal_u_per_min=basal_out,
        bolus_u=bolus_out,
        hypo_treat_g=treat_out,
        final_state=final,
        step_states=step_states,
    )


def _bolus_u(dosing: DosingPlan, k: int, cgm_seen: np.ndarray) -> np.ndarray:
    """Units the bolus calculator asks for at step k (simglucose's BBController formula)."""
    carbs = dosing.bolus_carbs_g[:, k]
    correction = (cgm_seen > dosing.correction_above_mg_dl) * (cgm_seen - dosing.target_mg_dl) / dosing.cf_mg_dl_per_u
    units = dosing.bolus_scale[:, k] * (carbs / dosing.cr_g_per_u + correction)
    return np.where(carbs > 0, units, 0.0)


def _hypo_treatment_g(dosing: DosingPlan, cgm_seen: np.ndarray, since_treat: np.ndarray) -> np.ndarray:
    """Carbs each patient eats now to treat a low, or 0."""
    if dosing.hypo_treat_below_mg_dl is None or dosing.hypo_treat_carbs_g is None:
        return np.zeros_like(cgm_seen)
    due = (cgm_seen < dosing.hypo_treat_below_mg_dl) & (since_treat >= dosing.hypo_recheck_min)
    return np.where(due, dosing.hypo_treat_carbs_g, 0.0)


def replay(
    params: PatientParams,
    state: SimState,
    *,
    meals_g: np.ndarray,
    dosing: DosingPlan,
    sensor: CGMSensorSpec,
    sensor_seeds: np.ndarray,
    pump: PumpSpec | None = None,
) -> SimResult:
    """Continue the patients in `state` under new meals and dosing (a what-if from that moment).

    The sensor noise is exogenous, so the replay sees the same noise the original run would have:
    the counterfactual differs from the factual run only by what was changed.
    """
    return simulate(
        params, meals_g=meals_g, dosing=dosing, sensor=sensor, sensor_seeds=sensor_seeds, pump=pump, start=state
    )

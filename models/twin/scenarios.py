"""What-if scenarios: changes to a window's planned insulin and meals that the twin answers by forecasting again.

The twin takes the planned basal, boluses and carbohydrate of the next two hours as inputs, so a scenario is a
rewrite of `Windows.future_inputs` (columns FUTURE_CHANNELS: basal U, bolus U, carbs g per 5-minute bin) and
nothing else: history, covariates and the starting glucose stay as they were. Meal scenarios act on the window's
*next planned meal* (the first plan bin with carbohydrate) and its *meal bolus* (boluses within MEAL_BOLUS_BINS
bins of it); a window without a planned meal is not applicable to them and is left out, never answered with an
unchanged forecast.

The catalogue is data (`CATALOGUE`), one `Scenario` per question a clinician asks of a patient's next two hours.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np

from models.twin.windows import FUTURE_CHANNELS, Windows

BASAL, BOLUS, CARBS = (FUTURE_CHANNELS.index(c) for c in ("basal_u", "bolus_u", "carbs_g"))
MEAL_BOLUS_BINS = 3  # a bolus within 15 minutes of a meal is that meal's bolus


@dataclass(frozen=True)
class Scenario:
    """One what-if question: factors on the plan's insulin and the next meal, and a delay of that meal."""

    scenario_id: str
    description: str
    basal_factor: float = 1.0  # every planned basal bin
    bolus_factor: float = 1.0  # every planned bolus
    meal_bolus_factor: float = 1.0  # the next meal's bolus only (0 = skipped)
    meal_carbs_factor: float = 1.0  # the next meal's carbohydrate (its bolus unchanged)
    meal_delay_bins: int = 0  # the next meal and its bolus happen this many 5-minute bins later

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("factor") and not 0.0 <= value <= 10.0:
                raise ValueError(f"scenario {self.scenario_id!r}: {f.name} must lie in [0, 10], got {value}")
        if self.meal_delay_bins < 0:
            raise ValueError(f"scenario {self.scenario_id!r}: meal_delay_bins must be >= 0, got {self.meal_delay_bins}")

    @property
    def needs_meal(self) -> bool:
        """Whether the scenario changes the next planned meal (so a window without one is not applicable)."""
        return self.meal_bolus_factor != 1.0 or self.meal_carbs_factor != 1.0 or self.meal_delay_bins != 0


CATALOGUE: tuple[Scenario, ...] = (
    Scenario("skip_meal_bolus", "The bolus for the next meal is skipped", meal_bolus_factor=0.0),
    Scenario("bolus_plus_20", "Every bolus of the next two hours 20% larger", bolus_factor=1.2),
    Scenario("basal_minus_10", "Basal 10% lower for the next two hours", basal_factor=0.9),
    Scenario("larger_meal", "The next meal 50% larger, bolus unchanged", meal_carbs_factor=1.5),
    Scenario("later_meal", "The next meal and its bolus 30 minutes later", meal_delay_bins=6),
)


def scenario(scenario_id: str) -> Scenario:
    """The catalogue's scenario of that id (KeyError naming the catalogue otherwise)."""
    for known in CATALOGUE:
        if known.scenario_id == scenario_id:
            return known
    raise KeyError(f"no scenario {scenario_id!r}; the catalogue has {', '.join(s.scenario_id for s in CATALOGUE)}")


def apply_scenario(windows: Windows, chosen: Scenario) -> tuple[Windows, np.ndarray]:
    """The windows with the scenario's plan, and the boolean mask of windows it applies to (same length)."""
    plan = windows.future_inputs.astype(np.float32, copy=True)
    plan[..., BASAL] *= chosen.basal_factor
    plan[..., BOLUS] *= chosen.bolus_factor
    has_meal: np.ndarray = np.asarray((plan[..., CARBS] > 0).any(axis=1))
    if not chosen.needs_meal:
        return replace(windows, future_inputs=plan), np.ones(len(windows), dtype=bool)
    steps = plan.shape[1]
    meal = np.argmax(plan[..., CARBS] > 0, axis=1)  # first bin with carbohydrate (0 where none; masked out)
    offset = np.arange(steps)[None, :] - meal[:, None]
    meal_bolus = (np.abs(offset) <= MEAL_BOLUS_BINS) & has_meal[:, None]
    meal_carbs = (offset == 0) & has_meal[:, None]
    bolus = np.where(meal_bolus, plan[..., BOLUS], 0.0) * chosen.meal_bolus_factor
    carbs = np.where(meal_carbs, plan[..., CARBS], 0.0) * chosen.meal_carbs_factor
    plan[..., BOLUS] = np.where(meal_bolus, 0.0, plan[..., BOLUS])
    plan[..., CARBS] = np.where(meal_carbs, 0.0, plan[..., CARBS])
    delay = chosen.meal_delay_bins
    if delay:  # what moves past the two-hour plan leaves the window
        bolus = np.pad(bolus, ((0, 0), (delay, 0)))[:, :steps]
        carbs = np.pad(carbs, ((0, 0), (delay, 0)))[:, :steps]
    plan[..., BOLUS] += bolus
    plan[..., CARBS] += carbs
    return replace(windows, future_inputs=plan), has_meal

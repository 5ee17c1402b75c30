"""Virtual-patient, sensor and pump parameters read from the installed simglucose package."""

from __future__ import annotations

import csv
import importlib.util
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

# Model parameters the ODE right-hand side reads, in vpatient_params.csv's own names.
ODE_PARAMETERS = (
    "BW", "kabs", "kmax", "kmin", "b", "d", "Vg", "Vi", "Ib", "Vmx", "Km0", "k2", "k1",
    "p2u", "m1", "m2", "m4", "m30", "ki", "kp1", "kp2", "kp3", "f", "ke1", "ke2",
    "Fsnc", "Vm0", "kd", "ksc", "ka1", "ka2", "u2ss",
)  # fmt: skip
STATE_SIZE = 13
COHORTS = ("child", "adolescent", "adult")


def simglucose_params_dir() -> Path:
    """Return the folder of simglucose's parameter files without importing simglucose.

    Importing simglucose pulls in gym 0.9 and pkg_resources; the data files need neither.
    """
    spec = importlib.util.find_spec("simglucose")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("simglucose is not installed; run `make demo` or `make test` to set up .venv")
    folder = Path(next(iter(spec.submodule_search_locations))) / "params"
    if not (folder / "vpatient_params.csv").is_file():
        raise RuntimeError(f"{folder} has no vpatient_params.csv: the simglucose install is incomplete")
    return folder


def read_param_csv(name: str) -> list[dict[str, str]]:
    """Read one of simglucose's parameter CSVs as a list of rows keyed by column name."""
    with open(simglucose_params_dir() / name, newline="") as handle:
        return list(csv.DictReader(handle))


@dataclass(frozen=True)
class PatientParams:
    """Parameters of N virtual patients, one numpy array of length N per parameter.

    `values` holds the ODE parameters, `x0` the (N, 13) steady-state initial state, and
    `cr`/`cf`/`tdi`/`age` the therapy settings from Quest.csv (g/U, mg/dL per U, U/day, years).
    """

    names: tuple[str, ...]
    cohort: tuple[str, ...]
    base_name: tuple[str, ...]
    values: dict[str, np.ndarray]
    x0: np.ndarray
    cr: np.ndarray
    cf: np.ndarray
    tdi: np.ndarray
    age: np.ndarray
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.names)

    def __getattr__(self, key: str) -> np.ndarray:
        values = object.__getattribute__(self, "values")
        if key in values:
            return values[key]
        raise AttributeError(key)

    @property
    def basal_u_per_min(self) -> np.ndarray:
        """Steady-state basal insulin rate in U/min (u2ss pmol/kg/min x BW / 6000)."""
        return self.values["u2ss"] * self.values["BW"] / 6000.0

    @property
    def basal_glucose_mg_dl(self) -> np.ndarray:
        """Basal (fasting steady-state) plasma glucose in mg/dL."""
        return self.x0[:, 12] / self.values["Vg"]

    def take(self, index: np.ndarray | list[int]) -> PatientParams:
        """Return the patients at `index`, in that order."""
        idx = np.asarray(index, dtype=int)
        pick = [int(i) for i in idx]
        return replace(
            self,
            names=tuple(self.names[i] for i in pick),
            cohort=tuple(self.cohort[i] for i in pick),
            base_name=tuple(self.base_name[i] for i in pick),
            values={k: v[idx].copy() for k, v in self.values.items()},
            x0=self.x0[idx].copy(),
            cr=self.cr[idx].copy(),
            cf=self.cf[idx].copy(),
            tdi=self.tdi[idx].copy(),
            age=self.age[idx].copy(),
            extra={k: v[idx].copy() for k, v in self.extra.items()},
        )


def load_base_patients(names: list[str] | None = None) -> PatientParams:
    """Load simglucose's 30 virtual patients (or the named ones, in that order)."""
    rows = {row["Name"]: row for row in read_param_csv("vpatient_params.csv")}
    quest = {row["Name"]: row for row in read_param_csv("Quest.csv")}
    wanted = list(rows) if names is None else list(names)
    unknown = [n for n in wanted if n not in rows]
    if unknown:
        raise KeyError(f"unknown virtual patient(s) {unknown}; known: {sorted(rows)}")
    state_columns = [c for c in next(iter(rows.values())) if c.startswith("x0_")]
    if len(state_columns) != STATE_SIZE:
        raise ValueError(f"vpatient_params.csv has {len(state_columns)} state columns, expected 13")
    values = {p: np.array([float(rows[n][p]) for n in wanted]) for p in ODE_PARAMETERS}
    x0 = np.array([[float(rows[n][c]) for c in state_columns] for n in wanted])
    return PatientParams(
        names=tuple(wanted),
        cohort=tuple(n.split("#")[0] for n in wanted),
        base_name=tuple(wanted),
        values=values,
        x0=x0,
        cr=np.array([float(quest[n]["CR"]) for n in wanted]),
        cf=np.array([float(quest[n]["CF"]) for n in wanted]),
        tdi=np.array([float(quest[n]["TDI"]) for n in wanted]),
        age=np.array([float(quest[n]["Age"]) for n in wanted]),
    )

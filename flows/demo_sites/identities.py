"""Who the demo patients are at the hospital: names, MRNs, birth dates, addresses, phones (all fake)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta

import numpy as np
from faker import Faker

from models.uva_padova.params import PatientParams


@dataclass(frozen=True)
class Identity:
    """One patient's identifiers as the hospital holds them: protected health information."""

    mrn: str
    family: str
    given: str
    sex: str  # "M" or "F"
    birth_date: date
    address: str
    city: str
    postcode: str
    phone: str

    @property
    def phi_strings(self) -> tuple[str, ...]:
        """Every identifying string a scan for leaked PHI should look for."""
        return (
            self.mrn,
            self.family,
            self.given,
            f"{self.given} {self.family}",
            self.birth_date.isoformat(),
            self.address,
            self.postcode,
            self.phone,
        )


def draw_identities(params: PatientParams, *, locale: str, mrn_prefix: str, start: date, seed: int) -> list[Identity]:
    """Draw a distinct, locale-appropriate identity per patient, consistent with the patient's age."""
    fake = Faker(locale)
    fake.seed_instance(seed)
    rng = np.random.default_rng(seed)
    mrn_numbers = rng.choice(9_000_000, size=len(params), replace=False) + 1_000_000
    identities = []
    for i in range(len(params)):
        sex = "F" if rng.random() < 0.5 else "M"
        given = fake.first_name_female() if sex == "F" else fake.first_name_male()
        age_days = int(params.age[i] * 365.25) + int(rng.integers(0, 365))
        identities.append(
            Identity(
                mrn=f"{mrn_prefix}{mrn_numbers[i]:07d}",
                family=fake.last_name(),
                given=given,
                sex=sex,
                birth_date=start - timedelta(days=age_days),
                address=fake.street_address().replace("\n", ", "),
                city=fake.city(),
                postcode=fake.postcode(),
                phone=fake.phone_number(),
            )
        )
    return identities


def draw_clinicians(*, locale: str, seed: int, count: int = 4) -> list[tuple[str, str]]:
    """A few (family, given) names of the site's diabetes team, who sign notes and refer scans."""
    fake = Faker(locale)
    fake.seed_instance(seed + 1)
    return [(fake.last_name(), fake.first_name()) for _ in range(count)]

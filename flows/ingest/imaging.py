"""Ingest a site's DICOM drop: de-identify each CT file into the store, quarantine the unusable, measure each series.

Why this shape
    The drop holds one folder per study as the hospital's PACS exported it
    (``imaging/<accession>/IM000001.dcm ...``): folder and file names carry the accession number
    and the files carry names, MRNs and dates. Nothing of that may reach the harmonized store, so
    every file goes through the PS3.15 Annex E profile (`flows.ingest.dicom_deid`) and lands
    under its keyed UIDs only::

        <store>/imaging/<study uid>/<series uid>/<sop instance uid>.dcm

    The keyed UIDs depend only on the site secret and the original UIDs, so a rerun on the same
    drop overwrites the same paths with the same bytes and adds nothing.

Accounting
    Each file is one row of its folder's ledger (``imaging/<folder>``): rows in = harmonized +
    quarantined + exact duplicates (byte-identical copies of a file already harmonized in this
    run). A file is quarantined when it cannot be read or de-identified (``dicom.deidentifiable``),
    when its PatientID is not in the site's patient list (``dicom.patient_known``; such a file is
    never written), when another file with different bytes has the same SOP Instance UID
    (``dicom.instance_unique``), when its series names more than one patient or study
    (``dicom.series_consistent``) or when its series cannot be measured
    (``dicom.series_measurable``); in the last two cases every file of the series is quarantined
    and its de-identified copies are removed from the store. Reasons name the file by its path in
    the drop and never echo a patient's identifiers.

Tables
    One ``image_occurrence`` per series and one ``image_feature`` per series and body-composition
    feature of `data_contracts.vocabulary.IMAGE_FEATURES`, measured by `flows.ingest.images` on the
    de-identified files as stored. The occurrence date is the de-identified StudyDate (shifted
    when the site's option says so); when the site removes dates, or the file has none, it is the
    UTC date of the run (`measured_at`): the latest date the study can have, and one that says
    nothing about the patient. A feature a series does not show (muscle attenuation of a slice
    without muscle) gets no row rather than a NaN.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import math
import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pydicom
from pydicom.dataset import Dataset

from data_contracts.schema import IMAGE_FEATURE, IMAGE_OCCURRENCE
from data_contracts.vocabulary import IMAGE_FEATURES, UNIT_CONCEPTS
from flows.ingest.dicom_deid import DeidOptions, deidentify_file
from flows.ingest.images import COMMON_SPACING_MM, series_features
from flows.ingest.ledger import QUARANTINE_SCHEMA, SourceLedger, empty_quarantine
from flows.ingest.pseudonym import stable_row_ids

IMAGING_DIR = "imaging"
# Bump when the measurement in flows.ingest.images changes what it reports for the same pixels.
ALG_VERSION = "1.0"
ALG_SYSTEM = f"twinfed.images {ALG_VERSION} (Alberta HU thresholds, {COMMON_SPACING_MM:.1f} mm grid)"
# Every file deidentify_file accepts is CT Image Storage, so a missing Modality can only mean CT.
DEFAULT_MODALITY = "CT"

CHECK_DEIDENTIFIABLE = "dicom.deidentifiable"
CHECK_PATIENT_KNOWN = "dicom.patient_known"
CHECK_INSTANCE_UNIQUE = "dicom.instance_unique"
CHECK_SERIES_CONSISTENT = "dicom.series_consistent"
CHECK_SERIES_MEASURABLE = "dicom.series_measurable"


@dataclass(frozen=True)
class ImagingBatch:
    """The harmonized imaging tables of a site's drop, what was quarantined, and the accounting per folder."""

    image_occurrence: pl.DataFrame
    image_feature: pl.DataFrame
    quarantine: pl.DataFrame
    ledgers: list[SourceLedger]


@dataclass
class _File:
    """One source file and what became of it in this run."""

    ledger: str  # imaging/<folder>
    source_file: str  # path relative to the drop
    position: int  # 1-based, inside its folder
    output: Path | None = None
    series_uid: str | None = None
    study_uid: str | None = None
    duplicate: bool = False
    failed_check: str | None = None
    reason: str | None = None

    def quarantine(self, check: str, reason: str) -> None:
        """Mark the file quarantined; it is no longer harmonized."""
        self.output, self.failed_check, self.reason = None, check, reason


class _UnknownPatient(Exception):
    """Raised by the pseudonym lookup for a PatientID that is not in the site's patient list."""


def ingest_imaging(
    drop: Path,
    *,
    site_id: str,
    secret: bytes,
    store: Path,
    patients: Mapping[str, tuple[int, str]],
    options: DeidOptions,
    measured_at: datetime.datetime,
) -> ImagingBatch:
    """De-identify `drop`/imaging/*/*.dcm into `store`/imaging, measure each series and account for every file.

    `patients` maps a DICOM PatientID (the site's MRN) to the person's (person_id, pseudonym);
    the pseudonym becomes the de-identified PatientID and keys the date shift. `measured_at`
    (timezone-aware) is the alg_datetime of every feature. A drop without an imaging folder
    gives an empty batch. Rerunning on the same drop rewrites the same files and gives the same
    frames. Raises ValueError for a naive `measured_at` (and, from deidentify_file, for a weak
    secret or a pseudonym that cannot be a PatientID); problems with the files are quarantined.
    """
    if measured_at.tzinfo is None:
        raise ValueError(f"measured_at {measured_at.isoformat()} has no time zone; pass a UTC datetime")
    measured_at = measured_at.astimezone(datetime.UTC)
    folders = _series_folders(drop)
    if not folders:
        return ImagingBatch(IMAGE_OCCURRENCE.empty(), IMAGE_FEATURE.empty(), empty_quarantine(), [])
    images = store / IMAGING_DIR
    images.mkdir(parents=True, exist_ok=True)
    with _quiet_pydicom():
        files = _deidentify_drop(drop, folders, images, secret=secret, patients=patients, options=options)
    person_ids = {pseudonym: person_id for person_id, pseudonym in patients.values()}
    occurrences: list[dict[str, object]] = []
    features: list[dict[str, object]] = []
    for series in _by_series(files):
        measured = _measure_series(series, store=store, person_ids=person_ids, fallback_date=measured_at.date())
        if measured is not None:
            occurrences.append(measured[0])
            features += measured[1]
    return ImagingBatch(
        image_occurrence=_occurrence_frame(occurrences, site_id),
        image_feature=_feature_frame(features, site_id, measured_at),
        quarantine=_quarantine_frame(files),
        ledgers=_ledgers(folders, files),
    )


@contextlib.contextmanager
def _quiet_pydicom() -> Iterator[None]:
    """Keep pydicom's read warnings out of the logs: they name the source file, whose folder is an accession number.

    What they report about a damaged file reaches its quarantine entry instead (as a path inside the drop).
    """
    logger = logging.getLogger("pydicom")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        logger.setLevel(level)


def _series_folders(drop: Path) -> list[Path]:
    """The folders under drop/imaging, sorted; none if the drop has no imaging folder."""
    root = drop / IMAGING_DIR
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def _deidentify_drop(
    drop: Path,
    folders: list[Path],
    images: Path,
    *,
    secret: bytes,
    patients: Mapping[str, tuple[int, str]],
    options: DeidOptions,
) -> list[_File]:
    """De-identify every file of every folder into `images`, in drop order; quarantine or skip the rest."""
    files: list[_File] = []
    # deidentify_file names its output by the new SOP Instance UID, which is only known once it
    # has read the file; it writes into a staging folder on the store's file system, and the file
    # moves from there to its series folder.
    with tempfile.TemporaryDirectory(prefix=".staging-", dir=images) as staging:
        writer = _SeriesWriter(Path(staging), images, secret=secret, patients=patients, options=options)
        for folder in folders:
            for position, source in enumerate(sorted(folder.glob("*.dcm")), start=1):
                file = _File(f"{IMAGING_DIR}/{folder.name}", source.relative_to(drop).as_posix(), position)
                writer.take(source, file)
                files.append(file)
    return files


class _SeriesWriter:
    """Writes de-identified files to <images>/<study>/<series>/<sop>.dcm and remembers what this run wrote."""

    def __init__(
        self,
        staging: Path,
        images: Path,
        *,
        secret: bytes,
        patients: Mapping[str, tuple[int, str]],
        options: DeidOptions,
    ) -> None:
        self.staging, self.images = staging, images
        self.secret, self.patients, self.options = secret, patients, options
        self.written: set[str] = set()  # SHA-256 of each source file harmonized so far
        self.claimed: dict[str, str] = {}  # new SOP Instance UID -> the source file written under it

    def pseudonym_for(self, patient_id: str) -> str:
        """The person's pseudonym; _UnknownPatient stops deidentify_file before it writes anything."""
        if patient_id not in self.patients:
            raise _UnknownPatient
        return self.patients[patient_id][1]

    def take(self, source: Path, file: _File) -> None:
        """Write `source` de-identified, or mark `file` an exact duplicate or quarantined."""
        digest = hashlib.sha256(source.read_bytes()).hexdigest()
        if digest in self.written:
            file.duplicate = True
            return
        try:
            outcome = deidentify_file(
                source, self.staging, secret=self.secret, pseudonym_for=self.pseudonym_for, options=self.options
            )
        except _UnknownPatient:
            file.quarantine(CHECK_PATIENT_KNOWN, f"{file.source_file}: PatientID is not in the site's patient list")
            return
        staged, sop, series, study = (
            outcome.output, outcome.sop_instance_uid, outcome.series_instance_uid, outcome.study_instance_uid
        )  # fmt: skip
        if outcome.error is not None or staged is None or not (sop and series and study):
            reason = _drop_relative(outcome.error or "not written", source, file.source_file, self.patients)
            file.quarantine(CHECK_DEIDENTIFIABLE, reason)
            return
        if sop in self.claimed:
            staged.unlink()
            file.quarantine(
                CHECK_INSTANCE_UNIQUE,
                f"{file.source_file}: same SOP Instance UID as {self.claimed[sop]} but different bytes; "
                "resend the one that is right",
            )
            return
        target = self.images / study / series / staged.name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, target)
        self.claimed[sop] = file.source_file
        self.written.add(digest)
        file.output, file.study_uid, file.series_uid = target, study, series


def _by_series(files: list[_File]) -> Iterator[list[_File]]:
    """The written files grouped by series, series in the order the drop first shows them."""
    groups: dict[str, list[_File]] = {}
    for file in files:
        if file.output is not None and file.series_uid is not None:
            groups.setdefault(file.series_uid, []).append(file)
    yield from groups.values()


def _measure_series(
    series: list[_File], *, store: Path, person_ids: Mapping[str, int], fallback_date: datetime.date
) -> tuple[dict[str, object], list[dict[str, object]]] | None:
    """The occurrence row and feature rows of one written series; None if it was quarantined instead."""
    series = sorted(series, key=lambda f: str(f.output))
    datasets: list[Dataset] = [pydicom.dcmread(f.output) for f in series if f.output is not None]
    pseudonyms = {str(ds.PatientID) for ds in datasets}
    studies = {f.study_uid for f in series}
    if len(pseudonyms) != 1 or len(studies) != 1:
        _quarantine_series(
            series,
            CHECK_SERIES_CONSISTENT,
            f"its series holds files of {len(pseudonyms)} patients and {len(studies)} studies; "
            "a series must be one patient's, in one study",
        )
        return None
    try:
        values = series_features(datasets)
    except ValueError as error:
        detail = str(error).replace(f"{store}{os.sep}", "")  # name the slice by its path in the store
        _quarantine_series(series, CHECK_SERIES_MEASURABLE, f"its series cannot be measured ({detail})")
        return None
    first = datasets[0]
    folder = Path(str(series[0].output)).parent
    occurrence: dict[str, object] = {
        "person_id": person_ids[pseudonyms.pop()],
        "image_occurrence_date": _study_date(first) or fallback_date,
        "image_study_uid": series[0].study_uid,
        "image_series_uid": series[0].series_uid,
        "modality_source_value": str(first.get("Modality") or DEFAULT_MODALITY),
        "local_path": folder.relative_to(store).as_posix(),
    }
    features: list[dict[str, object]] = [
        {
            "person_id": occurrence["person_id"],
            "image_series_uid": occurrence["image_series_uid"],
            "image_feature_source_value": name,
            "value_as_number": values[name],
        }
        for name in IMAGE_FEATURES
        if math.isfinite(values[name])
    ]
    return occurrence, features


def _quarantine_series(series: list[_File], check: str, why: str) -> None:
    """Quarantine every file of a series and take its de-identified copies out of the store."""
    for file in series:
        if file.output is not None:
            file.output.unlink(missing_ok=True)
            for folder in (file.output.parent, file.output.parent.parent):  # series, then study
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
        file.quarantine(check, f"{file.source_file}: {why}")


def _study_date(ds: Dataset) -> datetime.date | None:
    """The de-identified StudyDate, or None when the date option removed it or it is not a full date."""
    value = str(ds.get("StudyDate") or "").strip()
    try:
        return datetime.datetime.strptime(value[:8], "%Y%m%d").date() if len(value) >= 8 else None
    except ValueError:
        return None


def _drop_relative(error: str, source: Path, relative: str, patients: Mapping[str, tuple[int, str]]) -> str:
    """A deidentify_file error naming the file by its path in the drop, with any PatientID of the site blanked.

    The errors describe the file's structure, but some quote pydicom's parser, which may echo a
    value; a known MRN is the identifier that could turn up there.
    """
    reason = error.replace(str(source), relative)
    for patient_id in patients:
        if patient_id and patient_id in reason:
            reason = reason.replace(patient_id, "<PatientID>")
    return reason


def _occurrence_id(site_id: str) -> pl.Expr:
    """image_occurrence_id: stable per site and remapped series UID."""
    return stable_row_ids(site_id, IMAGE_OCCURRENCE.name, pl.col("image_series_uid"))


def _occurrence_frame(occurrences: list[dict[str, object]], site_id: str) -> pl.DataFrame:
    """The image_occurrence table of the measured series."""
    if not occurrences:
        return IMAGE_OCCURRENCE.empty()
    frame = pl.DataFrame(occurrences).with_columns(_occurrence_id(site_id).alias("image_occurrence_id"))
    return IMAGE_OCCURRENCE.conform(frame)


def _feature_frame(features: list[dict[str, object]], site_id: str, measured_at: datetime.datetime) -> pl.DataFrame:
    """The image_feature table: one row per measured series and feature."""
    if not features:
        return IMAGE_FEATURE.empty()
    name = pl.col("image_feature_source_value")
    frame = pl.DataFrame(features).with_columns(_occurrence_id(site_id).alias("image_occurrence_id"))
    frame = frame.with_columns(
        stable_row_ids(
            site_id, IMAGE_FEATURE.name, pl.concat_str(pl.col("image_occurrence_id").cast(pl.String), pl.lit("/"), name)
        ).alias("image_feature_id"),
        name.replace_strict({n: c for n, (c, _) in IMAGE_FEATURES.items()}).alias("image_feature_concept_id"),
        name.replace_strict({n: UNIT_CONCEPTS[u] for n, (_, u) in IMAGE_FEATURES.items()}).alias("unit_concept_id"),
        pl.lit(ALG_SYSTEM).alias("alg_system"),
        pl.lit(measured_at).alias("alg_datetime"),
    )
    return IMAGE_FEATURE.conform(frame)


def _quarantine_frame(files: list[_File]) -> pl.DataFrame:
    """One QUARANTINE_SCHEMA row per quarantined file, in drop order."""
    rows = [
        {
            "source_file": f.source_file,
            "source_position": f.position,
            "record_key": Path(f.source_file).name,
            "failed_checks": f.failed_check,
            "reason": f.reason,
        }
        for f in files
        if f.failed_check is not None
    ]
    return pl.DataFrame(rows, schema=QUARANTINE_SCHEMA) if rows else empty_quarantine()


def _ledgers(folders: list[Path], files: list[_File]) -> list[SourceLedger]:
    """Per folder: files in, exact duplicates, quarantined and harmonized (an empty folder shows as zeros)."""
    ledgers = []
    for folder in folders:
        name = f"{IMAGING_DIR}/{folder.name}"
        mine = [f for f in files if f.ledger == name]
        ledgers.append(
            SourceLedger(
                file=name,
                rows_in=len(mine),
                exact_duplicates=sum(f.duplicate for f in mine),
                quarantined=sum(f.failed_check is not None for f in mine),
                harmonized=sum(f.output is not None for f in mine),
                file_error=None,
            )
        )
    return ledgers

"""De-identify a site's DICOM CT files with the DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile.

Which table
    PS3.15 Table E.1-1 (Application Level Confidentiality Profile Attributes), 2026c edition, for
    the attributes that can occur in CT images and the requests, staff, equipment and trial
    attributes that travel with them (``_TABLE_E1_1`` below, about 350 rows). The Basic Profile
    column gives each attribute's action; three option columns can change it:

    - Retain Longitudinal Temporal Information with Modified Dates Option (DCM 113107), when
      ``DeidOptions.date_option == "shift"``: every date-or-time attribute with "C" in that column.
    - Retain Patient Characteristics Option (DCM 113108), ``keep_patient_characteristics``: the
      attributes with "K" in that column (sex, age, size, weight, ethnic group, smoking and
      pregnancy status, sex neutered). The ones with "C" there (allergies, patient state,
      pre-medication, special needs) are free text and stay removed: removing satisfies "clean".
    - Retain Device Identity Option (DCM 113109), ``keep_device_identity``: the "K" rows of that
      column (station name, device serial number, device UID, gantry and detector IDs, ...).

    No other option is offered: institution identity, UIDs, full dates, safe private attributes
    and descriptions are always handled as the Basic Profile says.

What each action code does here
    X  remove the attribute (a sequence goes with all its items).
    Z  keep the attribute with a zero-length value (an empty sequence for SQ).
    D  replace with a dummy that fits the VR: "ANONYMIZED" for text, 19000101 / 19000101000000 /
       000000 for DA / DT / TM, 0 for numbers, a keyed UID for UI, one empty item for SQ.
    U  replace each UID by ``keyed_uid``: "2.25." followed by the decimal value of a UUID
       (RFC 9562 version 8) whose bits are HMAC-SHA256(secret, original UID). The same UID gives
       the same replacement in every file of a site, references between files stay intact, and
       without the secret the original UIDs cannot be recovered or confirmed.
    K  keep; a kept sequence is cleaned, i.e. every item goes through the same table.
    C  only met through the Modified Dates option: DA and DT values move by the patient's offset
       (a whole number of days from -3652 to -366, derived from HMAC-SHA256(secret, pseudonym)),
       so intervals between one patient's dates survive; TM values (time of day) are unchanged
       by a whole-day shift and are kept.

    Compound codes (X/Z, X/D, Z/D, X/Z/D, X/Z/U*) mean "the first unless the IOD needs the
    attribute to be present": they are resolved for the CT Image IOD by the attribute's Type
    there, which makes every compound row X except Content Date/Time, Patient ID and
    Contrast/Bolus Agent (Type 2, so Z). The resolved action is stored next to the printed code.

Beyond the table
    - Private attributes (odd groups), private creators included, are removed at every depth.
    - Overlay planes (60xx) and curves (50xx) are removed whole, not just their data and comments,
      so no plane header is left without its data. Group lengths (gggg,0000), command elements
      (0000,eeee), which belong to network messages, and file meta AE titles and private
      information are removed.
    - Standard attributes the table does not list are kept, except by VR: PN and AE are removed,
      UI is replaced by its keyed UID (class, transfer syntax, coding scheme UIDs and UIDs under
      the DICOM root 1.2.840.10008 are kept), DA and DT are shifted or removed with the dates,
      and TM is kept when shifting and removed otherwise: a net for identifying attributes the
      rows here do not cover (newer or rarer ones, and vendors' misuse of standard tags).
    - PatientName and PatientID become the caller's keyed pseudonym: their code Z allows a
      non-empty dummy, and a keyed pseudonym is the dummy that keeps a patient's images linkable
      (as a clinical trial's subject ID does).
    - Patient Identity Removed (0012,0062) = YES, De-identification Method (0012,0063) names the
      profile and options, De-identification Method Code Sequence (0012,0064) lists the CID 7050
      codes, Longitudinal Temporal Information Modified (0028,0303) is MODIFIED or REMOVED.
    - Files whose Burned In Annotation is YES are quarantined: cleaning pixel data is not offered.
"""

from __future__ import annotations

import copy
import datetime
import functools
import hashlib
import hmac
import io
import os
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, CTImageStorage
from pydicom.valuerep import VR, PersonName

DateOption = Literal["remove", "shift"]

# A shorter HMAC key makes the keyed UIDs, pseudonyms and date offsets guessable by brute force.
MIN_SECRET_BYTES = 16
# Dates move back by one to ten years: far enough that a shifted date is never mistaken for a
# real one, near enough that shifted dates stay plausible for software that checks them.
DATE_SHIFT_DAYS = (-3652, -366)
DICOM_UID_ROOT = "1.2.840.10008."
UUID_DERIVED_UID_ROOT = "2.25."
DUMMY_TEXT = "ANONYMIZED"
_DUMMY_BY_VR: dict[str, Any] = {
    VR.DA: "19000101",
    VR.DT: "19000101000000",
    VR.TM: "000000",
    VR.AS: "000D",
    VR.DS: "0",
    VR.IS: "0",
    VR.UR: "https://anonymized.invalid",
    VR.OB: b"\x00\x00",
    VR.OW: b"\x00\x00",
    VR.UN: b"\x00\x00",
}
_NUMERIC_VRS = {VR.US, VR.SS, VR.UL, VR.SL, VR.UV, VR.SV, VR.FL, VR.FD, VR.AT}
# VRs whose values can name, date or locate someone when found inside a removed sequence.
_IDENTIFYING_TEXT_VRS = {VR.AE, VR.LO, VR.LT, VR.PN, VR.SH, VR.ST, VR.UC, VR.UT, VR.DA, VR.DT, VR.TM}
# The UIDs that link an image to its series, study and geometry: a damaged one would split them.
_LINKING_UIDS = ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID")
# UI attributes naming a kind of thing (a SOP class, a syntax, a code system), not an instance.
_NON_INSTANCE_UID_KEYWORDS = {"TransferSyntaxUID", "CodingSchemeUID", "ContextUID", "MappingResourceUID"}
_FILE_META_REMOVED = (
    "SourceApplicationEntityTitle",
    "SendingApplicationEntityTitle",
    "ReceivingApplicationEntityTitle",
)
_FILE_META_REMOVED_TAGS = (Tag(0x0002, 0x0100), Tag(0x0002, 0x0102))  # Private Information Creator UID, Private Info

PATIENT_CHARACTERISTICS = "Retain Patient Characteristics Option"
DEVICE_IDENTITY = "Retain Device Identity Option"
MODIFIED_DATES = "Retain Longitudinal Temporal Information Modified Dates Option"
BASIC_PROFILE = "Basic Application Confidentiality Profile"
# CID 7050 De-identification Method codes (scheme DCM) for the profile and the options offered.
_METHOD_CODES = {
    BASIC_PROFILE: "113100",
    MODIFIED_DATES: "113107",
    PATIENT_CHARACTERISTICS: "113108",
    DEVICE_IDENTITY: "113109",
}


@dataclass(frozen=True)
class DeidOptions:
    """Which Annex E options apply on top of the Basic Profile.

    date_option "remove" applies the Basic Profile to dates and times (emptied or removed per
    action code); "shift" is the Retain Longitudinal Temporal Information with Modified Dates
    Option, moving every DA and DT by a per-patient number of days derived from the secret.
    """

    date_option: DateOption
    keep_patient_characteristics: bool = True
    keep_device_identity: bool = False

    def __post_init__(self) -> None:
        if self.date_option not in ("remove", "shift"):
            raise ValueError(f"date_option must be 'remove' or 'shift', got {self.date_option!r}")

    def method_names(self) -> list[str]:
        """The profile and the options in force, as CID 7050 code meanings."""
        names = [BASIC_PROFILE]
        if self.date_option == "shift":
            names.append(MODIFIED_DATES)
        if self.keep_patient_characteristics:
            names.append(PATIENT_CHARACTERISTICS)
        if self.keep_device_identity:
            names.append(DEVICE_IDENTITY)
        return names


@dataclass(frozen=True)
class DicomOutcome:
    """What happened to one file: written de-identified, or quarantined with the reason."""

    source: Path
    output: Path | None
    error: str | None
    sop_instance_uid: str | None
    series_instance_uid: str | None
    study_instance_uid: str | None


@dataclass(frozen=True)
class _Rule:
    """One row of Table E.1-1: the printed Basic Profile code, the action for a CT Image, the option that retains it."""

    code: str
    action: str
    retained_by: str | None = None


def _rule(code: str, ct: str | None = None, retained_by: str | None = None) -> _Rule:
    """A table row; `ct` resolves a compound code (X/Z, X/D, ...) for the CT Image IOD."""
    action = ct or code
    allowed = code.replace("*", "").split("/")
    if action not in allowed:
        raise ValueError(f"action {action!r} is not one of the codes {code!r}")
    return _Rule(code, action, retained_by)


_P, _V, _T = PATIENT_CHARACTERISTICS, DEVICE_IDENTITY, MODIFIED_DATES
_X, _Z, _U = _rule("X"), _rule("Z"), _rule("U")
_XT = _rule("X", retained_by=_T)  # a date or time removed unless dates are shifted
_XV = _rule("X", retained_by=_V)  # a device identifier removed unless device identity is kept
_XP = _rule("X", retained_by=_P)  # a patient characteristic removed unless characteristics are kept

# PS3.15 Table E.1-1 (2026c), keyed by pydicom keyword. Compound codes carry the CT resolution.
_TABLE_E1_1: dict[str, _Rule] = {
    # Patient
    "PatientName": _Z,
    "PatientID": _rule("Z/D", "Z"),
    "IssuerOfPatientID": _X,
    "PatientBirthDate": _Z,
    "PatientBirthTime": _X,
    "PatientSex": _rule("Z", retained_by=_P),
    "PatientSexNeutered": _rule("X/Z", "X", _P),
    "PatientAge": _XP,
    "PatientSize": _XP,
    "PatientWeight": _XP,
    "EthnicGroup": _XP,
    "EthnicGroupCodeSequence": _X,
    "SmokingStatus": _XP,
    "PregnancyStatus": _XP,
    "LastMenstrualDate": _XT,
    "OtherPatientIDs": _X,
    "OtherPatientIDsSequence": _X,
    "OtherPatientNames": _X,
    "PatientBirthName": _X,
    "PatientMotherBirthName": _X,
    "PatientAddress": _X,
    "PatientTelephoneNumbers": _X,
    "PatientTelecomInformation": _X,
    "CountryOfResidence": _X,
    "RegionOfResidence": _X,
    "MilitaryRank": _X,
    "BranchOfService": _X,
    "MedicalRecordLocator": _X,
    "Occupation": _X,
    "AdditionalPatientHistory": _X,
    "PatientComments": _X,
    "PatientReligiousPreference": _X,
    "MedicalAlerts": _X,
    "Allergies": _X,
    "SpecialNeeds": _X,
    "PatientState": _X,
    "PreMedication": _X,
    "ResponsiblePerson": _X,
    "ResponsibleOrganization": _X,
    "PatientInsurancePlanCodeSequence": _X,
    "InsurancePlanIdentification": _X,
    "PatientPrimaryLanguageCodeSequence": _X,
    "PatientPrimaryLanguageModifierCodeSequence": _X,
    "ReferencedPatientSequence": _X,
    "ReferencedPatientPhotoSequence": _X,
    "ReferencedPatientAliasSequence": _X,
    # Visit and admission
    "PatientInstitutionResidence": _X,
    "CurrentPatientLocation": _X,
    "PatientTransportArrangements": _X,
    "AdmissionID": _X,
    "IssuerOfAdmissionID": _X,
    "IssuerOfAdmissionIDSequence": _X,
    "AdmittingDate": _XT,
    "AdmittingTime": _XT,
    "AdmittingDiagnosesDescription": _X,
    "AdmittingDiagnosesCodeSequence": _X,
    "DischargeDate": _XT,
    "DischargeTime": _XT,
    "DischargeDiagnosisDescription": _X,
    "ScheduledAdmissionDate": _XT,
    "ScheduledAdmissionTime": _XT,
    "ScheduledDischargeDate": _XT,
    "ScheduledDischargeTime": _XT,
    "ScheduledPatientInstitutionResidence": _X,
    "ServiceEpisodeID": _X,
    "ServiceEpisodeDescription": _X,
    "IssuerOfServiceEpisodeID": _X,
    "IssuerOfServiceEpisodeIDSequence": _X,
    "VisitComments": _X,
    "ReasonForVisit": _X,
    "ReasonForVisitCodeSequence": _X,
    # Study
    "StudyInstanceUID": _U,
    "StudyDate": _rule("Z", retained_by=_T),
    "StudyTime": _rule("Z", retained_by=_T),
    "AccessionNumber": _Z,
    "StudyID": _Z,
    "StudyIDIssuer": _X,
    "StudyDescription": _X,
    "StudyComments": _X,
    "ReferencedStudySequence": _rule("X/Z", "X"),
    "ReferringPhysicianName": _Z,
    "ReferringPhysicianAddress": _X,
    "ReferringPhysicianTelephoneNumbers": _X,
    "ReferringPhysicianIdentificationSequence": _X,
    "ConsultingPhysicianName": _Z,
    "ConsultingPhysicianIdentificationSequence": _X,
    "PhysiciansOfRecord": _X,
    "PhysiciansOfRecordIdentificationSequence": _X,
    "NameOfPhysiciansReadingStudy": _X,
    "PhysiciansReadingStudyIdentificationSequence": _X,
    "RequestingPhysician": _X,
    "RequestingService": _X,
    "ReasonForStudy": _X,
    "RequestedContrastAgent": _X,
    "RequestedProcedureDescription": _rule("X/Z", "X"),
    "StudyVerifiedDate": _XT,
    "StudyVerifiedTime": _XT,
    "StudyReadDate": _XT,
    "StudyReadTime": _XT,
    "StudyArrivalDate": _XT,
    "StudyArrivalTime": _XT,
    "StudyCompletionDate": _XT,
    "StudyCompletionTime": _XT,
    "ScheduledStudyStartDate": _XT,
    "ScheduledStudyStartTime": _XT,
    "ScheduledStudyStopDate": _XT,
    "ScheduledStudyStopTime": _XT,
    "ScheduledStudyLocation": _XV,
    "ScheduledStudyLocationAETitle": _XV,
    # Series, performed and scheduled procedure steps, the request
    "SeriesInstanceUID": _U,
    "SeriesDate": _rule("X/D", "X", _T),
    "SeriesTime": _rule("X/D", "X", _T),
    "SeriesDescription": _X,
    "ProtocolName": _rule("X/D", "X"),
    "OperatorsName": _rule("X/Z/D", "X"),
    "OperatorIdentificationSequence": _rule("X/D", "X"),
    "PerformingPhysicianName": _X,
    "PerformingPhysicianIdentificationSequence": _X,
    "ReferencedPerformedProcedureStepSequence": _rule("X/Z/D", "X"),
    "RequestAttributesSequence": _X,
    "PerformedProcedureStepID": _X,
    "PerformedProcedureStepDescription": _X,
    "PerformedProcedureStepStartDate": _XT,
    "PerformedProcedureStepStartTime": _XT,
    "PerformedProcedureStepEndDate": _XT,
    "PerformedProcedureStepEndTime": _XT,
    "PerformedProcedureStepStartDateTime": _XT,
    "PerformedProcedureStepEndDateTime": _XT,
    "ProcedureStepCancellationDateTime": _XT,
    "CommentsOnThePerformedProcedureStep": _X,
    "PerformedStationAETitle": _XV,
    "PerformedStationName": _XV,
    "PerformedLocation": _X,
    "PerformedStationNameCodeSequence": _XV,
    "PerformedStationGeographicLocationCodeSequence": _XV,
    "RequestedProcedureID": _X,
    "RequestedProcedureComments": _X,
    "RequestedProcedureLocation": _X,
    "ReasonForTheRequestedProcedure": _X,
    "ReasonForRequestedProcedureCodeSequence": _X,
    "RequestedSeriesDescription": _X,
    "ScheduledProcedureStepID": _X,
    "ScheduledProcedureStepDescription": _X,
    "ScheduledProcedureStepStartDate": _XT,
    "ScheduledProcedureStepStartTime": _XT,
    "ScheduledProcedureStepEndDate": _XT,
    "ScheduledProcedureStepEndTime": _XT,
    "ScheduledProcedureStepStartDateTime": _XT,
    "ScheduledProcedureStepModificationDateTime": _XT,
    "ScheduledProcedureStepExpirationDateTime": _XT,
    "ExpectedCompletionDateTime": _XT,
    "ScheduledPerformingPhysicianName": _X,
    "ScheduledPerformingPhysicianIdentificationSequence": _X,
    "ScheduledStationAETitle": _XV,
    "ScheduledStationName": _XV,
    "ScheduledProcedureStepLocation": _XV,
    "ScheduledStationNameCodeSequence": _XV,
    "ScheduledStationGeographicLocationCodeSequence": _XV,
    "ScheduledHumanPerformersSequence": _X,
    "ActualHumanPerformersSequence": _X,
    "HumanPerformerName": _X,
    "HumanPerformerOrganization": _X,
    "PlacerOrderNumberImagingServiceRequest": _Z,
    "FillerOrderNumberImagingServiceRequest": _Z,
    "ReasonForTheImagingServiceRequest": _X,
    "ImagingServiceRequestComments": _X,
    "IssueDateOfImagingServiceRequest": _XT,
    "IssueTimeOfImagingServiceRequest": _XT,
    "OrderEnteredBy": _X,
    "OrderEntererLocation": _X,
    "OrderCallbackPhoneNumber": _X,
    "OrderCallbackTelecomInformation": _X,
    "NamesOfIntendedRecipientsOfResults": _X,
    "IntendedRecipientsOfResultsIdentificationSequence": _X,
    "ConfidentialityConstraintOnPatientDataDescription": _X,
    "CommentsOnRadiationDose": _X,
    # Equipment and institution
    "InstitutionName": _rule("X/Z/D", "X"),
    "InstitutionAddress": _X,
    "InstitutionCodeSequence": _rule("X/Z/D", "X"),
    "InstitutionalDepartmentName": _X,
    "InstitutionalDepartmentTypeCodeSequence": _X,
    "StationName": _rule("X/Z/D", "X", _V),
    "StationAETitle": _X,
    "RetrieveAETitle": _X,
    "NetworkID": _X,
    "DeviceSerialNumber": _rule("X/Z/D", "X", _V),
    "DeviceUID": _rule("U", retained_by=_V),
    "ManufacturerDeviceClassUID": _rule("U", retained_by=_V),
    "DeviceDescription": _XV,
    "LongDeviceDescription": _X,
    "UniqueDeviceIdentifier": _XV,
    "UDISequence": _XV,
    "GantryID": _XV,
    "GeneratorID": _XV,
    "DetectorID": _rule("X/D", "X", _V),
    "PlateID": _XV,
    "CassetteID": _XV,
    "XRayDetectorID": _rule("D", retained_by=_V),
    "XRayDetectorLabel": _XV,
    "XRaySourceID": _rule("D", retained_by=_V),
    "SourceManufacturer": _XV,
    "SecondaryCaptureDeviceID": _X,
    "HardcopyCreationDeviceID": _X,
    "ModifyingDeviceID": _X,
    "DateOfLastCalibration": _XT,
    "TimeOfLastCalibration": _XT,
    "DateTimeOfLastCalibration": _XT,
    "CalibrationDateTime": _rule("Z", retained_by=_T),
    "DateOfLastDetectorCalibration": _rule("X/D", "X", _T),
    "TimeOfLastDetectorCalibration": _rule("X/D", "X", _T),
    "DateOfManufacture": _XT,
    "DateOfInstallation": _XT,
    "AcquisitionDeviceProcessingDescription": _rule("X/D", "X"),
    # Image and acquisition
    "SOPInstanceUID": _U,
    "MediaStorageSOPInstanceUID": _U,
    "FrameOfReferenceUID": _U,
    "SynchronizationFrameOfReferenceUID": _U,
    "SourceFrameOfReferenceUID": _U,
    "ReferencedFrameOfReferenceUID": _U,
    "RelatedFrameOfReferenceUID": _U,
    "ReferencedSOPInstanceUID": _U,
    "ReferencedSOPInstanceUIDInFile": _U,
    "RequestedSOPInstanceUID": _U,
    "FailedSOPInstanceUIDList": _U,
    "IrradiationEventUID": _U,
    "InstanceCreatorUID": _U,
    "ConcatenationUID": _U,
    "DimensionOrganizationUID": _U,
    "AcquisitionUID": _U,
    "PyramidUID": _U,
    "PaletteColorLookupTableUID": _U,
    "LargePaletteColorLookupTableUID": _U,
    "StorageMediaFileSetUID": _U,
    "TargetUID": _U,
    "TransactionUID": _U,
    "TrackingUID": _U,
    "FiducialUID": _U,
    "ObservationUID": _U,
    "UID": _U,
    "SpecimenUID": _U,
    "DigitalSignatureUID": _U,
    "TemplateExtensionOrganizationUID": _U,
    "TemplateExtensionCreatorUID": _U,
    "ContentDate": _rule("Z/D", "Z", _T),
    "ContentTime": _rule("Z/D", "Z", _T),
    "AcquisitionDate": _rule("X/Z", "X", _T),
    "AcquisitionTime": _rule("X/Z", "X", _T),
    "AcquisitionDateTime": _rule("X/Z/D", "X", _T),
    "InstanceCreationDate": _rule("X/D", "X", _T),
    "InstanceCreationTime": _rule("X/Z/D", "X", _T),
    "InstanceCoercionDateTime": _XT,
    "TimezoneOffsetFromUTC": _XT,
    "FrameAcquisitionDateTime": _rule("D", retained_by=_T),
    "FrameReferenceDateTime": _rule("D", retained_by=_T),
    "StartAcquisitionDateTime": _rule("X/D", "X", _T),
    "EndAcquisitionDateTime": _rule("X/D", "X", _T),
    "ModifiedImageDate": _XT,
    "ModifiedImageTime": _XT,
    "ModifiedImageDescription": _X,
    "ContrastBolusAgent": _rule("Z/D", "Z"),
    "ContrastBolusStartTime": _XT,
    "ContrastBolusStopTime": _XT,
    "InterventionDrugStartTime": _XT,
    "InterventionDrugStopTime": _XT,
    "DateOfSecondaryCapture": _XT,
    "TimeOfSecondaryCapture": _XT,
    "ImageComments": _X,
    "FrameComments": _X,
    "ImagePresentationComments": _X,
    "IdentifyingComments": _X,
    "AcquisitionComments": _X,
    "DerivationDescription": _X,
    "AcquisitionProtocolDescription": _X,
    "AcquisitionFieldOfViewLabel": _rule("D"),
    "RespiratoryMotionCompensationTechniqueDescription": _X,
    "MultienergyAcquisitionDescription": _X,
    "DecompositionDescription": _X,
    "AcquisitionContextSequence": _rule("X/Z", "X"),
    "AcquisitionContextDescription": _X,
    "ReferencedImageSequence": _rule("X/Z/U*", "X"),
    "SourceImageSequence": _rule("X/Z/U*", "X"),
    "IconImageSequence": _X,
    "OverlayDate": _XT,
    "OverlayTime": _XT,
    "CurveDate": _XT,
    "CurveTime": _XT,
    "TextComments": _X,
    "TextString": _X,
    "Arbitrary": _X,
    # Clinical trial
    "ClinicalTrialSponsorName": _rule("D"),
    "ClinicalTrialProtocolID": _rule("D"),
    "ClinicalTrialProtocolName": _Z,
    "ClinicalTrialSiteID": _Z,
    "ClinicalTrialSiteName": _Z,
    "ClinicalTrialSubjectID": _rule("D"),
    "ClinicalTrialSubjectReadingID": _rule("D"),
    "ClinicalTrialTimePointID": _Z,
    "ClinicalTrialTimePointDescription": _X,
    "ClinicalTrialCoordinatingCenterName": _Z,
    "ClinicalTrialProtocolEthicsCommitteeName": _rule("D"),
    "ClinicalTrialProtocolEthicsCommitteeApprovalNumber": _X,
    "ClinicalTrialSeriesID": _X,
    "ClinicalTrialSeriesDescription": _X,
    "IssuerOfClinicalTrialProtocolID": _X,
    "IssuerOfClinicalTrialSiteID": _X,
    "IssuerOfClinicalTrialSubjectID": _X,
    "IssuerOfClinicalTrialSubjectReadingID": _X,
    "IssuerOfClinicalTrialSeriesID": _X,
    "IssuerOfClinicalTrialTimePointID": _X,
    "OtherClinicalTrialProtocolIDsSequence": _X,
    "EthicsCommitteeApprovalEffectivenessStartDate": _XT,
    "EthicsCommitteeApprovalEffectivenessEndDate": _XT,
    # People, signatures and audit trails
    "PersonName": _rule("D"),
    "PersonIdentificationCodeSequence": _rule("D"),
    "PersonAddress": _X,
    "PersonTelephoneNumbers": _X,
    "PersonTelecomInformation": _X,
    "VerifyingObserverName": _rule("D"),
    "VerifyingObserverSequence": _rule("D"),
    "VerifyingOrganization": _rule("D"),
    "VerifyingObserverIdentificationCodeSequence": _Z,
    "AuthorObserverSequence": _X,
    "ParticipantSequence": _X,
    "CustodialOrganizationSequence": _X,
    "DigitalSignaturesSequence": _X,
    "ReferencedDigitalSignatureSequence": _X,
    "ReferencedSOPInstanceMACSequence": _X,
    "MAC": _X,
    "OriginalAttributesSequence": _X,
    "ModifiedAttributesSequence": _X,
    "NonconformingModifiedAttributesSequence": _X,
    "NonconformingDataElementValue": _X,
    "InstanceOriginStatus": _X,
    "DataSetTrailingPadding": _X,
}

# Rows of the 2026c table that pydicom 3.0.2's dictionary does not name yet (all Basic Profile X).
_TABLE_E1_1_BY_TAG: dict[int, _Rule] = {
    0x00100011: _X,  # Person Names to Use Sequence
    0x00100012: _X,  # Name to Use
    0x00100013: _X,  # Name to Use Comment
    0x00100014: _X,  # Third Person Pronouns Sequence
    0x00100015: _X,  # Pronoun Code Sequence
    0x00100016: _X,  # Pronoun Comment
    0x00100041: _X,  # Gender Identity Sequence
    0x00100042: _X,  # Sex Parameters for Clinical Use Category Comment
    0x00100043: _X,  # Sex Parameters for Clinical Use Category Sequence
    0x00100044: _X,  # Gender Identity Code Sequence
    0x00100045: _X,  # Gender Identity Comment
    0x00100046: _X,  # Sex Parameters for Clinical Use Category Code Sequence
    0x00100047: _X,  # Sex Parameters for Clinical Use Category Reference
    0x00102162: _X,  # Ethnic Groups
}


def _tag_table() -> dict[BaseTag, _Rule]:
    """The table keyed by tag; a keyword pydicom does not know is a typo here, so it raises."""
    table: dict[BaseTag, _Rule] = {Tag(tag): rule for tag, rule in _TABLE_E1_1_BY_TAG.items()}
    for keyword, rule in _TABLE_E1_1.items():
        tag = tag_for_keyword(keyword)
        if tag is None:
            raise KeyError(f"Table E.1-1 keyword {keyword!r} is not in pydicom's data dictionary")
        table[Tag(tag)] = rule
    return table


_RULES = _tag_table()


def keyed_uid(uid: str, *, secret: bytes) -> UID:
    """The site's replacement for `uid`: 2.25.<UUIDv8 from HMAC-SHA256(secret, uid)>, at most 44 characters."""
    digest = hmac.new(secret, str(uid).strip().encode("ascii", "replace"), hashlib.sha256).digest()
    value = int.from_bytes(digest[:16], "big")
    value = (value & ~(0xF << 76)) | (0x8 << 76)  # version 8: custom (RFC 9562)
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 4122 variant
    return UID(f"{UUID_DERIVED_UID_ROOT}{value}")


def date_offset_days(pseudonym: str, *, secret: bytes) -> int:
    """The patient's date shift in days (negative), the same for every file of that pseudonym."""
    digest = hmac.new(secret, b"date-offset\x1f" + pseudonym.encode("utf-8"), hashlib.sha256).digest()
    low, high = DATE_SHIFT_DAYS
    return low + int.from_bytes(digest[:8], "big") % (high - low + 1)


def deidentify(ds: Dataset, *, secret: bytes, pseudonym: str, options: DeidOptions) -> Dataset:
    """Return a de-identified copy of `ds` under the Basic Profile and the options asked for.

    PatientID and PatientName become `pseudonym`; every Table E.1-1 action is applied at every
    depth of every sequence; all private attributes go; UIDs become keyed_uid(original); the
    0012 markers and Longitudinal Temporal Information Modified are written; the file meta
    Media Storage SOP Instance UID follows the new SOP Instance UID.
    """
    _check_secret(secret)
    _check_pseudonym(pseudonym)
    result = copy.deepcopy(ds)
    _deidentify_in_place(result, secret=secret, pseudonym=pseudonym, options=options)
    return result


def deidentify_file(
    source: Path,
    destination_dir: Path,
    *,
    secret: bytes,
    pseudonym_for: Callable[[str], str],
    options: DeidOptions,
) -> DicomOutcome:
    """De-identify one CT file into destination_dir/<new SOP Instance UID>.dcm, or say why it was quarantined.

    A file that cannot be read, whose pixel data do not decode, that is not a CT image, lacks the
    identifiers the pipeline links on or has burned-in annotation gives an outcome with `error`
    naming the file and no output; nothing about the input makes this raise. The file is written
    in its own transfer syntax. `pseudonym_for` maps the original PatientID (MRN) to the site's
    keyed pseudonym.
    """
    _check_secret(secret)
    ds, problem = _read_checked(source)
    if ds is None:
        return _quarantined(source, problem or f"{source}: unreadable")
    pseudonym = pseudonym_for(str(ds.PatientID))
    _check_pseudonym(pseudonym)
    _deidentify_in_place(ds, secret=secret, pseudonym=pseudonym, options=options)
    try:
        encoded = _encoded(ds)
    # A damaged value that pydicom read leniently can still fail to encode; that is bad input too.
    except Exception as exc:  # noqa: BLE001
        return _quarantined(source, f"{source}: a damaged value cannot be written back ({_reason(exc)}); resend it")
    destination_dir.mkdir(parents=True, exist_ok=True)
    output = destination_dir / f"{ds.SOPInstanceUID}.dcm"
    partial = output.with_name(f".{output.name}.partial")
    try:
        partial.write_bytes(encoded)
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)
    return DicomOutcome(
        source=source,
        output=output,
        error=None,
        sop_instance_uid=str(ds.SOPInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        study_instance_uid=str(ds.StudyInstanceUID),
    )


def phi_values(ds: Dataset) -> set[str]:
    """Every identifying string in `ds`, at any depth: what the Basic Profile removes, blanks or replaces.

    Names (whole and by component), IDs, dates and times, addresses, descriptions and comments,
    instance UIDs, the values of private attributes and every text inside a removed sequence.
    Patient characteristics (sex, age, size, weight, ...) are not identifiers and are left out.
    """
    found: set[str] = set()
    strictest = DeidOptions(date_option="remove", keep_patient_characteristics=False, keep_device_identity=False)
    for dataset in (getattr(ds, "file_meta", None), ds):
        if dataset is not None:
            _collect_phi(dataset, found, strictest, inside_removed=False)
    found.discard("")
    return found


def _check_secret(secret: bytes) -> None:
    """Refuse a key short enough to brute-force."""
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"the site secret must be at least {MIN_SECRET_BYTES} bytes, got {len(secret)}")


def _check_pseudonym(pseudonym: str) -> None:
    """A pseudonym must fit PatientID (LO) and PatientName (PN): 1-64 characters, no backslash or control."""
    if not 0 < len(pseudonym) <= 64 or "\\" in pseudonym or any(ord(c) < 32 for c in pseudonym):
        raise ValueError(f"pseudonym {pseudonym!r} must be 1-64 printable characters without a backslash")


def _read_checked(source: Path) -> tuple[Dataset | None, str | None]:
    """Read the file and decode its pixels; (None, reason) if it cannot go on to de-identification."""
    try:
        with warnings.catch_warnings():
            # A damaged file warns on its way to failing; the failure is the message that matters.
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(source)
            # Values are parsed lazily; parse them all now so a malformed one fails here, not mid-way.
            for _ in ds.iterall():
                pass
            _ = ds.pixel_array
    # pydicom raises many exception types on malformed input; each of them means quarantine.
    except Exception as exc:  # noqa: BLE001
        return None, f"{source}: cannot read the DICOM file or decode its pixels ({_reason(exc)}); resend it"
    sop_class = ds.get("SOPClassUID", "")
    if sop_class != CTImageStorage:
        return None, f"{source}: SOP class {sop_class or 'missing'} is not CT Image Storage; only CT is ingested"
    missing = [k for k in ("PatientID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID") if not ds.get(k)]
    if missing:
        return None, f"{source}: no {', '.join(missing)}; the image cannot be linked to its patient and series"
    damaged = [k for k in _LINKING_UIDS if k in ds and not UID(str(ds[k].value)).is_valid]
    if damaged:
        return None, f"{source}: {', '.join(damaged)} is not a valid UID; the file is damaged, resend it"
    if str(ds.get("BurnedInAnnotation", "NO")).upper() == "YES":
        return None, f"{source}: Burned In Annotation is YES; pixel data would need cleaning, which is not offered"
    return ds, None


def _reason(exc: Exception) -> str:
    """An exception as one line of text."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _encoded(ds: Dataset) -> bytes:
    """The dataset as a DICOM file (preamble, file meta, its own transfer syntax)."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _quarantined(source: Path, error: str) -> DicomOutcome:
    """An outcome with no output and the reason."""
    return DicomOutcome(source, None, error, None, None, None)


def _deidentify_in_place(ds: Dataset, *, secret: bytes, pseudonym: str, options: DeidOptions) -> None:
    """Apply the profile to `ds` itself (deidentify works on a copy, deidentify_file on what it just read)."""
    offset = date_offset_days(pseudonym, secret=secret) if options.date_option == "shift" else 0
    cleaner = _Cleaner(secret=secret, actions=_actions_for(options), shift_days=offset, options=options)
    cleaner.clean(ds)
    ds.PatientName = pseudonym
    ds.PatientID = pseudonym
    _mark_deidentified(ds, options)
    ds.preamble = b"\x00" * 128
    ds.filename = None
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        _clean_file_meta(meta)
        if "SOPInstanceUID" in ds:
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID


@functools.lru_cache(maxsize=16)
def _actions_for(options: DeidOptions) -> dict[BaseTag, str]:
    """The action for each table row once the options are applied; C marks a date to shift."""
    actions = {}
    for tag, rule in _RULES.items():
        action = rule.action
        if rule.retained_by == PATIENT_CHARACTERISTICS and options.keep_patient_characteristics:
            action = "K"
        elif rule.retained_by == DEVICE_IDENTITY and options.keep_device_identity:
            action = "K"
        elif rule.retained_by == MODIFIED_DATES and options.date_option == "shift":
            action = "C"
        actions[tag] = action
    return actions


def _unlisted_action(elem: DataElement, options: DeidOptions) -> str:
    """Action for a standard attribute Table E.1-1 does not list, by VR (see the module docstring)."""
    if elem.VR in (VR.PN, VR.AE):
        return "X"
    if elem.VR == VR.UI:
        return "K" if _is_non_instance_uid(elem) else "U"
    if elem.VR in (VR.DA, VR.DT):
        return "C" if options.date_option == "shift" else "X"
    if elem.VR == VR.TM:
        return "K" if options.date_option == "shift" else "X"
    return "K"


def _is_non_instance_uid(elem: DataElement) -> bool:
    """Whether a UI element names a class, syntax or code system rather than an instance."""
    keyword = elem.keyword or ""
    if keyword.endswith("ClassUID") or keyword in _NON_INSTANCE_UID_KEYWORDS:
        return True
    values = _as_list(elem.value)
    return bool(values) and all(str(v).startswith(DICOM_UID_ROOT) for v in values)


def _always_removed(tag: BaseTag) -> bool:
    """Private attributes, group lengths, command elements, overlay planes and curves, whatever the table says."""
    group = tag.group
    return tag.is_private or tag.element == 0 or group == 0 or 0x6000 <= group <= 0x60FF or 0x5000 <= group <= 0x50FF


class _Cleaner:
    """Applies the resolved actions to a dataset and, recursively, to the items of its sequences."""

    def __init__(self, *, secret: bytes, actions: dict[BaseTag, str], shift_days: int, options: DeidOptions) -> None:
        self.secret = secret
        self.actions = actions
        self.shift = datetime.timedelta(days=shift_days)
        self.options = options

    def clean(self, ds: Dataset) -> None:
        """Apply the action of every element of `ds`, descending into the sequences that stay."""
        for tag in list(ds.keys()):
            if _always_removed(tag):
                del ds[tag]
                continue
            elem = ds[tag]
            action = self.actions.get(tag) or _unlisted_action(elem, self.options)
            self.apply(ds, elem, action)

    def apply(self, ds: Dataset, elem: DataElement, action: str) -> None:
        """Carry out one action code on one element."""
        if action == "X":
            del ds[elem.tag]
        elif action == "Z":
            elem.value = Sequence() if elem.VR == VR.SQ else None
        elif action == "D":
            self.dummy(elem)
        elif action == "U":
            elem.value = self.remapped(elem.value)
        elif action == "C":
            self.shift_dates(ds, elem)
        elif elem.VR == VR.SQ:
            for item in elem.value:
                self.clean(item)

    def remapped(self, value: Any) -> Any:
        """Each UID of a single or multiple value replaced by its keyed UID."""
        if isinstance(value, MultiValue | list):
            return [keyed_uid(v, secret=self.secret) for v in value if v]
        return keyed_uid(value, secret=self.secret) if value else value

    def dummy(self, elem: DataElement) -> None:
        """Replace with a non-empty value that fits the VR."""
        if elem.VR == VR.SQ:
            elem.value = Sequence([Dataset()])
        elif elem.VR == VR.UI:
            elem.value = self.remapped(elem.value) or keyed_uid(DUMMY_TEXT, secret=self.secret)
        elif elem.VR in _DUMMY_BY_VR:
            elem.value = _DUMMY_BY_VR[elem.VR]
        elif elem.VR in _NUMERIC_VRS:
            elem.value = 0
        else:
            elem.value = DUMMY_TEXT

    def shift_dates(self, ds: Dataset, elem: DataElement) -> None:
        """Move DA and DT values by the patient's offset; keep TM; anything unshiftable is emptied."""
        if elem.VR == VR.TM:
            return
        if elem.VR not in (VR.DA, VR.DT):
            del ds[elem.tag]  # C for a non-temporal value would need cleaning; removal is stricter
            return
        values = [str(v) for v in _as_list(elem.value)]
        shifted = [_shifted(v, self.shift) for v in values]
        if any(s is None for s in shifted):
            elem.value = None  # a partial or malformed date cannot be shifted, so it must not stay
        elif values:
            elem.value = shifted if len(shifted) > 1 else shifted[0]


def _shifted(value: str, shift: datetime.timedelta) -> str | None:
    """A DA or DT value with its date moved by `shift`, the rest kept; None if it has no full date."""
    value = value.strip()
    if len(value) < 8 or not value[:8].isdigit():
        return None
    try:
        day = datetime.datetime.strptime(value[:8], "%Y%m%d").date() + shift
    except (ValueError, OverflowError):
        return None
    return f"{day.year:04d}{day.month:02d}{day.day:02d}{value[8:]}"


def _as_list(value: Any) -> list[Any]:
    """A single or multiple element value as a list (empty for an empty value)."""
    if value is None or value == "":
        return []
    if isinstance(value, MultiValue | list | tuple):
        return list(value)
    return [value]


def _mark_deidentified(ds: Dataset, options: DeidOptions) -> None:
    """Write the 0012 markers and (0028,0303), adding to any method recorded by an earlier de-identification."""
    names = options.method_names()
    ds.PatientIdentityRemoved = "YES"
    earlier = [str(v) for v in _as_list(ds.get("DeidentificationMethod", ""))]
    ds.DeidentificationMethod = [*earlier, "PS3.15 E.1-1 " + BASIC_PROFILE, *names[1:]]
    codes = Sequence(ds.get("DeidentificationMethodCodeSequence", Sequence()))
    for name in names:
        code = Dataset()
        code.CodeValue = _METHOD_CODES[name]
        code.CodingSchemeDesignator = "DCM"
        code.CodeMeaning = name
        codes.append(code)
    ds.DeidentificationMethodCodeSequence = codes
    ds.LongitudinalTemporalInformationModified = "MODIFIED" if options.date_option == "shift" else "REMOVED"


def _clean_file_meta(meta: Dataset) -> None:
    """Drop sender AE titles and private information; record pydicom as the implementation that wrote the file."""
    for keyword in _FILE_META_REMOVED:
        if keyword in meta:
            delattr(meta, keyword)
    for tag in _FILE_META_REMOVED_TAGS:
        if tag in meta:
            del meta[tag]
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"PYDICOM {pydicom.__version__}"[:16]


def _collect_phi(ds: Dataset, found: set[str], strictest: DeidOptions, *, inside_removed: bool) -> None:
    """Add the identifying values of `ds` to `found`; everything textual counts inside a removed sequence."""
    actions = _actions_for(strictest)
    for elem in ds:
        tag = elem.tag
        rule = _RULES.get(tag)
        characteristic = rule is not None and rule.retained_by == PATIENT_CHARACTERISTICS
        if _always_removed(tag):
            identifying = tag.element != 0  # a group length holds a number, not PHI
        else:
            identifying = (actions.get(tag) or _unlisted_action(elem, strictest)) != "K" and not characteristic
        if elem.VR == VR.SQ:
            for item in elem.value or ():
                _collect_phi(item, found, strictest, inside_removed=inside_removed or identifying)
        elif identifying or (inside_removed and elem.VR in _IDENTIFYING_TEXT_VRS):
            found.update(_texts(elem))
        elif inside_removed and elem.VR == VR.UI and not _is_non_instance_uid(elem):
            found.update(_texts(elem))


_PRINTABLE_RUN = re.compile(r"[^\x00-\x1f\x7f]+")


def _texts(elem: DataElement) -> Iterator[str]:
    """The element's values as stripped strings; a name also by component, bytes as their printable runs."""
    for value in _as_list(elem.value):
        if isinstance(value, bytes):
            text = _decode(value)
            yield from (run.strip() for run in _PRINTABLE_RUN.findall(text))
            continue
        if isinstance(value, str | PersonName):
            text = str(value).strip()
            yield text
            if elem.VR == VR.PN:
                yield from (part.strip() for part in re.split(r"[\^=]", text) if part.strip())


def _decode(value: bytes) -> str:
    """Bytes of an undecoded (UN or private) value as text: UTF-8 if it is, else Latin-1."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")

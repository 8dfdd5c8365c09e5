"""De-identification of everything that leaves the clinic, to the DICOM PS3.15 Annex E Basic
Application Level Confidentiality Profile (docs/privacy.md says what leaves and what stays).

The plan (:func:`deidentify_dataset`) is walked element by element, nested sequences and
private elements included, and each element gets the first rule that applies:

1. a private element (odd group) is removed: the *Retain Safe Private* option is **not**
   applied (no engine reads private elements, and which are "safe" is vendor knowledge);
2. a keyword of :data:`ACTIONS` (the rows of PS3.15 Table E.1-1 that occur in RT objects) gets
   its action: ``X`` remove, ``Z`` empty, ``D`` a dummy value, ``U`` a mapped UID;
3. every other person name (VR ``PN``) is emptied and every other free text (``LT``, ``ST``,
   ``UT``) removed: the table lists each one that is defined, and these VRs carry nothing a
   dose calculation needs;
4. every other UID that is not a DICOM-defined one (``1.2.840.10008.*``: SOP classes,
   transfer syntaxes) is mapped;
5. every date, time and date-time (``DA``, ``TM``, ``DT``) is emptied: the *Retain
   Longitudinal Temporal Information* option is **not** applied.

UIDs are mapped with a keyed hash (HMAC-SHA-256 of a key that never leaves the host, written
``2.25.<decimal>``), so one UID always maps to the same new UID, references between objects
stay consistent, and nobody without the key can tell the original. Identifiers get keyed
pseudonyms (``MQI`` + 12 hex digits) the same way. :class:`Pseudonymizer` records every
mapping it made so that the host can keep them (locally) and map results back.

Delivery folders: PlanInfo.txt and PlanRange.txt are rewritten by an allowlist of keys and
columns (everything else dropped), their identifiers replaced by the same pseudonyms and UIDs
as the plan's, and machine-log file names (``<room>_<patient id>_<plan>_<field>_<layer>.ptn``)
renamed so that no patient id is left in them (:func:`delivery_file_name`).
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import os
import re
from pathlib import Path
from typing import Any, Optional

#: PS3.15 Table E.1-1 (Basic Profile) rows for attributes that occur in RT Ion Plans and the
#: objects around them: X remove, Z empty (zero length), D dummy value, U mapped UID. Where the
#: table gives a choice by IOD type (X/Z, Z/D, X/Z/D) the strictest action an RT Ion Plan
#: allows is used; VR rules (module docstring) cover person names, UIDs and dates not listed.
ACTIONS: dict[str, str] = {
    # patient
    "PatientName": "D", "PatientID": "D", "PatientBirthDate": "Z", "PatientSex": "Z", "PatientAge": "X",
    "PatientSize": "X", "PatientWeight": "X", "PatientBirthTime": "X", "PatientBirthName": "X",
    "PatientMotherBirthName": "X", "PatientAddress": "X", "PatientTelephoneNumbers": "X",
    "PatientComments": "X", "OtherPatientIDs": "X", "OtherPatientIDsSequence": "X", "OtherPatientNames": "X",
    "IssuerOfPatientID": "X", "MedicalRecordLocator": "X", "MilitaryRank": "X", "BranchOfService": "X",
    "EthnicGroup": "X", "Occupation": "X", "PatientReligiousPreference": "X", "AdditionalPatientHistory": "X",
    "CountryOfResidence": "X", "RegionOfResidence": "X", "PatientInsurancePlanCodeSequence": "X",
    "PatientPrimaryLanguageCodeSequence": "X", "MedicalAlerts": "X", "Allergies": "X", "SmokingStatus": "X",
    "PregnancyStatus": "X", "LastMenstrualDate": "X", "SpecialNeeds": "X", "PatientState": "X",
    "ResponsiblePerson": "X", "ResponsibleOrganization": "X", "PatientSexNeutered": "X",
    "ReferencedPatientSequence": "X", "ReferencedPatientPhotoSequence": "X", "PatientTransportArrangements": "X",
    "InsurancePlanIdentification": "X", "PatientIdentityRemoved": "X", "DeidentificationMethod": "X",
    # study, visit, request
    "StudyID": "Z", "AccessionNumber": "Z", "StudyDescription": "X", "StudyComments": "X",
    "ReferringPhysicianName": "Z", "ReferringPhysicianAddress": "X", "ReferringPhysicianTelephoneNumbers": "X",
    "ReferringPhysicianIdentificationSequence": "X", "PhysiciansOfRecord": "X",
    "PhysiciansOfRecordIdentificationSequence": "X", "NameOfPhysiciansReadingStudy": "X",
    "PhysiciansReadingStudyIdentificationSequence": "X", "RequestingPhysician": "X", "RequestingService": "X",
    "RequestAttributesSequence": "X", "RequestedProcedureID": "X", "RequestedProcedureDescription": "X",
    "ScheduledProcedureStepID": "X", "ScheduledProcedureStepDescription": "X", "PerformedProcedureStepID": "X",
    "PerformedProcedureStepDescription": "X", "ReasonForStudy": "X", "AdmissionID": "X", "AdmittingDiagnosesDescription": "X",
    "AdmittingDiagnosesCodeSequence": "X", "ReferencedStudySequence": "X", "ReferencedPerformedProcedureStepSequence": "X",
    "ProcedureCodeSequence": "X", "CurrentPatientLocation": "X", "ServiceEpisodeID": "X",
    "ServiceEpisodeDescription": "X", "IssuerOfAdmissionIDSequence": "X", "OrderPlacerIdentifierSequence": "X",
    "OrderFillerIdentifierSequence": "X", "PlacerOrderNumberImagingServiceRequest": "X",
    "FillerOrderNumberImagingServiceRequest": "X", "ConsultingPhysicianName": "X",
    # series, equipment, staff
    "SeriesDescription": "X", "ProtocolName": "X", "OperatorsName": "X", "OperatorIdentificationSequence": "X",
    "PerformingPhysicianName": "X", "PerformingPhysicianIdentificationSequence": "X", "InstitutionName": "X",
    "InstitutionAddress": "X", "InstitutionalDepartmentName": "X", "InstitutionCodeSequence": "X",
    "StationName": "X", "DeviceSerialNumber": "X", "DeviceUID": "U", "DeviceDescription": "X",
    "PlateID": "X", "GantryID": "X", "CassetteID": "X", "DetectorID": "X", "ModifiedAttributesSequence": "X",
    "OriginalAttributesSequence": "X", "ReviewerName": "X", "ReviewDate": "X", "ReviewTime": "X",
    "ContributingEquipmentSequence": "X", "ImageComments": "X", "TextComments": "X", "TextString": "X",
    "ContentSequence": "X", "PersonName": "X", "PersonAddress": "X", "PersonTelephoneNumbers": "X",
    "VerifyingObserverName": "X", "VerifyingObserverSequence": "X", "VerifyingOrganization": "X",
    "AuthorObserverSequence": "X", "ParticipantSequence": "X", "CustodialOrganizationSequence": "X",
    "InstanceCreatorUID": "U", "StorageMediaFileSetUID": "U", "IrradiationEventUID": "U",
    # RT plan and what it references
    "RTPlanLabel": "D", "RTPlanName": "X", "RTPlanDescription": "X", "PrescriptionDescription": "X",
    "FractionGroupDescription": "X", "DoseReferenceDescription": "X", "BeamDescription": "X",
    "SetupTechniqueDescription": "X", "SetupDeviceDescription": "X", "FixationDeviceDescription": "X",
    "ShieldingDeviceDescription": "X", "PatientSetupLabel": "X", "TreatmentSites": "X",
    "TreatmentSiteCodeSequence": "X", "RoleName": "X", "ApprovalSequence": "X",
    "StructureSetLabel": "D", "StructureSetName": "X", "StructureSetDescription": "X", "ROIName": "X",
    "ROIDescription": "X", "ROIInterpreter": "X", "RTROIInterpretedType": "X", "DerivationDescription": "X",
    "AcquisitionComments": "X", "AcquisitionDeviceProcessingDescription": "X", "PerformedLocation": "X",
    "ScheduledStudyLocation": "X", "ScheduledStudyLocationAETitle": "X", "ScheduledPerformingPhysicianName": "X",
    "DischargeDiagnosisDescription": "X", "InterpretationText": "X", "InterpretationAuthor": "X",
    "InterpretationRecorder": "X", "InterpretationTranscriber": "X", "InterpretationApproverSequence": "X",
    "IconImageSequence": "X", "SourceImageSequence": "X", "ReferencedImageSequence": "X",
    # ReferencedFrameOfReferenceSequence is walked, not removed: it holds only UIDs (mapped by
    # rule 4) and is what ties an RTSTRUCT to its CT
}

#: VRs handled by rules 3 and 5 (module docstring).
FREE_TEXT_VRS = ("LT", "ST", "UT")
TEMPORAL_VRS = ("DA", "TM", "DT")
DICOM_DEFINED_UID_ROOT = "1.2.840.10008."

#: The PS3.16 CID 7050 code written into DeidentificationMethodCodeSequence.
BASIC_PROFILE_CODE = ("113100", "DCM", "Basic Application Confidentiality Profile")
METHOD = "mqi-moqui: PS3.15 E.1 Basic Profile, UIDs keyed"

#: PlanInfo.txt keys that are kept; identifiers among them are replaced (others are dropped).
PLAN_INFO_KEEP = ("DICOM_BEAM_NUMBER", "DICOM_BEAM_NAME", "TCSC_MACHINE", "TCSC_FIELD_NO", "TCSC_PLAN_NO",
                  "TCSC_GANTRY_ANGLE", "TCSC_SNOUT", "TCSC_RANGE_SHIFTER", "TCSC_LAYER_COUNT",
                  "START_LAYER_NUMBER", "STOP_LAYER_NUMBER")
PLAN_INFO_PSEUDONYM = ("DICOM_PATIENT_ID", "TCSC_PATIENT_ID")
PLAN_INFO_UID = ("DICOM_STUDY_INS_UID", "DICOM_RTPLAN_UID", "DICOM_SOP_INS_UID")
PLAN_INFO_LABEL = ("DICOM_RTPLAN_LABEL",)

#: PlanRange.txt columns that are kept (others dropped); file-name columns are renamed.
PLAN_RANGE_KEEP = ("LAYER_NO", "LAYER_ENERGY", "FLD_NO", "DOSE1_RANGE", "DOSE2_RANGE", "PLAN_DOSE1_RANGE",
                   "PLAN_DOSE2_RANGE")
PLAN_RANGE_PSEUDONYM = ("PATIENT_ID",)
PLAN_RANGE_FILES = ("SCAN_OUT_FL_NM", "PLAN_SCAN_OUT_FL_NM")

#: ``<room>_<patient id>_<plan>_<field>_<layer>.<ext>``: the machine's log file names.
_LOG_NAME = re.compile(r"^(?P<room>[A-Za-z0-9]{1,8})_(?P<patient>.+)_(?P<plan>\d{1,4})_(?P<field>\d{1,4})_"
                       r"(?P<layer>\d{1,4})\.(?P<ext>ptn|mgn)$", re.IGNORECASE)


_SAFE_SUFFIX = re.compile(r"\.[a-z0-9]{1,8}")


class Pseudonymizer:
    """Keyed, consistent replacements: :meth:`uid` for UIDs, :meth:`pseudonym` for identifiers.

    ``mapping`` records every replacement made (new value → original) so that the host can
    keep it locally (never uploaded) and map returned results back to the clinic's objects.
    """

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("the de-identification key must be at least 16 bytes")
        self._key = key
        self.mapping: dict[str, str] = {}

    def _digest(self, kind: str, value: str) -> bytes:
        return hmac.new(self._key, f"{kind}\0{value}".encode("utf-8", "surrogateescape"), hashlib.sha256).digest()

    def uid(self, original: str) -> str:
        """``2.25.<128-bit decimal>`` (PS3.5 B.2), the same for the same ``original``."""
        original = original.strip().rstrip("\0")
        if not original:
            return original
        new = "2.25." + str(int.from_bytes(self._digest("uid", original)[:16], "big"))
        self.mapping[new] = original
        return new

    def pseudonym(self, original: str) -> str:
        """``MQI`` + 12 hex digits, the same for the same identifier."""
        original = original.strip()
        if not original:
            return original
        new = "MQI" + self._digest("id", original)[:6].hex().upper()
        self.mapping[new] = original
        return new


def load_key(folder: Path) -> bytes:
    """The workspace's de-identification key (``folder/key``, 32 random bytes, mode 0600),
    created on first use. It never leaves the host: without it no mapping can be reversed."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = folder / "key"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes()
    try:
        os.write(fd, os.urandom(32))
        os.fsync(fd)
    finally:
        os.close(fd)
    return path.read_bytes()


# ------------------------------------------------------------------------------ the plan


def _dummy(element: Any, pseudo: Pseudonymizer) -> Any:
    if element.VR == "PN":
        return "ANONYMOUS"
    if element.keyword in ("PatientID",):
        return pseudo.pseudonym(str(element.value or ""))
    if element.VR in TEMPORAL_VRS:
        return ""
    return "ANONYMIZED"[: 16 if element.VR == "SH" else 64]


def _action(element: Any) -> Optional[str]:
    if element.tag.is_private:
        return "X"
    action = ACTIONS.get(element.keyword)
    if action:
        return action
    if element.VR == "PN":
        return "Z"
    if element.VR in FREE_TEXT_VRS:
        return "X"
    if element.VR == "UI":
        return "U"
    if element.VR in TEMPORAL_VRS:
        return "Z"
    return None


def _map_uids(element: Any, pseudo: Pseudonymizer) -> None:
    values = element.value if element.VM > 1 else [element.value]
    mapped = [v if not v or str(v).startswith(DICOM_DEFINED_UID_ROOT) else pseudo.uid(str(v)) for v in values]
    element.value = mapped if element.VM > 1 else mapped[0]


def _walk(ds: Any, pseudo: Pseudonymizer) -> None:
    for element in list(ds):
        action = _action(element)
        if action == "X":
            del ds[element.tag]
        elif action == "Z":
            element.value = [] if element.VR == "SQ" else ""
        elif action == "D":
            element.value = _dummy(element, pseudo)
        elif action == "U":
            if element.VR == "UI" and element.value:
                _map_uids(element, pseudo)
            elif element.VR != "UI":
                element.value = ""
        elif element.VR == "SQ":
            for item in element.value:
                _walk(item, pseudo)


def deidentify_dataset(ds: Any, pseudo: Pseudonymizer) -> None:
    """De-identify a pydicom dataset in place (rules in the module docstring) and record it:
    ``PatientIdentityRemoved YES``, ``DeidentificationMethod``, its code sequence and
    ``LongitudinalTemporalInformationModified REMOVED``; the file meta's Media Storage SOP
    Instance UID follows the new SOP Instance UID."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    _walk(ds, pseudo)
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = METHOD
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = BASIC_PROFILE_CODE
    ds.DeidentificationMethodCodeSequence = Sequence([code])
    ds.LongitudinalTemporalInformationModified = "REMOVED"
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "SOPInstanceUID" in ds:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID


# ------------------------------------------------------------------------------ delivery files


def _decode(data: bytes) -> tuple[str, bool]:
    bom = data.startswith(b"\xef\xbb\xbf")
    return (data[3:] if bom else data).decode("utf-8", errors="surrogateescape"), bom


def _encode(text: str, bom: bool) -> bytes:
    data = text.encode("utf-8", errors="surrogateescape")
    return b"\xef\xbb\xbf" + data if bom else data


def deidentify_plan_info(data: bytes, pseudo: Pseudonymizer) -> bytes:
    """PlanInfo.txt (``KEY,VALUE`` lines) with only the keys of :data:`PLAN_INFO_KEEP` and the
    identifiers (patient ids pseudonymised, UIDs mapped as in the plan, the plan label
    replaced); every other line is dropped. Line endings and a BOM are kept."""
    text, bom = _decode(data)
    out = []
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\r\n")
        ending = line[len(body):] or "\n"
        key, sep, value = body.partition(",")
        name = key.strip().upper()
        if not sep:
            continue
        if name in PLAN_INFO_PSEUDONYM:
            value = pseudo.pseudonym(value)
        elif name in PLAN_INFO_UID:
            value = pseudo.uid(value)
        elif name in PLAN_INFO_LABEL:
            value = "ANONYMIZED"
        elif name not in PLAN_INFO_KEEP:
            continue
        out.append(f"{key},{value}{ending}")
    return _encode("".join(out), bom)


def delivery_file_name(name: str, pseudo: Pseudonymizer, index: int) -> str:
    """A machine-log file's name without the patient id: ``G1_<pseudonym>_<plan>_<field>_<layer>.ptn``
    for the machine's naming, ``log_<index>.<ext>`` for any other name (the extension kept)."""
    match = _LOG_NAME.match(name)
    if match:
        return (f"{match['room']}_{pseudo.pseudonym(match['patient'])}_{match['plan']}_{match['field']}_"
                f"{match['layer']}.{match['ext']}")
    ext = Path(name).suffix.lower()
    if not _SAFE_SUFFIX.fullmatch(ext):
        ext = ""
    return f"log_{index:04d}{ext}"


def deidentify_plan_range(data: bytes, pseudo: Pseudonymizer, renamed: dict[str, str]) -> bytes:
    """PlanRange.txt (CSV with a header) with only the columns of :data:`PLAN_RANGE_KEEP`, the
    patient id pseudonymised and the file-name columns renamed as ``renamed`` (old → new
    name) renamed the files; a file name not copied is emptied."""
    text, bom = _decode(data)
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return _encode("", bom)
    header = [h.strip().upper() for h in rows[0]]
    keep = [i for i, h in enumerate(header) if h in PLAN_RANGE_KEEP + PLAN_RANGE_PSEUDONYM + PLAN_RANGE_FILES]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n" if "\r\n" in text else "\n")
    writer.writerow([rows[0][i].strip() for i in keep])
    for row in rows[1:]:
        cells = []
        for i in keep:
            value = row[i].strip() if i < len(row) else ""
            if header[i] in PLAN_RANGE_PSEUDONYM:
                value = pseudo.pseudonym(value)
            elif header[i] in PLAN_RANGE_FILES:
                value = renamed.get(Path(value.replace("\\", "/")).name, "")
            cells.append(value)
        writer.writerow(cells)
    return _encode(out.getvalue(), bom)

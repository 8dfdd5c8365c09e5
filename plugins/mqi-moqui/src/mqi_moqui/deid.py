"""De-identification of what leaves the clinic: the RT Ion Plan's patient identifiers and the
``*PATIENT*`` values of PlanInfo.txt."""

from __future__ import annotations

from typing import Any

ANON = "ANON"

#: Top-level attributes replaced by ``ANON`` (identifiers) or blanked/removed on de-identification.
DEID_REPLACE = ("PatientName", "PatientID")
DEID_REMOVE = (
    "PatientBirthDate", "PatientBirthTime", "OtherPatientIDs", "OtherPatientIDsSequence", "OtherPatientNames",
    "PatientBirthName", "PatientMotherBirthName", "PatientAddress", "PatientTelephoneNumbers",
    "MedicalRecordLocator", "IssuerOfPatientID", "PatientComments", "MilitaryRank", "EthnicGroup",
    "PatientInsurancePlanCodeSequence", "ReferencedPatientSequence", "ResponsiblePerson",
    "AdditionalPatientHistory", "CountryOfResidence", "RegionOfResidence",
)


def deidentify_plan_info(data: bytes) -> bytes:
    """Return PlanInfo.txt with the value of every ``*PATIENT*`` key replaced by ``ANON``
    (line endings, BOM and other lines kept as they are)."""
    bom = data.startswith(b"\xef\xbb\xbf")
    text = data[3:].decode("utf-8", errors="surrogateescape") if bom else data.decode("utf-8", errors="surrogateescape")
    out = []
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\r\n")
        ending = line[len(body):]
        key, sep, _ = body.partition(",")
        if sep and "PATIENT" in key.strip().upper():
            body = f"{key},{ANON}"
        out.append(body + ending)
    result = "".join(out).encode("utf-8", errors="surrogateescape")
    return (b"\xef\xbb\xbf" + result) if bom else result


def deidentify_dataset(ds: Any) -> None:
    """Replace or remove the patient identifiers of a pydicom dataset (top level), in place."""
    for keyword in DEID_REPLACE:
        if keyword in ds:
            setattr(ds, keyword, ANON)
    for keyword in DEID_REMOVE:
        if keyword in ds:
            delattr(ds, keyword)

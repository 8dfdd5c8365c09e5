"""Finding and reading the RT Ion Plan of a case folder with pydicom (imported lazily, so
that loading the plugin stays cheap), and saving a dataset on every supported pydicom."""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Any, Iterator

from mqi_framework.protocols import CaseRejected

RT_ION_PLAN_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.8"
RT_PLAN_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.5"  # photon/electron RT Plan: not for Moqui


def find_plan_file(case_dir: Path) -> Path:
    candidates = sorted(
        entry for entry in case_dir.iterdir()
        if entry.name.upper().startswith("RP") and entry.name.lower().endswith(".dcm")
        and not entry.is_symlink() and entry.is_file()
    )
    if not candidates:
        raise CaseRejected(
            "no RT Ion Plan (RP*.dcm) in the case folder; export the plan from the TPS as RP<...>.dcm "
            "into the top of the case folder, then retry the case"
        )
    if len(candidates) > 1:
        raise CaseRejected(
            f"{len(candidates)} files match RP*.dcm in the case folder, expected exactly one RT Ion Plan; "
            "keep only the plan that was delivered, then retry the case"
        )
    return candidates[0]


@contextlib.contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Silence pydicom's warnings and log lines while reading: they carry the file path, and the
    case folder name may be a patient identifier."""
    logger = logging.getLogger("pydicom")
    was_disabled = logger.disabled
    logger.disabled = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.disabled = was_disabled


def read_plan(path: Path) -> Any:
    """Read ``path`` with pydicom and check that it is an RT Ion Plan; raise CaseRejected otherwise."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with quiet_pydicom():
            ds = pydicom.dcmread(str(path))
    except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise CaseRejected(
            f"the RT Ion Plan file (RP*.dcm) is not readable DICOM ({type(exc).__name__}); "
            "export the plan again from the TPS, then retry the case"
        ) from None
    except Exception as exc:  # pydicom raises a zoo of errors on corrupt files
        raise CaseRejected(
            f"the RT Ion Plan file (RP*.dcm) could not be read ({type(exc).__name__}); "
            "export the plan again from the TPS, then retry the case"
        ) from None
    meta = getattr(ds, "file_meta", None)
    sop_class = str(ds.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta else ""))
    modality = str(ds.get("Modality", ""))
    if sop_class == RT_PLAN_SOP_CLASS:
        raise CaseRejected(
            "the RP*.dcm file is a photon/electron RT Plan, not an RT Ion Plan "
            f"(SOP class {RT_PLAN_SOP_CLASS}); Moqui needs the proton plan (SOP class {RT_ION_PLAN_SOP_CLASS})"
        )
    if sop_class != RT_ION_PLAN_SOP_CLASS or modality != "RTPLAN":
        raise CaseRejected(
            f"the RP*.dcm file is not an RT Ion Plan: expected Modality RTPLAN and SOP class "
            f"{RT_ION_PLAN_SOP_CLASS}, found Modality {modality or '(none)'} and SOP class {sop_class or '(none)'}; "
            "export the RT Ion Plan from the TPS, then retry the case"
        )
    return ds


def save_dataset(ds: Any, target: Any) -> None:
    """``ds.save_as`` for pydicom 2.4 and 3.x, keeping the file meta and transfer syntax."""
    try:
        ds.save_as(target, enforce_file_format=True)
    except TypeError:  # pydicom 2.x
        ds.save_as(target, write_like_original=False)

"""Finding (by content) and reading the RT Ion Plan of a case folder with pydicom (imported lazily, so
that loading the plugin stays cheap), and saving a dataset on every supported pydicom."""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

from mqi_framework.protocols import CaseRejected

RT_ION_PLAN_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.8"
RT_PLAN_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.5"  # photon/electron RT Plan: not for Moqui


#: top-level files of a case folder that are never DICOM
_NOT_DICOM = {"planinfo.txt", "_case_ready"}


def display_name(name: str) -> str:
    """A file name as it may appear in a message: escaped (no control characters) and short."""
    shown = ascii(name)[1:-1]
    return shown if len(shown) <= 80 else shown[:77] + "..."


def looks_like_dicom(path: Path) -> bool:
    """A DICOM Part 10 file (``DICM`` after the 128-byte preamble) or a ``.dcm`` name."""
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def _sop_class(path: Path) -> str:
    """The SOP Class UID of a DICOM file (header only); raises on a file pydicom cannot read."""
    import pydicom

    with quiet_pydicom():
        # defer_size: a CT, an RT Dose or a hostile file is looked at without loading its values
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, force=True, defer_size=1024,
                             specific_tags=["SOPClassUID", "Modality"])
    meta = getattr(ds, "file_meta", None)
    sop = str(ds.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta else ""))
    if not sop:
        raise ValueError("no SOP Class UID")
    return sop


def find_plan_file(case_dir: Path) -> Path:
    """The case's RT Ion Plan, found by content (SOP Class UID), whatever its name: Eclipse
    and ARIA export ``RN<uid>.dcm``, RayStation ``RP*.dcm``, people anything. Exactly one
    must be at the top of the case folder; a photon plan, a second ion plan or a ``.dcm``
    file that is not readable DICOM is a rejection that names the file."""
    plans, photon, unreadable, others = [], [], [], 0
    for entry in sorted(case_dir.iterdir(), key=lambda e: e.name):
        if entry.name.lower() in _NOT_DICOM or entry.is_symlink() or not entry.is_file():
            continue
        if not looks_like_dicom(entry):
            continue
        try:
            sop = _sop_class(entry)
        except Exception:  # noqa: BLE001 - whatever pydicom raises, the file is not usable
            unreadable.append(entry)
            continue
        if sop == RT_ION_PLAN_SOP_CLASS:
            plans.append(entry)
        elif sop == RT_PLAN_SOP_CLASS:
            photon.append(entry)
        else:
            others += 1
    if unreadable:
        raise CaseRejected(
            f"{display_name(unreadable[0].name)} in the case folder is not readable DICOM"
            + (f" ({len(unreadable) - 1} more such file(s))" if len(unreadable) > 1 else "")
            + "; export it again from the TPS or remove it, then retry the case")
    if len(plans) > 1:
        raise CaseRejected(
            f"{len(plans)} RT Ion Plans in the case folder ({', '.join(display_name(p.name) for p in plans[:4])}), "
            "expected exactly one; keep only the plan that was delivered, then retry the case")
    if plans:
        return plans[0]
    if photon:
        raise CaseRejected(
            f"{display_name(photon[0].name)} is a photon/electron RT Plan (SOP class {RT_PLAN_SOP_CLASS}), not an "
            f"RT Ion Plan; Moqui needs the proton plan (SOP class {RT_ION_PLAN_SOP_CLASS})")
    found = f" ({others} other DICOM file(s): CT, structures or doses)" if others else ""
    raise CaseRejected(
        f"no RT Ion Plan in the case folder{found}; export the plan (any file name, e.g. RN<...>.dcm) from "
        "the TPS into the top of the case folder, then retry the case")


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


#: the plan file and its single elements may be at most this big unless settings say otherwise
MAX_PLAN_BYTES = 128 * 1024**2
MAX_ELEMENT_BYTES = 16 * 1024**2


def read_plan(path: Path, *, max_bytes: int = MAX_PLAN_BYTES, max_element_bytes: int = MAX_ELEMENT_BYTES) -> Any:
    """Read ``path`` with pydicom and check that it is an RT Ion Plan; raise CaseRejected
    otherwise. A file over ``max_bytes`` (apparent size) is refused before it is parsed, and
    one holding an element over ``max_element_bytes`` (a 1 GiB private blob) before that
    element is loaded: values that big are deferred by pydicom and only their lengths read."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    from mqi_framework.toolkit import human_bytes

    size = path.stat().st_size
    if max_bytes and size > max_bytes:
        raise CaseRejected(
            f"the RT Ion Plan file {display_name(path.name)} is {human_bytes(size)}, over the limit of "
            f"{human_bytes(max_bytes)} (max_plan_bytes; real plans are a few MiB); export the plan again "
            "from the TPS, or raise the limit, then retry the case")
    try:
        with quiet_pydicom():
            ds = pydicom.dcmread(str(path), defer_size=max_element_bytes or None)
            oversized = _oversized_element(ds, max_element_bytes) if max_element_bytes else None
    except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise CaseRejected(
            f"the RT Ion Plan file {display_name(path.name)} is not readable DICOM ({type(exc).__name__}); "
            "export the plan again from the TPS, then retry the case"
        ) from None
    except Exception as exc:  # pydicom raises a zoo of errors on corrupt files
        raise CaseRejected(
            f"the RT Ion Plan file {display_name(path.name)} could not be read ({type(exc).__name__}); "
            "export the plan again from the TPS, then retry the case"
        ) from None
    if oversized is not None:
        tag, length = oversized
        raise CaseRejected(
            f"the RT Ion Plan file {display_name(path.name)} holds an element {tag} of {human_bytes(length)}, over "
            f"the limit of {human_bytes(max_element_bytes)} (max_element_bytes); export the plan again from the "
            "TPS, or raise the limit, then retry the case")
    meta = getattr(ds, "file_meta", None)
    sop_class = str(ds.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta else ""))
    modality = str(ds.get("Modality", ""))
    if sop_class == RT_PLAN_SOP_CLASS:
        raise CaseRejected(
            f"{display_name(path.name)} is a photon/electron RT Plan, not an RT Ion Plan "
            f"(SOP class {RT_PLAN_SOP_CLASS}); Moqui needs the proton plan (SOP class {RT_ION_PLAN_SOP_CLASS})"
        )
    if sop_class != RT_ION_PLAN_SOP_CLASS or modality != "RTPLAN":
        raise CaseRejected(
            f"{display_name(path.name)} is not an RT Ion Plan: expected Modality RTPLAN and SOP class "
            f"{RT_ION_PLAN_SOP_CLASS}, found Modality {modality or '(none)'} and SOP class {sop_class or '(none)'}; "
            "export the RT Ion Plan from the TPS, then retry the case"
        )
    return ds


def _oversized_element(ds: Any, limit: int) -> Optional[tuple[str, int]]:
    """The first element (tag, length) anywhere in ``ds`` whose value is over ``limit``
    bytes, read from the raw lengths so that a deferred value is never loaded."""
    stack = [ds]
    while stack:
        current = stack.pop()
        for tag in sorted(current.keys()):
            raw = _raw_element(current, tag)
            length = getattr(raw, "length", None)
            if getattr(raw, "VR", None) == "SQ" or (length is None and isinstance(raw.value, list)):
                value = current[raw.tag].value  # a sequence: its items are read (bounded by the file size)
                stack.extend(item for item in (value or []) if hasattr(item, "elements"))
                continue
            if length is None:
                value = raw.value
                length = len(value) if isinstance(value, (bytes, str)) else 0
            if length != 0xFFFFFFFF and length > limit:
                return f"({raw.tag.group:04X},{raw.tag.element:04X})", length
    return None


def _raw_element(ds: Any, tag: Any) -> Any:
    """The element at ``tag`` as read (a RawDataElement when not converted yet), without
    performing a deferred read of its value."""
    try:
        return ds.get_item(tag, keep_deferred=True)
    except TypeError:  # pydicom 2.x has no keep_deferred, and its get_item reads the value
        return ds._dict[tag]


def save_dataset(ds: Any, target: Any) -> None:
    """``ds.save_as`` for pydicom 2.4 and 3.x, keeping the file meta and transfer syntax."""
    try:
        ds.save_as(target, enforce_file_format=True)
    except TypeError:  # pydicom 2.x
        ds.save_as(target, write_like_original=False)

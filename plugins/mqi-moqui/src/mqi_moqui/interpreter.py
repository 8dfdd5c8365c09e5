"""The ``moqui`` interpreter: RT Ion Plan + delivery folders → beams → ``moqui_tps_<n>.in``.

Case folder (docs: DESIGN.md section 2)::

    <case>/<any name>.dcm           exactly one RT Ion Plan, found by its SOP class (RN*.dcm, RP*.dcm, ...)
    <case>/<delivery>/PlanInfo.txt  KEY,VALUE lines; DICOM_BEAM_NUMBER maps the folder to a beam
    <case>/<delivery>/*.ptn, *.mgn  machine logs, copied as they are

Staging tree written by :meth:`MoquiInterpreter.prepare` (uploaded to ``remote_dir``)::

    dicom/RTPLAN.dcm                 the plan (de-identified unless ``deidentify: false``)
    beams/<n>/logs/...               the delivery folder of beam n (PlanInfo.txt de-identified)
    beams/<n>/moqui_tps_<n>.in       Moqui input, paths pointing into remote_dir

Reading the plan is :mod:`mqi_moqui.rtplan`, de-identification :mod:`mqi_moqui.deid`, judging
the engine's log :mod:`mqi_moqui.logjudge`; pydicom is imported lazily so that loading the
plugin stays cheap.
"""

# No ``from __future__ import annotations`` here: cattrs structures MoquiSettings from its
# real (evaluated) annotations.

import logging
import os
import posixpath
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal, Optional

import attrs

from mqi_framework.protocols import BeamPlan, CasePlan, CaseRejected, Interpreter, LogVerdict
from mqi_framework.toolkit import write_atomic

from mqi_moqui.deid import deidentify_dataset, deidentify_plan_info
from mqi_moqui.logjudge import judge_log
from mqi_moqui.plancheck import check_plan, required_beams
from mqi_moqui.rtplan import find_plan_file, read_plan, save_dataset

log = logging.getLogger(__name__)

PLAN_INFO = "PlanInfo.txt"
BEAM_NUMBER_KEY = "DICOM_BEAM_NUMBER"
PATIENT_ID_KEY = "DICOM_PATIENT_ID"
STUDY_UID_KEY = "DICOM_STUDY_INS_UID"
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


def _check_extra_keys(instance: Any, attribute: Any, value: dict) -> None:
    for key, val in value.items():
        if not isinstance(key, str) or not _KEY.match(key):
            raise ValueError(f"extra_keys: {key!r} is not a Moqui key (letters, digits, _ . -; no spaces)")
        if "\n" in str(val) or "\r" in str(val):
            raise ValueError(f"extra_keys.{key}: the value must be one line")


@attrs.frozen
class MoquiSettings:
    """``workers.<prepare>.settings`` of the ``moqui`` interpreter."""

    #: dose file format Moqui writes: raw, mhd or dcm (``OutputFormat``)
    output_format: Literal["raw", "mhd", "dcm"] = attrs.field(
        default="raw", validator=attrs.validators.in_(("raw", "mhd", "dcm")))
    #: ``RandomSeed`` of the Monte Carlo engine
    random_seed: int = 1
    #: replace patient identifiers (plan and PlanInfo.txt) before anything is written to staging
    deidentify: bool = True
    #: extra ``Key value`` lines for the input file; a key that exists already is replaced
    extra_keys: dict[str, str] = attrs.field(factory=dict, validator=_check_extra_keys)
    #: ``GPUID`` written into the input file (the command usually selects the GPU with CUDA_VISIBLE_DEVICES)
    gpu_id: int = 0
    #: which beams a case needs: ``fraction_groups`` (the beams of the fraction groups that
    #: were delivered; every fraction group while none is) or ``treatment`` (every treatment beam)
    required_beams: Literal["fraction_groups", "treatment"] = "fraction_groups"
    #: how a delivery folder is matched to the plan's patient and study through PlanInfo.txt:
    #: ``patient_and_study`` (DICOM_PATIENT_ID and DICOM_STUDY_INS_UID must be there and
    #: equal the plan's PatientID and StudyInstanceUID), ``patient`` (the patient id only) or
    #: ``off`` (not checked: only for sites whose logs carry neither)
    delivery_identity: Literal["patient_and_study", "patient", "off"] = "patient_and_study"
    #: radiation types of treatment beams the engine simulates (upstream Moqui: protons)
    radiation_types: list[str] = attrs.field(factory=lambda: ["PROTON"])
    #: scan modes of treatment beams the engine simulates (upstream Moqui: spot scanning)
    scan_modes: list[str] = attrs.field(factory=lambda: ["MODULATED"])


# ------------------------------------------------------------------------------ helpers


def parse_plan_info(data: bytes | str) -> dict[str, str]:
    """Parse PlanInfo.txt: ``KEY,VALUE`` per line (BOM, CRLF, blank lines and spaces tolerated;
    the value is everything after the first comma). The first occurrence of a key wins."""
    text = data.decode("utf-8-sig", errors="replace") if isinstance(data, bytes) else data.lstrip("\ufeff")
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition(",")
        key = key.strip()
        if not sep or not key:
            continue
        out.setdefault(key, value.strip())
    return out


def _parse_int(value: str) -> Optional[int]:
    try:
        return int(value.strip())
    except ValueError:
        try:
            number = float(value)
        except ValueError:
            return None
        return int(number) if number.is_integer() else None


def _write_atomic(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` atomically and durably; skip when it holds that already."""
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, data, unchanged_ok=True)


def _copy_atomic(source: Path, target: Path) -> None:
    """Copy ``source`` (data and mtime) unless ``target`` already has its size and mtime."""
    st = source.stat()
    try:
        tt = target.stat()
        if not target.is_symlink() and tt.st_size == st.st_size and tt.st_mtime_ns == st.st_mtime_ns:
            return
    except FileNotFoundError:
        pass
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _remote_join(remote_dir: str, *parts: str) -> str:
    base = remote_dir.rstrip("/") or "/"
    return posixpath.join(base, *parts)


def _delivery_folders(case_dir: Path) -> list[tuple[str, dict[str, str]]]:
    found = []
    for entry in sorted(case_dir.iterdir(), key=lambda e: e.name):
        if entry.is_symlink() or not entry.is_dir():
            continue
        info_file = entry / PLAN_INFO
        if info_file.is_symlink() or not info_file.is_file():
            continue
        try:
            data = info_file.read_bytes()
        except OSError as exc:
            raise CaseRejected(f"delivery folder {entry.name}: {PLAN_INFO} is not readable ({exc.strerror})") from None
        found.append((entry.name, parse_plan_info(data)))
    return found


# ------------------------------------------------------------------------------ interpreter


class MoquiInterpreter(Interpreter):
    """RT Ion Plan interpreter for Moqui: treatment beams, delivery folders, ``moqui_tps_<n>.in``."""

    name = "moqui"
    settings_class = MoquiSettings

    def __init__(self, settings: Optional[MoquiSettings] = None, context: Any = None) -> None:
        super().__init__(settings if settings is not None else MoquiSettings(), context)

    # -- interpret ------------------------------------------------------------------

    def interpret(self, case_dir: Path) -> CasePlan:
        case_dir = Path(case_dir)
        if not case_dir.is_dir():
            raise CaseRejected("the case folder does not exist or is not a folder")
        settings: MoquiSettings = self.settings
        ds = read_plan(find_plan_file(case_dir))
        summary = check_plan(ds, radiation_types=settings.radiation_types, scan_modes=settings.scan_modes)
        treatment = summary.treatment
        setup = [n for n, b in summary.beams.items() if not b.treatment]
        if not treatment:
            raise CaseRejected(
                f"the RT Ion Plan has no treatment beam (TreatmentDeliveryType TREATMENT); "
                f"{len(setup)} setup/other beam(s) only; nothing to simulate"
            )

        deliveries: dict[int, str] = {}
        ignored: list[str] = []
        for folder, values in _delivery_folders(case_dir):
            raw = values.get(BEAM_NUMBER_KEY)
            number = _parse_int(raw) if raw is not None else None
            if number is None:
                ignored.append(f"{folder}: {PLAN_INFO} has no valid {BEAM_NUMBER_KEY}")
                continue
            if number not in treatment:
                kind = "a setup beam" if number in setup else "not a beam of the plan"
                ignored.append(f"{folder}: beam {number} is {kind}")
                continue
            self._check_identity(ds, folder, number, values)
            if number in deliveries:
                raise CaseRejected(
                    f"two delivery folders name beam {number} ({deliveries[number]} and {folder}); "
                    "remove the one that is not the delivery to check, then retry the case"
                )
            deliveries[number] = folder
        for note in ignored:
            log.info("moqui: ignored delivery folder %s", note)

        needed, notes = required_beams(summary, settings.required_beams, deliveries)
        beams = [BeamPlan(number=n, name=treatment[n].name, delivery_dir=deliveries.get(n)) for n in needed]
        missing = [n for n in needed if n not in deliveries]
        machines = sorted({b.machine for b in treatment.values() if b.machine})
        info: dict[str, Any] = {
            "plan_label": str(ds.get("RTPlanLabel", "") or ""),
            "treatment_machine": ", ".join(machines),
            "treatment_beams": len(treatment),
            "setup_beams": len(setup),
            "deliveries": len(deliveries),
            "required_beams": needed,
            "fraction_groups": [g.info() for g in summary.fraction_groups],
            "beam_details": [treatment[n].info() for n in sorted(treatment)],
            "delivery_identity": settings.delivery_identity,
        }
        if notes:
            info["notes"] = notes
        if ignored:
            info["ignored_deliveries"] = ignored
        return CasePlan(beams=beams, missing=missing, info=info)

    def _check_identity(self, ds: Any, folder: str, beam: int, values: dict[str, str]) -> None:
        """A delivery folder of another patient or study is never this case's delivery:
        holding the case is the only safe answer (issue 14.2). The identifiers themselves
        stay out of the message."""
        policy = self.settings.delivery_identity
        if policy == "off":
            return
        checks = [(PATIENT_ID_KEY, "PatientID", "patient")]
        if policy == "patient_and_study":
            checks.append((STUDY_UID_KEY, "StudyInstanceUID", "study"))
        for key, attribute, what in checks:
            delivered = values.get(key, "").strip()
            planned = str(ds.get(attribute, "") or "").strip()
            if not delivered:
                raise CaseRejected(
                    f"delivery folder {folder} (beam {beam}): {PLAN_INFO} has no {key}, so it cannot be matched to "
                    f"the plan's {what}; export the delivery again (or set delivery_identity for this site)")
            if delivered != planned:
                raise CaseRejected(
                    f"delivery folder {folder} (beam {beam}) belongs to another {what}: {PLAN_INFO}'s {key} is not "
                    f"the plan's {attribute}; put this patient's delivery in the case, then retry it")

    # -- prepare --------------------------------------------------------------------

    def prepare(self, case_dir: Path, plan: CasePlan, staging_dir: Path, remote_dir: str) -> dict[int, str]:
        case_dir = Path(case_dir)
        staging_dir = Path(staging_dir)
        settings: MoquiSettings = self.settings
        plan_file = find_plan_file(case_dir)
        if settings.deidentify:
            from pydicom.filebase import DicomBytesIO

            ds = read_plan(plan_file)
            deidentify_dataset(ds)
            buffer = DicomBytesIO()
            save_dataset(ds, buffer)
            _write_atomic(staging_dir / "dicom" / "RTPLAN.dcm", buffer.getvalue())
        else:
            read_plan(plan_file)
            _write_atomic(staging_dir / "dicom" / "RTPLAN.dcm", plan_file.read_bytes())

        inputs: dict[int, str] = {}
        for beam in plan.beams:
            if beam.delivery_dir is None:
                raise CaseRejected(f"beam {beam.number} has no delivery folder; the case is incomplete")
            source = case_dir / beam.delivery_dir
            if (Path(beam.delivery_dir).name != beam.delivery_dir or beam.delivery_dir in (".", "..")
                    or source.is_symlink() or not source.is_dir()):
                raise CaseRejected(f"the delivery folder of beam {beam.number} ({beam.delivery_dir}) is gone "
                                   "or is not a folder inside the case; retry the case")
            beam_stage = staging_dir / "beams" / str(beam.number)
            self._copy_delivery(source, beam_stage / "logs")
            relative = f"beams/{beam.number}/moqui_tps_{beam.number}.in"
            _write_atomic(staging_dir / relative, self.input_text(beam.number, remote_dir).encode("utf-8"))
            inputs[beam.number] = relative
        return inputs

    def input_text(self, beam_number: int, remote_dir: str) -> str:
        """The ``moqui_tps_<n>.in`` content for one beam; paths refer to ``remote_dir`` (POSIX)."""
        s: MoquiSettings = self.settings
        beam_remote = _remote_join(remote_dir, "beams", str(beam_number))
        keys: dict[str, str] = {
            "GPUID": str(s.gpu_id),
            "RandomSeed": str(s.random_seed),
            "ParentDir": remote_dir.rstrip("/") or "/",
            "DicomPath": _remote_join(remote_dir, "dicom"),
            "logFilePath": posixpath.join(beam_remote, "logs"),
            "BeamNumbers": str(beam_number),
            "OutputDir": posixpath.join(beam_remote, "output"),
            "OutputFormat": s.output_format,
            "SourceType": "FluenceMap",
            "SimulationType": "perBeam",
        }
        for key, value in s.extra_keys.items():
            keys[key] = str(value)
        return "".join(f"{key} {value}\n" for key, value in keys.items())

    def _copy_delivery(self, source: Path, target: Path) -> None:
        target.mkdir(parents=True, exist_ok=True)
        for root, dirs, files in os.walk(source, followlinks=False):
            root_path = Path(root)
            dirs[:] = sorted(d for d in dirs if not (root_path / d).is_symlink())
            rel = root_path.relative_to(source)
            for name in sorted(files):
                src = root_path / name
                if src.is_symlink() or not src.is_file():
                    continue
                dst = target / rel / name
                if rel == Path(".") and name == PLAN_INFO and self.settings.deidentify:
                    _write_atomic(dst, deidentify_plan_info(src.read_bytes()))
                else:
                    _copy_atomic(src, dst)

    # -- parse_log ------------------------------------------------------------------

    def parse_log(self, text: str) -> LogVerdict:
        return judge_log(text)

    def check(self) -> list[str]:
        try:
            import pydicom  # noqa: F401
        except ImportError:
            return ["pydicom is not installed; install mqi-moqui with its dependencies (pip install mqi-moqui)"]
        return []

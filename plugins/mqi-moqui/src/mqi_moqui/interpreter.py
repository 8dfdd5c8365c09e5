"""The ``moqui`` interpreter: RT Ion Plan + delivery folders → beams → ``moqui_tps_<n>.in``.

Case folder (docs: DESIGN.md section 2)::

    <case>/<any name>.dcm           exactly one RT Ion Plan, found by its SOP class (RN*.dcm, RP*.dcm, ...)
    <case>/<delivery>/PlanInfo.txt  KEY,VALUE lines; DICOM_BEAM_NUMBER maps the folder to a beam
    <case>/<delivery>/*.ptn, *.mgn  machine logs (PlanRange.txt beside them names each layer's files)

Staging tree written by :meth:`MoquiInterpreter.prepare` (uploaded to ``remote_dir``)::

    dicom/RTPLAN.dcm                 the plan (de-identified unless ``deidentify: false``)
    beams/<n>/logs/...               the ``delivery_files`` of beam n's delivery folder (de-identified)
    beams/<n>/moqui_tps_<n>.in       Moqui input, paths pointing into remote_dir

Reading the plan is :mod:`mqi_moqui.rtplan`, de-identification :mod:`mqi_moqui.deid`, judging
the engine's log :mod:`mqi_moqui.logjudge`; pydicom is imported lazily so that loading the
plugin stays cheap.
"""

# No ``from __future__ import annotations`` here: cattrs structures MoquiSettings from its
# real (evaluated) annotations.

import errno
import fnmatch
import hashlib
import json
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

from mqi_moqui.deid import (Pseudonymizer, deidentify_dataset, deidentify_plan_info, deidentify_plan_range,
                            delivery_file_name, load_key)
from mqi_moqui.logjudge import judge_log
from mqi_moqui.plancheck import check_plan, required_beams
from mqi_moqui.rtplan import MAX_ELEMENT_BYTES, MAX_PLAN_BYTES, find_plan_file, read_plan, save_dataset

log = logging.getLogger(__name__)

PLAN_INFO = "PlanInfo.txt"
PLAN_RANGE = "PlanRange.txt"
LOG_SUFFIXES = (".ptn", ".mgn")
DEID_FOLDER = "deid"
BEAM_NUMBER_KEY = "DICOM_BEAM_NUMBER"
PATIENT_ID_KEY = "DICOM_PATIENT_ID"
STUDY_UID_KEY = "DICOM_STUDY_INS_UID"
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
#: placeholders an ``extra_keys`` value may use
EXTRA_KEY_FIELDS = ("beam", "beam_name", "case", "case_dir", "beam_dir")
#: the staged tree, relative to the case folder on the execution side (``ParentDir``)
DICOM_DIR = "dicom"


def _check_extra_keys(instance: Any, attribute: Any, value: dict) -> None:
    for key, val in value.items():
        if not isinstance(key, str) or not _KEY.match(key):
            raise ValueError(f"extra_keys: {key!r} is not a Moqui key (letters, digits, _ . -; no spaces)")
        if "\n" in str(val) or "\r" in str(val):
            raise ValueError(f"extra_keys.{key}: the value must be one line")
        try:
            str(val).format_map({name: "" for name in EXTRA_KEY_FIELDS})
        except (KeyError, ValueError, IndexError) as exc:
            raise ValueError(f"extra_keys.{key}: {val!r} uses an unknown placeholder or a stray brace ({exc}); "
                             f"known: {', '.join('{' + f + '}' for f in EXTRA_KEY_FIELDS)}") from None


@attrs.frozen
class MoquiSettings:
    """``workers.<prepare>.settings`` of the ``moqui`` interpreter."""

    #: dose file format Moqui writes: raw, mhd or mha (``OutputFormat``; float64 each)
    output_format: Literal["raw", "mhd", "mha"] = attrs.field(
        default="raw", validator=attrs.validators.in_(("raw", "mhd", "mha")))
    #: mixed into each beam's ``RandomSeed``, which is derived from the case id and the beam
    #: number (every beam and case gets its own stream; the same case prepared again, the same)
    random_seed: int = 1
    #: ``Scorer``: what the engine scores (upstream's default is none: no dose file at all)
    scorer: str = "Dose"
    #: ``ParticlesPerHistory``: protons one history stands for (upstream's default -1 means
    #: one history per spot and a negative dose scale); with ``MaxHistoriesPerBatch``, sets
    #: the run's statistics
    particles_per_history: float = attrs.field(default=1000.0, validator=attrs.validators.gt(0))
    #: ``MaxHistoriesPerBatch``: histories per GPU batch
    max_histories_per_batch: int = attrs.field(default=10000, validator=attrs.validators.gt(0))
    #: ``Machine`` per TreatmentMachineName of the plan: upstream's ``pbs:<beam data file>``
    #: (the part before ``:`` must be ``pbs``); a machine not listed gets ``default_machine``
    machines: dict[str, str] = attrs.field(factory=dict)
    #: ``Machine`` for treatment machines not in ``machines`` (upstream's example: ``PBS``)
    default_machine: str = "PBS"
    #: ``RBE``: upstream multiplies the dose by it (its default 1.1); 1.0 scores physical dose
    rbe: float = attrs.field(default=1.1, validator=attrs.validators.gt(0))
    #: ``NumberOfFraction``: upstream multiplies the dose by it (its default: the plan's
    #: NumberOfFractionsPlanned, a whole-course dose); 1 gives the dose of one fraction
    number_of_fractions: int = attrs.field(default=1, validator=attrs.validators.gt(0))
    #: de-identify what is staged for upload to the DICOM PS3.15 Basic Profile (plan: every
    #: element, nested and private ones included, UIDs keyed; PlanInfo.txt and PlanRange.txt
    #: by an allowlist; log file names without patient ids); docs/privacy.md
    deidentify: bool = True
    #: the files of a delivery folder that are staged (glob patterns on the file name; files
    #: in sub-folders and every other file stay in the clinic). With ``deidentify``, ``.ptn``
    #: and ``.mgn`` files are renamed; other files matched here keep their names
    delivery_files: list[str] = attrs.field(factory=lambda: ["*.ptn", "*.mgn", PLAN_INFO, PLAN_RANGE])
    #: extra ``Key value`` lines for the input file; a key that exists already is replaced.
    #: Values may use ``{beam}``, ``{beam_name}``, ``{case}``, ``{case_dir}`` and ``{beam_dir}``
    #: (paths on the execution side)
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
    #: an RT Ion Plan file bigger than this (bytes) is rejected before it is parsed; 0: no limit
    max_plan_bytes: int = attrs.field(default=MAX_PLAN_BYTES, validator=attrs.validators.ge(0))
    #: a plan holding a single element bigger than this (bytes) is rejected before that
    #: element is loaded into memory; 0: no limit
    max_element_bytes: int = attrs.field(default=MAX_ELEMENT_BYTES, validator=attrs.validators.ge(0))


# ------------------------------------------------------------------------------ helpers


def beam_seed(case: str, beam: int, salt: int) -> int:
    """A ``RandomSeed`` of its own for each case and beam (a positive 31-bit integer)."""
    digest = hashlib.sha256(f"{salt}:{case}:{beam}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF or 1


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


def delivery_label(position: int) -> str:
    """How messages and logs name a delivery folder: by its place among the case's delivery
    folders in name order (``#2``), because folder names often carry patient identifiers."""
    return f"delivery folder #{position}"


def _delivery_folders(case_dir: Path) -> list[tuple[str, dict[str, str]]]:
    """The case's delivery folders (those with a PlanInfo.txt) in name order, with their
    PlanInfo values; the n-th is :func:`delivery_label` ``n``."""
    found = []
    for entry in sorted(case_dir.iterdir(), key=lambda e: e.name):
        if entry.is_symlink() or not entry.is_dir():
            continue
        info_file = entry / PLAN_INFO
        if info_file.is_symlink() or not info_file.is_file():
            continue
        data = read_text_file(info_file, f"{delivery_label(len(found) + 1)}: {PLAN_INFO}")
        found.append((entry.name, parse_plan_info(data)))
    return found


#: PlanInfo.txt and PlanRange.txt are a few KiB; a bigger one is not read into memory
MAX_TEXT_BYTES = 1024 * 1024


def read_text_file(path: Path, what: str) -> bytes:
    """The bytes of a small text file of a delivery (PlanInfo.txt, PlanRange.txt); one that is
    unreadable or over :data:`MAX_TEXT_BYTES` is a rejection naming ``what``."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_TEXT_BYTES + 1)
    except OSError as exc:
        raise CaseRejected(f"{what} is not readable ({exc.strerror})") from None
    if len(data) > MAX_TEXT_BYTES:
        raise CaseRejected(f"{what} is over {MAX_TEXT_BYTES // 1024} KiB: not a machine's export; "
                           "export the delivery again, then retry the case")
    return data


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
        ds = self._read_plan(find_plan_file(case_dir))
        summary = check_plan(ds, radiation_types=settings.radiation_types, scan_modes=settings.scan_modes)
        treatment = summary.treatment
        setup = [n for n, b in summary.beams.items() if not b.treatment]
        if not treatment:
            raise CaseRejected(
                f"the RT Ion Plan has no treatment beam (TreatmentDeliveryType TREATMENT); "
                f"{len(setup)} setup/other beam(s) only; nothing to simulate"
            )

        deliveries: dict[int, str] = {}
        positions: dict[str, int] = {}
        ignored: list[str] = []
        for position, (folder, values) in enumerate(_delivery_folders(case_dir), 1):
            positions[folder], label = position, delivery_label(position)
            raw = values.get(BEAM_NUMBER_KEY)
            number = _parse_int(raw) if raw is not None else None
            if number is None:
                ignored.append(f"{label}: {PLAN_INFO} has no valid {BEAM_NUMBER_KEY}")
                continue
            if number not in treatment:
                kind = "a setup beam" if number in setup else "not a beam of the plan"
                ignored.append(f"{label}: beam {number} is {kind}")
                continue
            self._check_identity(ds, label, number, values)
            if number in deliveries:
                raise CaseRejected(
                    f"two delivery folders name beam {number} (#{positions[deliveries[number]]} and #{position} "
                    "in name order); "
                    "remove the one that is not the delivery to check, then retry the case"
                )
            deliveries[number] = folder
        for note in ignored:
            log.info("moqui: ignored %s", note)

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

    def _check_identity(self, ds: Any, label: str, beam: int, values: dict[str, str]) -> None:
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
                    f"{label} (beam {beam}): {PLAN_INFO} has no {key}, so it cannot be matched to "
                    f"the plan's {what}; export the delivery again (or set delivery_identity for this site)")
            if delivered != planned:
                raise CaseRejected(
                    f"{label} (beam {beam}) belongs to another {what}: {PLAN_INFO}'s {key} is not "
                    f"the plan's {attribute}; put this patient's delivery in the case, then retry it")

    # -- prepare --------------------------------------------------------------------

    def prepare(self, case_dir: Path, plan: CasePlan, staging_dir: Path, remote_dir: str) -> dict[int, str]:
        case_dir = Path(case_dir)
        staging_dir = Path(staging_dir)
        settings: MoquiSettings = self.settings
        plan_file = find_plan_file(case_dir)
        pseudo = self._pseudonymizer() if settings.deidentify else None
        if pseudo is not None:
            from pydicom.filebase import DicomBytesIO

            ds = self._read_plan(plan_file)
            deidentify_dataset(ds, pseudo)
            buffer = DicomBytesIO()
            save_dataset(ds, buffer)
            _write_atomic(staging_dir / "dicom" / "RTPLAN.dcm", buffer.getvalue())
        else:
            self._read_plan(plan_file)
            _write_atomic(staging_dir / "dicom" / "RTPLAN.dcm", plan_file.read_bytes())

        inputs: dict[int, str] = {}
        for beam in plan.beams:
            if beam.delivery_dir is None:
                raise CaseRejected(f"beam {beam.number} has no delivery folder; the case is incomplete")
            source = case_dir / beam.delivery_dir
            if (Path(beam.delivery_dir).name != beam.delivery_dir or beam.delivery_dir in (".", "..")
                    or source.is_symlink() or not source.is_dir()):
                raise CaseRejected(f"the delivery folder of beam {beam.number} is gone "
                                   "or is not a folder inside the case; retry the case")
            beam_stage = staging_dir / "beams" / str(beam.number)
            try:
                self._copy_delivery(source, beam_stage / "logs", pseudo, beam.number)
            except OSError as exc:
                if exc.errno != errno.ENAMETOOLONG:
                    raise
                raise CaseRejected(f"beam {beam.number}: a file name in its delivery folder is too long to be "
                                   "staged; shorten it (or let deidentify rename the logs), then retry") from None
            relative = f"beams/{beam.number}/moqui_tps_{beam.number}.in"
            details = next((b for b in plan.info.get("beam_details", []) if b.get("number") == beam.number), {})
            text = self.input_text(beam.number, remote_dir, beam_name=beam.name, machine=details.get("machine", ""))
            _write_atomic(staging_dir / relative, text.encode("utf-8"))
            inputs[beam.number] = relative
        if pseudo is not None:
            self._keep_mapping(staging_dir.name, pseudo)
        return inputs

    def _read_plan(self, path: Path) -> Any:
        return read_plan(path, max_bytes=self.settings.max_plan_bytes,
                         max_element_bytes=self.settings.max_element_bytes)

    def _deid_folder(self) -> Optional[Path]:
        workspace = getattr(self.context, "workspace", None)
        return Path(workspace) / DEID_FOLDER if workspace is not None else None

    def _pseudonymizer(self) -> Pseudonymizer:
        """Keyed with the workspace's key, so that one patient or UID maps to the same value in
        every case; without a workspace (a plugin used on its own) with a key of this instance."""
        folder = self._deid_folder()
        if folder is None:
            if not hasattr(self, "_own_key"):
                self._own_key = os.urandom(32)
            return Pseudonymizer(self._own_key)
        return Pseudonymizer(load_key(folder))

    def _keep_mapping(self, case: str, pseudo: Pseudonymizer) -> None:
        """What was replaced (new value → original), kept on this host only, mode 0600: the
        way back from a returned result to the clinic's own plan."""
        folder = self._deid_folder()
        if folder is None:
            return
        target = folder / "mappings" / f"{case}.json"
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        data = json.dumps({"case": case, "mapping": pseudo.mapping}, indent=1, sort_keys=True).encode("utf-8")
        write_atomic(target, data, unchanged_ok=True)
        os.chmod(target, 0o600)

    def input_text(self, beam_number: int, remote_dir: str, *, beam_name: str = "", machine: str = "") -> str:
        """The ``moqui_tps_<n>.in`` content for one beam, in upstream Moqui's keys (moquimc,
        ``mqi_tps_env.hpp``; docs/real-moqui.md). Paths refer to ``remote_dir`` (POSIX):
        ``DicomDir`` and ``logFilePath`` are relative to ``ParentDir``, as both engines join
        them; ``OutputDir`` is absolute."""
        s: MoquiSettings = self.settings
        parent = remote_dir.rstrip("/") or "/"
        case = posixpath.basename(parent)
        beam_rel = posixpath.join("beams", str(beam_number))
        keys: dict[str, str] = {
            "GPUID": str(s.gpu_id),
            "RandomSeed": str(beam_seed(case, beam_number, s.random_seed)),
            "UseAbsolutePath": "false",
            "ParentDir": parent,
            "DicomDir": DICOM_DIR,
            "logFilePath": posixpath.join(beam_rel, "logs"),  # read by the log-driven fork
            "OutputDir": posixpath.join(parent, beam_rel, "output"),
            "OutputFormat": s.output_format,
            "OverwriteResults": "true",  # a retry writes where the failed attempt did
            "SimulationType": "perBeam",
            "BeamNumbers": str(beam_number),
            "SourceType": "FluenceMap",
            "Machine": s.machines.get(machine, s.default_machine),
            "Scorer": s.scorer,
            "ParticlesPerHistory": f"{s.particles_per_history:g}",
            "MaxHistoriesPerBatch": str(s.max_histories_per_batch),
            "TotalThreads": "-1",
            "RBE": f"{s.rbe:g}",
            "NumberOfFraction": str(s.number_of_fractions),
        }
        fields = {"beam": beam_number, "beam_name": beam_name, "case": case, "case_dir": parent,
                  "beam_dir": posixpath.join(parent, beam_rel)}
        for key, value in s.extra_keys.items():
            keys[key] = str(value).format_map(fields)
        return "".join(f"{key} {value}\n" for key, value in keys.items())

    def _copy_delivery(self, source: Path, target: Path, pseudo: Optional[Pseudonymizer], beam: int) -> None:
        """Stage the files of ``delivery_files`` (top level only, no symlinks); with ``pseudo``
        PlanInfo.txt and PlanRange.txt are rewritten by their allowlists and log files renamed."""
        target.mkdir(parents=True, exist_ok=True)
        patterns = self.settings.delivery_files
        names = sorted(entry.name for entry in os.scandir(source)
                       if entry.is_file(follow_symlinks=False)
                       and any(fnmatch.fnmatchcase(entry.name, p) for p in patterns))
        renamed: dict[str, str] = {}
        if pseudo is not None:  # machine logs are named after the patient; other files keep their names
            logs = [n for n in names if n.lower().endswith(LOG_SUFFIXES)]
            renamed = {name: delivery_file_name(name, pseudo, i) for i, name in enumerate(logs, 1)}
        for name in names:
            src = source / name
            if pseudo is not None and name == PLAN_INFO:
                text = read_text_file(src, f"{PLAN_INFO} of the delivery of beam {beam}")
                _write_atomic(target / name, deidentify_plan_info(text, pseudo))
            elif pseudo is not None and name == PLAN_RANGE:
                text = read_text_file(src, f"{PLAN_RANGE} of the delivery of beam {beam}")
                _write_atomic(target / name, deidentify_plan_range(text, pseudo, renamed))
            else:
                _copy_atomic(src, target / renamed.get(name, name))

    # -- parse_log ------------------------------------------------------------------

    def parse_log(self, text: str) -> LogVerdict:
        return judge_log(text)

    def check(self) -> list[str]:
        try:
            import pydicom  # noqa: F401
        except ImportError:
            return ["pydicom is not installed; install mqi-moqui with its dependencies (pip install mqi-moqui)"]
        return []

"""The ``moqui`` interpreter: RT Ion Plan + delivery folders → beams → ``moqui_tps_<n>.in``.

Case folder (docs: DESIGN.md section 2)::

    <case>/<any name>.dcm           exactly one RT Ion Plan, found by its SOP class (RN*.dcm, RP*.dcm, ...)
    <case>/<delivery>/PlanInfo.txt  KEY,VALUE lines; DICOM_BEAM_NUMBER maps the folder to a beam
    <case>/<delivery>/*.ptn, *.mgn  machine logs (PlanRange.txt beside them names each layer's files)

Staging tree written by :meth:`MoquiInterpreter.prepare` (uploaded to ``remote_dir``)::

    dicom/RTPLAN.dcm                 the plan (de-identified unless ``deidentify: false``)
    dicom/CT.<k>.dcm, RTSTRUCT.dcm   the planning CT in slice order and its structure set (de-identified),
                                     or a water phantom's slices (``phantom: water``)
    beams/<n>/logs/...               the ``delivery_files`` of beam n's delivery folder(s) (de-identified;
                                     a resumed delivery's folders merged into one, one PlanRange.txt)
    beams/<n>/moqui_tps_<n>.in       Moqui input, paths pointing into remote_dir
    beams/<n>/run.json               seed, statistics, RBE, fractions, medium: recorded with the result
    beams/<n>/delivery_analysis.json delivered vs planned, per layer and spot (with delivery_calibrations)

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
from mqi_moqui.deliveries import STOP_KEY, Delivery, check_layers, layers_of, parse_int
from mqi_moqui.delivery_analysis import Levels
from mqi_moqui.delivery_check import check_beam, for_case_info, load_calibrations
from mqi_moqui.images import ImageSet, Phantom, find_images, phantom_series
from mqi_moqui.logjudge import judge_log
from mqi_moqui.plancheck import check_plan, required_beams
from mqi_moqui.profiles import (FORK_LOGS, KEYS, PROFILES, fork_csv_energies, fork_csv_files, fork_field_folder,
                                gantry_number)
from mqi_moqui.rtplan import MAX_ELEMENT_BYTES, MAX_PLAN_BYTES, find_plan_file, quiet_pydicom, read_plan, save_dataset

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
#: the key of CasePlan.info under which the host passes the prepare step's attempt number
PREPARE_ATTEMPT = "prepare_attempt"
#: per beam, the full delivery analysis (every layer's per-spot differences), when it runs
DELIVERY_ANALYSIS = "delivery_analysis.json"
#: per beam, how its result was computed (:meth:`MoquiInterpreter.run_record`)
RUN_RECORD = "run.json"
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


def _check_gantry_numbers(instance: Any, attribute: Any, value: dict) -> None:
    for machine, number in value.items():
        if number not in (1, 2):
            raise ValueError(f"gantry_numbers.{machine}: {number!r} is not a GantryNum the fork knows (1 or 2)")


@attrs.frozen
class MoquiSettings:
    """``workers.<prepare>.settings`` of the ``moqui`` interpreter."""

    #: which Moqui build runs the beams (docs/real-moqui.md): ``moquimc`` (upstream, the plan
    #: recalculated) or ``moqui-logs`` (the log-driven fork jokh38/moqui_rev: spots from the
    #: converted delivery logs, GantryNum instead of Machine, no RBE or fraction scaling).
    #: The input holds only the keys that build reads
    engine_profile: Literal["moquimc", "moqui-logs"] = attrs.field(
        default="moquimc", validator=attrs.validators.in_(PROFILES))
    #: ``GantryNum`` (1 or 2) per TreatmentMachineName, for ``moqui-logs``: the fork's beam
    #: model; a machine not listed holds the case (the fork would silently take 2)
    gantry_numbers: dict[str, int] = attrs.field(factory=dict, validator=_check_gantry_numbers)

    #: dose file format Moqui writes: raw, mhd, mha or npz (``OutputFormat``; float64 each;
    #: npz is upstream's sparse spots x voxels matrix, summed over spots when read)
    output_format: Literal["raw", "mhd", "mha", "npz"] = attrs.field(
        default="raw", validator=attrs.validators.in_(("raw", "mhd", "mha", "npz")))
    #: mixed into each beam's ``RandomSeed``, which is derived from the case id, the beam
    #: number and the preparation's attempt (every beam and case gets its own stream, a case
    #: run again from its first step a new one; the retries of one simulation reuse theirs)
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
    #: ``Calibration`` (upstream's CT-to-material conversion) per TreatmentMachineName; a
    #: machine not listed gets ``default_calibration``
    calibrations: dict[str, str] = attrs.field(factory=dict)
    #: ``Calibration`` for treatment machines not in ``calibrations`` (upstream's default)
    default_calibration: str = "default"
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
    #: the delivery analysis (docs/real-moqui.md): the ``.ptn`` position-monitor calibration
    #: file per treatment room (PlanInfo.txt's TCSC_MACHINE), relative to the config file's
    #: folder. Empty (the default): the logs are staged but not analysed
    delivery_calibrations: dict[str, str] = attrs.field(factory=dict)
    #: tolerance and action levels of the delivery analysis (position mm, MU %)
    delivery_levels: Levels = attrs.field(factory=Levels)
    #: how far (MeV) a delivered layer's energy (PlanRange.txt) may be from the plan's
    layer_energy_tolerance_mev: float = attrs.field(default=0.1, validator=attrs.validators.ge(0))
    #: radiation types of treatment beams the engine simulates (upstream Moqui: protons)
    radiation_types: list[str] = attrs.field(factory=lambda: ["PROTON"])
    #: scan modes of treatment beams the engine simulates (upstream Moqui: spot scanning)
    scan_modes: list[str] = attrs.field(factory=lambda: ["MODULATED"])
    #: what the dose is computed in: ``off`` (default) the case's planning CT series, which
    #: must be in the case folder (upstream Moqui cannot run without one); ``water`` a water
    #: phantom the host writes around the isocentre, for phantom QA (the case's CT, if any,
    #: is not used). The case's info and results say which (docs/real-moqui.md)
    phantom: Literal["off", "water"] = attrs.field(default="off", validator=attrs.validators.in_(("off", "water")))
    #: side of the water phantom's cube (mm), centred on the first treatment beam's isocentre
    phantom_size_mm: float = attrs.field(default=200.0, validator=attrs.validators.gt(0))
    #: voxel size of the water phantom (mm): also the grid the dose is scored on
    phantom_voxel_mm: float = attrs.field(default=5.0, validator=attrs.validators.gt(0))
    #: an RT Ion Plan file bigger than this (bytes) is rejected before it is parsed; 0: no limit
    max_plan_bytes: int = attrs.field(default=MAX_PLAN_BYTES, validator=attrs.validators.ge(0))
    #: a plan holding a single element bigger than this (bytes) is rejected before that
    #: element is loaded into memory; 0: no limit
    max_element_bytes: int = attrs.field(default=MAX_ELEMENT_BYTES, validator=attrs.validators.ge(0))


# ------------------------------------------------------------------------------ helpers


def beam_seed(case: str, beam: int, salt: int, attempt: int = 1) -> int:
    """A ``RandomSeed`` of its own for each case, beam and preparation attempt (a positive
    31-bit integer): the same inputs give the same seed, a case run again from its first
    step a new one."""
    digest = hashlib.sha256(f"{salt}:{case}:{beam}:{attempt}".encode()).digest()
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


def merge_plan_info(parts: list[bytes]) -> bytes:
    """One PlanInfo.txt for a beam delivered in several sessions: the first session's, with the
    last session's STOP_LAYER_NUMBER (a single session's file is returned as it is)."""
    if len(parts) == 1:
        return parts[0]
    stop = parse_plan_info(parts[-1]).get(STOP_KEY)
    text = parts[0].decode("utf-8", errors="surrogateescape")
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if stop is not None and line.lstrip("\ufeff").split(",", 1)[0].strip() == STOP_KEY:
            ending = line[len(line.rstrip("\r\n")):]
            lines[i] = f"{STOP_KEY},{stop}{ending}"
    return "".join(lines).encode("utf-8", errors="surrogateescape")


def merge_plan_range(parts: list[bytes]) -> bytes:
    """One PlanRange.txt: the first file's header, then the rows of every file in order."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0].decode("utf-8", errors="surrogateescape").splitlines(keepends=True)
    out = list(first)
    ending = "\r\n" if first and first[0].endswith("\r\n") else "\n"
    if out and not out[-1].endswith("\n"):
        out[-1] += ending
    for part in parts[1:]:
        rows = part.decode("utf-8", errors="surrogateescape").lstrip("\ufeff").splitlines()[1:]
        out += [row + ending for row in rows if row.strip()]
    return "".join(out).encode("utf-8", errors="surrogateescape")


def _dataset_bytes(ds: Any) -> bytes:
    from pydicom.filebase import DicomBytesIO

    buffer = DicomBytesIO()
    save_dataset(ds, buffer)
    return buffer.getvalue()


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

        matched, ignored, layer_notes, unfinished = self._match_deliveries(case_dir, ds, summary)
        deliveries = {beam: folders[0].folder for beam, folders in matched.items()}
        for note in ignored:
            log.info("moqui: ignored %s", note)

        medium = self._medium(case_dir, ds, summary)
        needed, notes = required_beams(summary, settings.required_beams, deliveries)
        if settings.engine_profile == "moqui-logs":
            unmapped = sorted({treatment[n].machine for n in needed
                               if gantry_number(settings.gantry_numbers, treatment[n].machine) is None})
            if unmapped:
                raise CaseRejected(
                    f"treatment machine {', '.join(unmapped)} has no GantryNum (gantry_numbers in the prepare "
                    "worker's settings); the fork would take gantry 2's beam model without saying so")
        beams = [BeamPlan(number=n, name=treatment[n].name, delivery_dir=deliveries.get(n)) for n in needed]
        missing = [n for n in needed if n not in deliveries or n in unfinished]
        notes += [note for n in needed for note in layer_notes.get(n, [])]
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
            "dose_medium": medium.info(),
        }
        if settings.delivery_calibrations:
            analysis = self._analyse_deliveries(case_dir, ds, matched, [n for n in needed if n not in missing])
            info["delivery_analysis"] = {str(n): for_case_info(result) for n, result in analysis.items()}
            notes += [f"beam {n}: delivery {flag}" for n, result in analysis.items() for flag in result["flags"]]
        if notes:
            info["notes"] = notes
        if ignored:
            info["ignored_deliveries"] = ignored
        return CasePlan(beams=beams, missing=missing, info=info)

    def _match_deliveries(self, case_dir: Path, ds: Any, summary: Any
                          ) -> tuple[dict[int, list[Delivery]], list[str], dict[int, list[str]], set[int]]:
        """The delivery folders of each treatment beam, checked against the plan's patient,
        study and layers (:mod:`mqi_moqui.deliveries`) and in layer order; the folders that
        were ignored (why), notes for the case's info, and the beams still missing layers."""
        treatment = summary.treatment
        setup = {n for n, b in summary.beams.items() if not b.treatment}
        found: dict[int, list[Delivery]] = {}
        ignored: list[str] = []
        for position, (folder, values) in enumerate(_delivery_folders(case_dir), 1):
            label = delivery_label(position)
            raw = values.get(BEAM_NUMBER_KEY)
            number = parse_int(raw) if raw is not None else None
            if number is None:
                ignored.append(f"{label}: {PLAN_INFO} has no valid {BEAM_NUMBER_KEY}")
                continue
            if number not in treatment:
                kind = "a setup beam" if number in setup else "not a beam of the plan"
                ignored.append(f"{label}: beam {number} is {kind}")
                continue
            self._check_identity(ds, label, number, values)
            range_file = case_dir / folder / PLAN_RANGE
            plan_range = (read_text_file(range_file, f"{label}: {PLAN_RANGE}")
                          if range_file.is_file() and not range_file.is_symlink() else None)
            found.setdefault(number, []).append(layers_of(folder, position, values, plan_range))
        matched: dict[int, list[Delivery]] = {}
        notes: dict[int, list[str]] = {}
        unfinished: set[int] = set()
        for number, folders in sorted(found.items()):
            ordered, missing_layers, beam_notes = check_layers(
                number, folders, treatment[number].energies, self.settings.layer_energy_tolerance_mev)
            matched[number] = ordered
            notes[number] = beam_notes
            if missing_layers:
                unfinished.add(number)
        return matched, ignored, notes, unfinished

    def _analyse_deliveries(self, case_dir: Path, ds: Any, matched: dict[int, list[Delivery]],
                            beams: list[int]) -> dict[int, dict[str, Any]]:
        """Delivered against planned for every delivered beam (:mod:`mqi_moqui.delivery_check`)."""
        config_path = getattr(self.context, "config_path", None)
        calibrations = load_calibrations(self.settings.delivery_calibrations,
                                         Path(config_path).parent if config_path else None)
        out = {}
        for number in beams:
            folders = [case_dir / d.folder for d in matched[number]]
            values = parse_plan_info(read_text_file(folders[0] / PLAN_INFO, f"{matched[number][0].label}: {PLAN_INFO}"))
            out[number] = check_beam(ds, number, folders, values, calibrations, self.settings.delivery_levels,
                                     matched[number][0].label)
        return out

    def _medium(self, case_dir: Path, ds: Any, summary: Any) -> "ImageSet | Phantom":
        """The CT series the dose is computed on, or the water phantom (``phantom: water``);
        a case without a CT in the default mode is rejected (module :mod:`mqi_moqui.images`)."""
        isocentres = [b.isocenter for _, b in sorted(summary.treatment.items()) if b.isocenter]
        settings: MoquiSettings = self.settings
        if settings.phantom == "water":
            phantom = Phantom(settings.phantom_size_mm, settings.phantom_voxel_mm)
            centre = isocentres[0] if isocentres else (0.0, 0.0, 0.0)
            for iso in isocentres:
                if max(abs(a - b) for a, b in zip(iso, centre)) > settings.phantom_size_mm / 2:
                    raise CaseRejected("the treatment beams' isocentres lie further apart than the water phantom "
                                       "is wide; raise phantom_size_mm, then retry the case")
            return phantom
        images = find_images(case_dir, ds, isocentres)
        if images is None:
            raise CaseRejected(
                "the case has no planning CT series: Moqui computes the dose on the CT (DicomDir must hold it). "
                "Put the plan's CT slices (and RTSTRUCT) beside the plan, or set phantom: water to compute in "
                "a water phantom, then retry the case")
        return images

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
        ds = self._read_plan(plan_file)
        summary = check_plan(ds, radiation_types=settings.radiation_types, scan_modes=settings.scan_modes)
        medium = self._medium(case_dir, ds, summary)
        matched = self._match_deliveries(case_dir, ds, summary)[0]
        analysis = (self._analyse_deliveries(case_dir, ds, matched, [b.number for b in plan.beams if b.number in matched])
                    if settings.delivery_calibrations else {})
        if pseudo is not None:
            deidentify_dataset(ds, pseudo)
            _write_atomic(staging_dir / DICOM_DIR / "RTPLAN.dcm", _dataset_bytes(ds))
        else:
            _write_atomic(staging_dir / DICOM_DIR / "RTPLAN.dcm", plan_file.read_bytes())
        self._stage_medium(medium, ds, staging_dir / DICOM_DIR, pseudo, plan)

        inputs: dict[int, str] = {}
        for beam in plan.beams:
            if beam.delivery_dir is None:
                raise CaseRejected(f"beam {beam.number} has no delivery folder; the case is incomplete")
            folders = [d.folder for d in matched.get(beam.number, [])]
            sources = [case_dir / folder for folder in folders]
            if (not folders or folders[0] != beam.delivery_dir or Path(beam.delivery_dir).name != beam.delivery_dir
                    or any(source.is_symlink() or not source.is_dir() for source in sources)):
                raise CaseRejected(f"the delivery folder of beam {beam.number} is gone, changed "
                                   "or is not a folder inside the case; retry the case")
            beam_stage = staging_dir / "beams" / str(beam.number)
            try:
                self._copy_delivery(sources, beam_stage / "logs", pseudo, beam.number)
            except OSError as exc:
                if exc.errno != errno.ENAMETOOLONG:
                    raise
                raise CaseRejected(f"beam {beam.number}: a file name in its delivery folder is too long to be "
                                   "staged; shorten it (or let deidentify rename the logs), then retry") from None
            relative = f"beams/{beam.number}/moqui_tps_{beam.number}.in"
            details = next((b for b in plan.info.get("beam_details", []) if b.get("number") == beam.number), {})
            attempt = int(plan.info.get(PREPARE_ATTEMPT, 1) or 1)
            text = self.input_text(beam.number, remote_dir, beam_name=beam.name, machine=details.get("machine", ""),
                                   attempt=attempt)
            _write_atomic(staging_dir / relative, text.encode("utf-8"))
            record = self.run_record(text, medium, len(matched.get(beam.number, [])))
            record["prepare_attempt"] = attempt
            _write_atomic(beam_stage / RUN_RECORD, json.dumps(record, indent=1, sort_keys=True).encode("utf-8"))
            if beam.number in analysis:  # the full delivery analysis, per-spot differences included
                _write_atomic(beam_stage / DELIVERY_ANALYSIS, json.dumps(analysis[beam.number]).encode("utf-8"))
            inputs[beam.number] = relative
        if settings.engine_profile == "moqui-logs":
            self._stage_fork_logs(plan, matched, summary, case_dir, staging_dir / FORK_LOGS)
        if pseudo is not None:
            self._keep_mapping(staging_dir.name, pseudo)
        return inputs

    def _stage_fork_logs(self, plan: CasePlan, matched: dict[int, list[Delivery]], summary: Any,
                         case_dir: Path, target: Path) -> None:
        """The fork's converted-log tree: ``Field<nnn>`` for every beam number up to the
        highest simulated one (the fork takes the folder at index number - 1), each simulated
        beam's ``<layer>_<energy>MeV.csv`` files in its own, their energies checked against
        the plan's layers; numbers without a simulated beam get an empty folder."""
        simulated = {b.number for b in plan.beams}
        for number in range(1, max(simulated) + 1):
            folder = target / fork_field_folder(number)
            folder.mkdir(parents=True, exist_ok=True)
            if number not in simulated:
                continue
            deliveries = matched.get(number, [])
            files = fork_csv_files([case_dir / d.folder for d in deliveries], number)
            energies = fork_csv_energies(list(files))
            check_layers(number, [Delivery(deliveries[0].folder, deliveries[0].position, frozenset(energies),
                                           energies)], summary.treatment[number].energies,
                         self.settings.layer_energy_tolerance_mev)
            for name, source in files.items():
                _copy_atomic(source, folder / name)

    def run_record(self, input_text: str, medium: "ImageSet | Phantom", sessions: int) -> dict[str, Any]:
        """What a result must say about how it was computed (``beams/<n>/run.json``, copied
        into ``summary.json`` by post-processing): the engine profile, the seed, statistics,
        scaling (RBE, fractions), the medium (patient CT or water phantom) and the number of
        delivery sessions merged. PHI-free."""
        keys = dict(line.split(" ", 1) for line in input_text.splitlines() if " " in line)
        if "RBE" not in keys:  # the fork scales by neither
            return {
                "profile": self.settings.engine_profile, "random_seed": int(keys["RandomSeed"]),
                "particles_per_history": float(keys["ParticlesPerHistory"]),
                "max_histories_per_batch": int(keys["MaxHistoriesPerBatch"]), "scorer": keys.get("Scorer", ""),
                "gantry_number": int(keys["GantryNum"]) if keys.get("GantryNum", "").isdigit() else None,
                "rbe": None, "number_of_fractions": None,
                "dose": "as the fork scores it (no RBE or fraction scaling)",
                "medium": medium.info(), "delivery_sessions": sessions}
        return {
            "profile": self.settings.engine_profile,
            "random_seed": int(keys["RandomSeed"]),
            "particles_per_history": float(keys["ParticlesPerHistory"]),
            "max_histories_per_batch": int(keys["MaxHistoriesPerBatch"]),
            "scorer": keys.get("Scorer", ""),
            "machine": keys.get("Machine", ""),
            "calibration": keys.get("Calibration", ""),
            "rbe": float(keys["RBE"]),
            "number_of_fractions": int(keys["NumberOfFraction"]),
            "dose": ("RBE-weighted" if float(keys["RBE"]) != 1.0 else "physical") + ", "
                    + ("one fraction" if int(keys["NumberOfFraction"]) == 1 else f"{keys['NumberOfFraction']} fractions"),
            "medium": medium.info(),
            "delivery_sessions": sessions,
        }

    def _stage_medium(self, medium: "ImageSet | Phantom", ds: Any, target: Path, pseudo: Optional[Pseudonymizer],
                      plan: CasePlan) -> None:
        """Write the CT slices (``CT.<k>.dcm`` in slice order) and ``RTSTRUCT.dcm`` beside the
        plan, de-identified with the plan's keys so that their references still match; or the
        water phantom's slices, in the (staged) plan's frame of reference."""
        import pydicom

        if isinstance(medium, Phantom):
            centre = next((b.get("isocenter") for b in plan.info.get("beam_details", []) if b.get("isocenter")),
                          None) or (0.0, 0.0, 0.0)
            images = phantom_series(ds, medium, centre)
            self._drop_stale_slices(target, len(images))
            for k, image in enumerate(images, 1):
                _write_atomic(target / f"CT.{k:04d}.dcm", _dataset_bytes(image))
            return
        self._drop_stale_slices(target, len(medium.ct))
        sources = [(f"CT.{k:04d}.dcm", path) for k, path in enumerate(medium.ct, 1)]
        if medium.structure is not None:
            sources.append(("RTSTRUCT.dcm", medium.structure))
        for name, path in sources:
            if pseudo is None:
                _copy_atomic(path, target / name)
                continue
            with quiet_pydicom():
                image = pydicom.dcmread(str(path), force=True)
            deidentify_dataset(image, pseudo)
            _write_atomic(target / name, _dataset_bytes(image))

    @staticmethod
    def _drop_stale_slices(target: Path, count: int) -> None:
        """Remove slices an earlier preparation of this case staged beyond ``count`` (the
        engine reads every CT file of DicomDir)."""
        for stale in target.glob("CT.*.dcm"):
            index = stale.name.split(".")[1]
            if not index.isdigit() or int(index) > count:
                stale.unlink()

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

    def input_text(self, beam_number: int, remote_dir: str, *, beam_name: str = "", machine: str = "",
                   attempt: int = 1) -> str:
        """The ``moqui_tps_<n>.in`` content for one beam, in the keys of the engine profile
        (:mod:`mqi_moqui.profiles`; docs/real-moqui.md). Paths refer to ``remote_dir`` (POSIX):
        ``DicomDir`` and ``logFilePath`` are relative to ``ParentDir``, as both engines join
        them; ``OutputDir`` is absolute."""
        s: MoquiSettings = self.settings
        parent = remote_dir.rstrip("/") or "/"
        case = posixpath.basename(parent)
        beam_rel = posixpath.join("beams", str(beam_number))
        keys: dict[str, str] = {
            "GPUID": str(s.gpu_id),
            "RandomSeed": str(beam_seed(case, beam_number, s.random_seed, attempt)),
            "UseAbsolutePath": "false",
            "ParentDir": parent,
            "DicomDir": DICOM_DIR,
            "logFilePath": FORK_LOGS,
            "GantryNum": str(gantry_number(s.gantry_numbers, machine) or ""),
            "OutputDir": posixpath.join(parent, beam_rel, "output"),
            "OutputFormat": s.output_format,
            "OverwriteResults": "true",  # a retry writes where the failed attempt did
            "SimulationType": "perBeam",
            "BeamNumbers": str(beam_number),
            "SourceType": "FluenceMap",
            "Machine": s.machines.get(machine, s.default_machine),
            "Calibration": s.calibrations.get(machine, s.default_calibration),
            "Scorer": s.scorer,
            "ParticlesPerHistory": f"{s.particles_per_history:g}",
            "MaxHistoriesPerBatch": str(s.max_histories_per_batch),
            "TotalThreads": "-1",
            "RBE": f"{s.rbe:g}",
            "NumberOfFraction": str(s.number_of_fractions),
        }
        keys = {key: keys[key] for key in KEYS[s.engine_profile]}
        fields = {"beam": beam_number, "beam_name": beam_name, "case": case, "case_dir": parent,
                  "beam_dir": posixpath.join(parent, beam_rel)}
        for key, value in s.extra_keys.items():
            keys[key] = str(value).format_map(fields)
        return "".join(f"{key} {value}\n" for key, value in keys.items())

    def _copy_delivery(self, sources: list[Path], target: Path, pseudo: Optional[Pseudonymizer], beam: int) -> None:
        """Stage the files of ``delivery_files`` (top level only, no symlinks) of a beam's
        delivery folders (in layer order: a resumed delivery is several) into one folder:
        one PlanInfo.txt (the first folder's, its STOP_LAYER_NUMBER the last's) and one
        PlanRange.txt (every folder's rows). With ``pseudo`` both are rewritten by their
        allowlists and log files renamed."""
        target.mkdir(parents=True, exist_ok=True)
        patterns = self.settings.delivery_files
        files: dict[str, Path] = {}
        texts: dict[str, list[bytes]] = {PLAN_INFO: [], PLAN_RANGE: []}
        for source in sources:
            for entry in sorted(os.scandir(source), key=lambda e: e.name):
                if not entry.is_file(follow_symlinks=False) or \
                        not any(fnmatch.fnmatchcase(entry.name, p) for p in patterns):
                    continue
                if entry.name in texts:
                    what = f"{entry.name} of the delivery of beam {beam}"
                    texts[entry.name].append(read_text_file(Path(entry.path), what))
                elif entry.name in files:
                    raise CaseRejected(f"beam {beam}: two of its delivery folders hold a file of the same name; "
                                       "a resumed delivery's logs are named by layer: export them again")
                else:
                    files[entry.name] = Path(entry.path)
        renamed: dict[str, str] = {}
        if pseudo is not None:  # machine logs are named after the patient; other files keep their names
            logs = [n for n in sorted(files) if n.lower().endswith(LOG_SUFFIXES)]
            renamed = {name: delivery_file_name(name, pseudo, i) for i, name in enumerate(logs, 1)}
        if texts[PLAN_INFO]:
            info = merge_plan_info(texts[PLAN_INFO])
            _write_atomic(target / PLAN_INFO, deidentify_plan_info(info, pseudo) if pseudo is not None else info)
        if texts[PLAN_RANGE]:
            ranges = merge_plan_range(texts[PLAN_RANGE])
            _write_atomic(target / PLAN_RANGE,
                          deidentify_plan_range(ranges, pseudo, renamed) if pseudo is not None else ranges)
        for name, src in sorted(files.items()):
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

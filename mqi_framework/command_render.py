"""What a worker is told: the bodies of the commands the conductor sends.

A command carries everything its consumer needs (case paths, the rendered shell command,
the job key, the GPU), so that no worker reads the conductor's tables. Two commands exist:

``run_step``
    run attempt ``attempt`` of step ``step_id`` (:func:`run_step`).
``cancel_step``
    attempt ``attempt`` of step ``step_id`` is given up: kill its job if it runs, drop its
    ``run_step`` if it has not arrived yet (:func:`cancel_step`).

Shell quoting: a step's ``command:`` template is filled with every value shell-quoted
(:func:`fill_shell`), so a value (a workspace path with spaces, a ``workflow.vars`` entry,
a path an interpreter chose) is always exactly one shell word and is never interpreted by
the shell. ``workdir:``, ``env:`` and ``outputs:`` are not given to a shell and are filled
with the raw values (:func:`fill_plain`).
"""

from __future__ import annotations

import posixpath
import shlex
import sys
from pathlib import Path
from typing import Any, Mapping, Optional

from mqi_framework.config import LoadedConfig, StepConfig
from mqi_framework.logfields import job_key

__all__ = ["cancel_step", "fill_plain", "fill_shell", "run_step", "template_values"]


def fill_shell(template: str, values: Mapping[str, Any]) -> str:
    """``template`` with each ``{name}`` replaced by the shell-quoted value (one shell word)."""
    return template.format_map({k: shlex.quote(str(v)) for k, v in values.items()})


def fill_plain(template: str, values: Mapping[str, Any]) -> str:
    """``template`` with each ``{name}`` replaced by the value as it is (no shell involved)."""
    return template.format_map({k: str(v) for k, v in values.items()})


def template_values(loaded: LoadedConfig, uid: str, attempt: int, *, beam: Optional[int] = None,
                    input_rel: Optional[str] = None, gpu_index: Optional[int] = None) -> dict[str, Any]:
    """The values a step template may use: ``workflow.vars`` plus ``python``, ``case``,
    ``case_dir``, ``staging_dir``, ``results_dir``, ``attempt`` and, for a per-beam step,
    ``beam``, ``beam_dir``, ``input_file``, ``local_beam_dir`` (and ``gpu`` on a GPU step)."""
    case_dir = posixpath.join(loaded.remote_root.replace("\\", "/"), uid)
    results_dir = str(loaded.workspace / "results" / uid)
    values: dict[str, Any] = dict(loaded.config.workflow.vars)
    values.update(python=sys.executable, case=uid, case_dir=case_dir,
                  staging_dir=str(loaded.workspace / "staging" / uid), results_dir=results_dir, attempt=attempt)
    if beam:
        rel = input_rel or f"beam_{beam}/input"
        beam_rel = posixpath.dirname(rel)
        values.update(beam=beam, beam_dir=posixpath.join(case_dir, beam_rel), input_file=posixpath.join(case_dir, rel),
                      local_beam_dir=str(Path(results_dir) / beam_rel))
    if gpu_index is not None:
        values["gpu"] = gpu_index
    return values


def run_step(loaded: LoadedConfig, case: Mapping[str, Any], step_index: int, step: StepConfig, step_id: int,
             attempt: int, *, beam: Optional[int] = None, input_rel: Optional[str] = None,
             gpu: Optional[Mapping[str, Any]] = None) -> dict:
    """The ``run_step`` body for one attempt. ``case`` is the case row (``id``, ``uid``,
    ``path``, ``inbox``); ``gpu`` the allocated GPU row (``host``, ``idx``, ``uuid``)."""
    uid = case["uid"]
    values = template_values(loaded, uid, attempt, beam=beam, input_rel=input_rel,
                             gpu_index=gpu["idx"] if gpu is not None else None)
    body: dict[str, Any] = {
        "type": "run_step", "step_id": step_id, "attempt": attempt, "case": uid, "case_id": case["id"],
        "beam": beam, "step": step.name, "step_index": step_index, "worker": step.worker,
        "job_key": job_key(uid, step.name, beam, attempt),
        "case_path": case["path"], "inbox": case["inbox"], "staging_dir": values["staging_dir"],
        "remote_dir": values["case_dir"], "results_dir": values["results_dir"], "direction": step.direction,
        "timeout": step.timeout_seconds, "log_rules": step.log_rules,
    }
    if step.command:
        body["command"] = fill_shell(step.command, values)
        body["workdir"] = fill_plain(step.workdir or ("{beam_dir}" if beam else "{case_dir}"), values)
        body["env"] = {k: fill_plain(v, values) for k, v in step.env.items()}
        body["outputs"] = [fill_plain(o, values) for o in step.outputs]
    if gpu is not None:
        body["gpu"] = {"host": gpu["host"], "index": gpu["idx"], "uuid": gpu["uuid"]}
    return body


def cancel_step(run: Mapping[str, Any], reason: str) -> dict:
    """The ``cancel_step`` body that gives up the attempt ``run`` (a ``run_step`` body) asked for."""
    return {"type": "cancel_step", "step_id": run["step_id"], "attempt": run["attempt"],
            "job_key": run.get("job_key"), "case": run.get("case"), "beam": run.get("beam"),
            "step": run.get("step"), "worker": run.get("worker"), "reason": reason}

"""Helpers for writing plugin implementations: the public, stable names a transfer,
executor, curator or site plugin may build on. Everything here is also what the host's
own plugins use, so a site plugin gets the same guarantees:

* paths that never leave their root: :func:`is_within`, :func:`safe_join`,
  :func:`safe_component`, :class:`PathEscapeError`;
* files written atomically and durably: :func:`write_atomic`, :func:`part_path`,
  :func:`fsync_dir`; trees removed without following links: :func:`remove_tree`;
* verified copies and hashes: :func:`copy_verified`, :func:`sha256_file`,
  :class:`VerificationError`;
* transferred trees and their manifest: :func:`walk_tree`, :class:`TreeFile`,
  :func:`manifest_text`, :func:`write_manifest`, :data:`MANIFEST`, :data:`PART_SUFFIX`;
* short commands, locally (no shell) or on a remote shell: :func:`run_local`,
  :class:`RemoteShell`, :class:`CommandResult`, :func:`as_result`; over mqi-ssh's shared
  connection: :func:`ssh_shell`, :func:`require_ssh_plugin`; another plugin one builds on:
  :func:`optional_plugin`, :class:`PluginMissing`;
* log lines in the one format (``case=… beam=… step=… attempt=… job=…``): :func:`log_fields`,
  :func:`job_log_fields` (from a job key, all an executor knows);
* what a case may cost: :func:`measure_case` (apparent sizes, stops at a limit),
  :func:`human_bytes` for messages;
* waits the host must not mistake for a hang (the heartbeat goes on): :func:`waiting`;
* settings validated into an attrs class with the config's errors (YAML paths):
  :func:`structure_settings`;
* the builtin local executor, to extend (``class MyLauncher(LocalExecutor)``):
  :class:`LocalExecutor` (its :meth:`~LocalExecutor.job_dir` is where a job's files are).
"""

from __future__ import annotations

from mqi_framework.builtin.local_executor import LocalExecutor
from mqi_framework.commands import (CommandResult, PluginMissing, RemoteShell, as_result, optional_plugin,
                                    require_ssh_plugin, run_local, ssh_shell)
from mqi_framework.configload import structure as structure_settings
from mqi_framework.files import PART_SUFFIX, fsync_dir, part_path, remove_tree, write_atomic
from mqi_framework.hashing import VerificationError, copy_verified, sha256_file
from mqi_framework.limits import human_bytes, measure_case
from mqi_framework.logfields import fields as log_fields
from mqi_framework.logfields import from_job_key as job_log_fields
from mqi_framework.safepath import PathEscapeError, is_within, safe_component, safe_join
from mqi_framework.tree import MANIFEST, TreeFile, manifest_text, walk_tree, write_manifest
from mqi_framework.waits import waiting

__all__ = [
    "CommandResult", "LocalExecutor", "MANIFEST", "PART_SUFFIX", "PathEscapeError", "PluginMissing",
    "RemoteShell", "TreeFile", "VerificationError", "as_result", "copy_verified", "fsync_dir",
    "human_bytes", "is_within", "job_log_fields", "log_fields", "manifest_text", "measure_case",
    "optional_plugin", "part_path",
    "remove_tree", "require_ssh_plugin", "run_local", "safe_component", "safe_join", "sha256_file", "ssh_shell",
    "structure_settings", "waiting", "walk_tree", "write_atomic", "write_manifest",
]

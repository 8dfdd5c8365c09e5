"""A site extends the host with pip only: the example plugins are installed into a fresh
virtual environment together with the core, listed, used for a real case, and removed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mqi_framework.workspace import fast_config, wait_until

pytestmark = pytest.mark.integration
samples = pytest.importorskip("mqi_moqui.samples")

ROOT = Path(__file__).resolve().parents[2]
FINAL = ("done", "failed", "rejected", "cancelled")


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """A fresh venv with the core, the Moqui, SSH and SFTP plugins and both example plugins,
    installed by pip (not editable: what a site gets)."""
    folder = tmp_path_factory.mktemp("site-venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    python = folder / "bin" / "python"
    packages = [ROOT, ROOT / "plugins" / "mqi-moqui", ROOT / "plugins" / "mqi-ssh", ROOT / "plugins" / "mqi-sftp",
                ROOT / "examples" / "site-worklist", ROOT / "examples" / "site-launcher"]
    proc = subprocess.run([str(python), "-m", "pip", "install", "--quiet", *map(str, packages)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return folder


def mqi(venv: Path, *args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / "mqi-host"), *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env={k: v for k, v in os.environ.items() if not k.startswith("MQI_")})


def site_config(folder: Path) -> Path:
    data = fast_config()
    data["workers"]["scan"] = {"plugin": "site.worklist", "interval_seconds": 0.3,
                               "settings": {"worklist": "worklist.csv", "root": "cases"}}
    data["workers"]["execute"] = {"plugin": "site.launcher", "interval_seconds": 0.2,
                                  "settings": {"site_label": "clinic"}}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "mqi.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_installed_examples_are_listed(venv):
    proc = mqi(venv, "--plugins", "--json")
    assert proc.returncode == 0, proc.stderr
    listing = {p["name"]: p for p in json.loads(proc.stdout)}
    assert listing["site.worklist"]["distribution"] == "mqi-site-worklist"
    assert listing["site.worklist"]["provides"] == ["scanner site.worklist"]
    assert listing["site.launcher"]["provides"] == ["executor site.launcher"]
    assert listing["site.launcher"]["source"] == "entry point"
    assert listing["ssh"]["status"] == "ok" and listing["ssh"]["provides"] == ["executor ssh"]
    assert listing["sftp"]["distribution"] == "mqi-sftp" and listing["sftp"]["provides"] == ["transfer sftp"]


def test_a_config_selecting_them_runs_a_case_to_done(venv, tmp_path):
    config = site_config(tmp_path / "site")
    samples.generate_case(tmp_path / "site" / "cases", "WL 001", seed=11)
    (tmp_path / "site" / "worklist.csv").write_text("folder,status\nWL 001,ready\n")
    check = mqi(venv, "check", "-c", str(config))
    assert check.returncode == 0, check.stdout + check.stderr
    host = subprocess.Popen([str(venv / "bin" / "mqi-host"), "run", "-c", str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "MQI_STANDIN_SECONDS": "0.5"})
    try:
        def finished() -> bool:
            proc = mqi(venv, "cases", "--json", "-c", str(config))
            return proc.returncode == 0 and any(c["state"] in FINAL for c in json.loads(proc.stdout))

        assert wait_until(finished, 90, 0.5)
    finally:
        os.killpg(host.pid, 15)
        host.wait(timeout=30)
    (case,) = json.loads(mqi(venv, "cases", "--json", "-c", str(config)).stdout)
    assert case["state"] == "done", case
    assert samples.outputs_missing(tmp_path / "site", case) == []
    logs = list((tmp_path / "site" / "jobs").glob("*simulate*/output.log"))
    assert len(logs) == 3 and all("[clinic launcher] starting" in p.read_text() for p in logs)


def test_uninstalled_plugin_is_named_with_its_config_key(venv, tmp_path):
    config = site_config(tmp_path / "site2")
    (tmp_path / "site2" / "cases").mkdir()
    (tmp_path / "site2" / "worklist.csv").write_text("folder,status\n")
    proc = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "uninstall", "--yes", "mqi-site-worklist"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    check = mqi(venv, "check", "-c", str(config))
    out = check.stdout + check.stderr
    assert check.returncode == 2, out
    assert "workers.scan.plugin" in out and "site.worklist" in out
    run = mqi(venv, "run", "-c", str(config), timeout=30)
    assert run.returncode == 2 and "workers.scan.plugin" in run.stderr

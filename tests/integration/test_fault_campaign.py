"""The short fault campaign (``benchmarks/faults.py --short``) as a test: real hosts under
SIGKILLs, locks, full disks, sshd and RabbitMQ outages, judged by the simulator ledger.

The seed is fixed so that a failure can be rerun (``python benchmarks/faults.py --short
--seed N``); ``MQI_TEST_FAULT_SEED`` picks another. Needs RabbitMQ with ``rabbitmqctl`` and
``/usr/sbin/sshd`` (``scripts/test`` provides both); skipped without them, except under
``CI=true``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
pytest.importorskip("mqi_sftp.transfer")
pytest.importorskip("mqi_ssh.executor")
pytest.importorskip("mqi_moqui.samples")

CAMPAIGN = Path(__file__).resolve().parents[2] / "benchmarks" / "faults.py"
SEED = int(os.environ.get("MQI_TEST_FAULT_SEED", "20261207"))


def load_campaign():
    spec = importlib.util.spec_from_file_location("mqi_fault_campaign", CAMPAIGN)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def needs(what: str, ok: bool) -> None:
    if ok:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"the fault campaign needs {what} (CI=true)", pytrace=False)
    pytest.skip(f"the fault campaign needs {what}")


@pytest.mark.parametrize("name", ["local-embedded", "ssh-rabbitmq"])
def test_short_fault_campaign_meets_every_target(tmp_path, name):
    campaign = load_campaign()
    scenario = next(s for s in campaign.scenarios(short=True) if s.name == name)
    if scenario.broker == "rabbitmq":
        needs("rabbitmqctl", shutil.which("rabbitmqctl") is not None)
        needs("RabbitMQ", campaign.rabbitmqctl("-q", "status", timeout=30).returncode == 0)
    if scenario.path == "ssh":
        needs("/usr/sbin/sshd", os.path.exists("/usr/sbin/sshd"))
    result = campaign.run_scenario(scenario, tmp_path, SEED)
    report = campaign.table([result], markdown=False) + "\n" + "\n".join(result.notes)
    assert result.missed() == [], report
    kinds = {k for k in result.by_kind if "not injected" not in k}
    expected = {f.split(":")[0] for f in scenario.faults} | {"kill"}
    if os.geteuid() != 0:  # tmpfs for the disk-full faults needs root
        expected -= {"results_disk_full", "remote_disk_full"}
    assert expected <= kinds, report
    assert result.by_kind["kill"] == scenario.kills, report
    assert result.cases >= scenario.cases and result.lying_failed == 1, report

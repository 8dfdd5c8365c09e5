"""Parsing recorded nvidia-smi outputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from mqi_gpu.nvidia_smi import parse, parse_line

FIXTURES = Path(__file__).parent / "fixtures"


def load(name: str):
    return parse((FIXTURES / name).read_text())


@pytest.mark.parametrize("name, count", [("gpus2_rtx_a6000.out", 2), ("gpus4_v100_one_busy.out", 4),
                                         ("gpus8_a100.out", 8)])
def test_2_4_and_8_gpus(name, count):
    out = load(name)
    assert [g.index for g in out.gpus] == list(range(count))
    assert out.skipped == []
    for gpu in out.gpus:
        assert gpu.uuid.startswith("GPU-") and gpu.name and gpu.errors == ()
        assert gpu.memory_total_mb and gpu.memory_used_mb is not None and gpu.memory_free_mb is not None
        assert gpu.utilization_pct is not None and gpu.temperature_c is not None


def test_values_are_read_as_numbers():
    busy = load("gpus4_v100_one_busy.out").gpus[1]
    assert (busy.name, busy.memory_total_mb, busy.memory_used_mb, busy.memory_free_mb, busy.temperature_c,
            busy.utilization_pct) == ("Tesla V100-SXM2-32GB", 32768, 30512, 1982, 61, 100)


def test_not_available_and_not_supported_are_none_not_errors():
    geforce, t4 = load("na_fields.out").gpus
    assert geforce.utilization_pct is None and geforce.memory_free_mb == 10979 and geforce.errors == ()
    assert t4.name == "Tesla T4" and t4.errors == ()
    assert (t4.memory_total_mb, t4.memory_used_mb, t4.memory_free_mb, t4.temperature_c, t4.utilization_pct) == (
        None, None, None, None, None)


def test_mig_gpu_has_no_utilization_and_mig_instance_lines_are_skipped():
    mig = load("mig.out")
    assert mig.gpus[0].utilization_pct is None and mig.gpus[0].errors == ()
    with_instances = load("mig_instances.out")
    assert [g.index for g in with_instances.gpus] == [0, 1]
    assert [g.uuid for g in with_instances.gpus] == [g.uuid for g in mig.gpus]
    assert len(with_instances.skipped) == 2 and all("MIG-" in s for s in with_instances.skipped)


def test_lost_gpu_and_unknown_error_are_errors():
    ok, lost, unknown = load("gpu_lost.out").gpus
    assert ok.errors == ()
    assert lost.errors and all("GPU is lost" in e for e in lost.errors) and lost.memory_used_mb is None
    assert unknown.errors and "Unknown Error" in unknown.errors[0]


def test_error_lines_and_truncated_lines_are_skipped():
    handle = load("handle_error.out")
    assert [g.index for g in handle.gpus] == [0] and handle.skipped[0].startswith("Unable to determine")
    truncated = load("truncated.out")
    assert [g.index for g in truncated.gpus] == [0] and len(truncated.skipped) == 1
    assert load("no_driver.out").gpus == [] and load("no_devices.out").gpus == []


def test_odd_lines():
    assert parse_line("") is None
    assert parse_line("index, uuid, name") is None
    comma = parse_line("3, GPU-x, Vendor GPU, rev 2, 100, 1, 99, 40, 5")
    assert comma is not None and comma.name == "Vendor GPU, rev 2" and comma.utilization_pct == 5
    weird = parse_line("0, GPU-x, G, 100, abc, 1, 40, 5")
    assert weird is not None and weird.errors == ("memory.used: unreadable value 'abc'",)
    duplicate = parse("0, GPU-a, G, 1, 1, 1, 1, 1\n0, GPU-b, G, 1, 1, 1, 1, 1\n")
    assert [g.uuid for g in duplicate.gpus] == ["GPU-a"] and len(duplicate.skipped) == 1

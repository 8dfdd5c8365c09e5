"""A fake ``nvidia-smi`` on PATH that prints a recorded output, so the curator's real
subprocess path (argv, exit code, timeout) is exercised without a GPU."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import pytest

FIXTURES = Path(__file__).parent / "fixtures"

#: the exit code nvidia-smi gives with each recorded output (default 0)
EXIT_CODES = {"handle_error.out": 15, "no_driver.out": 9, "no_devices.out": 6}

EXPECTED_ARGS = ("--query-gpu=index,uuid,name,memory.total,memory.used,memory.free,temperature.gpu,utilization.gpu "
                 "--format=csv,noheader,nounits")

SCRIPT = """#!/bin/sh
# fake nvidia-smi: prints the file named in ./stdout with exit code ./rc, after ./sleep seconds
d="$(dirname "$0")"
echo "$*" >> "$d/calls"
if [ "$*" != "{expected}" ]; then
    echo "fake nvidia-smi: unexpected arguments: $*" >&2
    exit 2
fi
[ -f "$d/sleep" ] && sleep "$(cat "$d/sleep")"
[ -f "$d/stderr" ] && cat "$d/stderr" >&2
[ -f "$d/stdout" ] && cat "$(cat "$d/stdout")"
exit "$(cat "$d/rc" 2>/dev/null || echo 0)"
"""


class FakeNvidiaSmi:
    """Controls the fake: ``serve(fixture)``, ``hang(seconds)``, ``calls()``."""

    def __init__(self, folder: Path) -> None:
        self.bin = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "nvidia-smi"
        self.path.write_text(SCRIPT.format(expected=EXPECTED_ARGS))
        self.path.chmod(0o755)

    def serve(self, fixture: str, *, rc: Optional[int] = None, stderr: str = "") -> "FakeNvidiaSmi":
        source = FIXTURES / fixture
        assert source.is_file(), source
        (self.bin / "stdout").write_text(str(source))
        (self.bin / "rc").write_text(str(EXIT_CODES.get(fixture, 0) if rc is None else rc))
        if stderr:
            (self.bin / "stderr").write_text(stderr)
        else:
            (self.bin / "stderr").unlink(missing_ok=True)
        return self

    def serve_text(self, text: str, *, rc: int = 0) -> "FakeNvidiaSmi":
        custom = self.bin / "custom.out"
        custom.write_text(text)
        (self.bin / "stdout").write_text(str(custom))
        (self.bin / "rc").write_text(str(rc))
        return self

    def hang(self, seconds: Optional[float]) -> None:
        if seconds:
            (self.bin / "sleep").write_text(str(seconds))
        else:
            (self.bin / "sleep").unlink(missing_ok=True)

    def calls(self) -> list[str]:
        path = self.bin / "calls"
        return path.read_text().splitlines() if path.exists() else []

    def env(self) -> dict[str, str]:
        return {"PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}"}


@pytest.fixture
def fake_smi(tmp_path, monkeypatch) -> FakeNvidiaSmi:
    fake = FakeNvidiaSmi(tmp_path / "fake-bin")
    monkeypatch.setenv("PATH", fake.env()["PATH"])
    return fake

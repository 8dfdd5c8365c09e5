from __future__ import annotations

from pathlib import Path

import pytest

from mqi_moqui.interpreter import MoquiInterpreter, MoquiSettings


@pytest.fixture
def interpreter() -> MoquiInterpreter:
    return MoquiInterpreter(MoquiSettings(), None)


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    folder = tmp_path / "inbox"
    folder.mkdir()
    return folder

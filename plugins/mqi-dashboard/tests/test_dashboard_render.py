"""How states are drawn (issue 19: `waiting` was yellow and read as stuck)."""

from __future__ import annotations

from mqi_dashboard.rendering import _state_class


def test_progress_is_not_drawn_as_a_warning():
    assert _state_class("waiting") == _state_class("running") == "st-active"  # a step done, siblings running
    assert _state_class("queued") == _state_class("retrying") == _state_class("incomplete") == "st-wait"
    assert _state_class("failed") == "st-failed" and _state_class("done") == "st-done"

"""One log format for everything about a case (case= beam= step= attempt= job=)."""

from mqi_framework import logfields


def test_fields_leave_out_what_does_not_apply():
    assert logfields.fields("case-000042", 3, "simulate", 1, "k") == "case=case-000042 beam=3 step=simulate attempt=1 job=k"
    assert logfields.fields("case-000042", 0, "prepare", 2) == "case=case-000042 step=prepare attempt=2"
    assert logfields.fields(job="x") == "job=x"


def test_a_job_key_gives_back_its_fields_even_with_dashes_in_the_step_name():
    key = logfields.job_key("case-000042", "dose-sum", 12, 3)
    assert key == "case-000042-dose-sum-b12-a3"
    assert logfields.from_job_key(key) == f"case=case-000042 beam=12 step=dose-sum attempt=3 job={key}"
    assert logfields.from_job_key("case-000001-prepare-b0-a1") == \
        "case=case-000001 step=prepare attempt=1 job=case-000001-prepare-b0-a1"


def test_a_key_of_another_shape_is_logged_as_it_is():
    assert logfields.from_job_key("site job 7") == "job=site job 7"


def test_a_command_gives_its_fields():
    body = {"case": "case-000007", "beam": 2, "step": "simulate", "attempt": 1, "job_key": "case-000007-simulate-b2-a1"}
    assert logfields.from_command(body) == "case=case-000007 beam=2 step=simulate attempt=1 job=case-000007-simulate-b2-a1"

"""The HTML pages (each refreshes its live part through the same URL)."""

from __future__ import annotations

from flask import Blueprint, Response

from mqi_dashboard import data
from mqi_dashboard.rendering import page

blueprint = Blueprint("pages", __name__)


@blueprint.get("/")
def overview() -> Response:
    return page("overview.html", title="Overview", d=data.overview_data())


@blueprint.get("/cases")
def cases() -> Response:
    return page("cases.html", title="Cases", d=data.cases_data())


@blueprint.get("/cases/<ident>")
def case(ident: str) -> Response:
    d = data.case_data(ident)
    return page("case.html", title=d["id"], d=d)


@blueprint.get("/gpus")
def gpus() -> Response:
    return page("gpus.html", title="GPUs", d=data.gpus_data())


@blueprint.get("/workers")
def workers() -> Response:
    return page("workers.html", title="Workers", d=data.workers_data())


@blueprint.get("/dlq")
def dlq() -> Response:
    return page("dlq.html", title="Dead letters", d=data.dlq_data())


@blueprint.get("/audit")
def audit() -> Response:
    return page("audit.html", title="Audit log", d=data.events_data())

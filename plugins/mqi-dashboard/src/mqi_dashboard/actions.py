"""The actions (POST, CSRF-checked by the guard): retry, cancel, dead-letter replay and purge,
each a :class:`mqi_framework.api.Host` operation in the name of the person logged in. The
form on a page and ``/api/...`` share the handler: a browser is redirected back with a
message, a script gets JSON."""

from __future__ import annotations

import logging
import re
from typing import Any, Callable

from flask import Blueprint, Response, flash, jsonify, redirect, request, url_for

from mqi_framework.api import ActionRefused, CaseNotFound, Host, views

from mqi_dashboard.data import case_row
from mqi_dashboard.requests import (BadParam, action_params, bool_arg, dashboard, int_arg, request_actor, safe_next,
                                    wants_json)

log = logging.getLogger(__name__)

blueprint = Blueprint("actions", __name__)


def _done(message: str, status: int = 200, *, back: str, **data: Any) -> Response:
    if wants_json():
        payload = {"ok": status < 400, "message": message, **data}
        if status >= 400:
            payload["error"] = message
        response = jsonify(payload)
        response.status_code = status
        return response
    flash(message, "error" if status >= 400 else "ok")
    return redirect(safe_next(request.form.get("next"), back), code=303)


def _steer(ident: str, what: str, call: Callable[[Host, str], str]) -> Response:
    row = case_row(ident)
    uid = row["uid"]
    back = url_for("pages.case", ident=uid)
    who = request_actor()
    with dashboard().host(who) as host:
        try:
            state = call(host, uid)
        except (ActionRefused, CaseNotFound) as exc:
            hidden = None if dashboard().settings.show_patient_names else row["name"]
            return _done(views.redact(str(exc), hidden), 409, back=back, case=uid)
    log.info("dashboard: %s %s by %s -> %s", what, uid, who, state)
    return _done(f"{uid}: {what} requested, now {state}", back=back, case=uid, state=state)


@blueprint.post("/cases/<ident>/retry")
@blueprint.post("/api/cases/<ident>/retry", endpoint="api_retry")
def retry(ident: str) -> Response:
    beam = int_arg(action_params(), "beam", None, 1, 10_000)
    what = f"retry of beam {beam}" if beam else "retry"
    return _steer(ident, what, lambda host, uid: host.retry(uid, beam=beam))


@blueprint.post("/cases/<ident>/cancel")
@blueprint.post("/api/cases/<ident>/cancel", endpoint="api_cancel")
def cancel(ident: str) -> Response:
    return _steer(ident, "cancel", lambda host, uid: host.cancel(uid))


def _dead_letter_action(action: str) -> Response:
    source = action_params()
    every = bool_arg(source, "all") if not isinstance(source.get("all"), bool) else source["all"]
    raw = source.getlist("id") if hasattr(source, "getlist") else source.get("ids", [])
    if not isinstance(raw, list) or any(not re.fullmatch(r"\d{1,18}", str(i)) for i in raw):
        raise BadParam("id must be dead-letter ids (numbers)")
    ids = [str(i) for i in raw]
    if not every and not ids:
        raise BadParam(f"name the dead letters to {action} (id=...) or send all=1")
    who = request_actor()
    dash = dashboard()
    with dash.host(who) as host:
        done = (host.replay_dead_letters if action == "replay" else host.purge_dead_letters)(None if every else ids)
    dash.forget_queue_stats()
    back = url_for("pages.dlq")
    if not done:
        return _done(f"no such dead letter(s): nothing to {action}", 404, back=back)
    log.info("dashboard: %s %d dead letter(s) %s by %s", action, len(done), done, who)
    verb = "replayed" if action == "replay" else "purged"
    return _done(f"{verb} {len(done)} dead letter(s)", back=back, count=len(done), ids=done)


@blueprint.post("/dlq/replay")
@blueprint.post("/api/dlq/replay", endpoint="api_dlq_replay")
def dlq_replay() -> Response:
    return _dead_letter_action("replay")


@blueprint.post("/dlq/purge")
@blueprint.post("/api/dlq/purge", endpoint="api_dlq_purge")
def dlq_purge() -> Response:
    return _dead_letter_action("purge")

"""Every route and action of the dashboard through Flask's test client, on synthetic state."""

from __future__ import annotations

import re
import types

import pytest

from mqi_framework import hookimpl
from mqi_framework.store import connect
from mqi_framework.worker import make_broker

PAGES = ["/", "/cases", "/cases?state=failed", "/cases?attention=1", "/cases?q=PLAN-0", "/cases?page=2&per_page=10",
         "/cases/case-000001", "/cases/case-000030", "/gpus", "/workers", "/dlq", "/audit", "/audit?people=1"]
API = ["/api/overview", "/api/cases", "/api/cases/case-000001", "/api/gpus", "/api/workers", "/api/queues",
       "/api/dlq", "/api/events", "/api/session"]


def events(db, kind):
    conn = connect(db, readonly=True)
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM events WHERE kind = ? ORDER BY id", (kind,))]
    finally:
        conn.close()


def case_state(db, uid):
    conn = connect(db, readonly=True)
    try:
        return conn.execute("SELECT state FROM cases WHERE uid = ?", (uid,)).fetchone()[0]
    finally:
        conn.close()


def dead_letter(loaded, case="case-000003", step="prepare", reason_extra="PATIENT-000003"):
    """Put one command on the DLQ (as a worker that gave up on it would); return its id."""
    broker = make_broker(loaded)
    try:
        broker.publish("mqi.prepare", {"type": "command", "case": case, "step": step, "attempt": 1, "step_id": 1,
                                       "case_path": f"/srv/inbox/{reason_extra}"})
        delivery = broker.get("mqi.prepare", timeout=1)
        broker.nack(delivery, reason=f"FileNotFoundError: /srv/inbox/{reason_extra}/RP.dcm", retry=False)
        return broker.dlq_list()[-1].id
    finally:
        broker.close()


# --------------------------------------------------------------------------- pages and API


@pytest.mark.parametrize("url", PAGES)
def test_pages_render(client, url):
    response = client.get(url)
    assert response.status_code == 200, response.data[:500]
    assert response.mimetype == "text/html"
    html = response.get_data(as_text=True)
    assert '<main id="live">' in html and "</html>" in html


@pytest.mark.parametrize("url", API)
def test_api_answers_json(client, url):
    response = client.get(url)
    assert response.status_code == 200
    assert response.is_json


def test_every_get_route_is_covered(make_app):
    """A new page or API route without a test here fails this test."""
    app = make_app()
    covered = {u.split("?")[0] for u in PAGES + API} | {"/metrics", "/healthz", "/login"}
    for rule in app.url_map.iter_rules():
        if "GET" not in rule.methods or rule.endpoint == "static":
            continue
        path = re.sub(r"<[^>]+>", "case-000001", rule.rule)
        assert path in covered, f"route {rule.rule} has no test"


def test_overview_shows_counts_workers_gpus_and_attention(client, state_ws):
    data = client.get("/api/overview").get_json()
    by_state = state_ws.facts["by_state"]
    assert data["cases_by_state"] == by_state
    assert data["cases_total"] == 30
    assert sum(data["beams_by_state"].values()) > 0
    assert data["attention"]["total"] == by_state.get("failed", 0) + by_state.get("rejected", 0)
    assert {w["name"] for w in data["workers"]} >= {"conductor", "execute", "dashboard"}
    assert data["gpus"]["total"] == 4 and data["gpus"]["allocated"] >= 1
    assert data["today"]["detected"] >= 1
    assert len(data["throughput"]["hourly"]) == 24
    html = client.get("/").get_data(as_text=True)
    assert "Needing attention" in html and "retry" in html and "hung (no heartbeat)" in html


def test_case_list_filters_searches_and_paginates(client, state_ws):
    everything = client.get("/api/cases?per_page=500").get_json()
    assert everything["total"] == 30 and len(everything["cases"]) == 30
    assert [c["id"] for c in everything["cases"]][:2] == ["case-000030", "case-000029"]  # newest first
    page2 = client.get("/api/cases?per_page=10&page=2").get_json()
    assert page2["page"] == 2 and page2["pages"] == 3 and page2["cases"][0]["id"] == "case-000020"
    failed = client.get("/api/cases?state=failed").get_json()
    assert failed["total"] == len(state_ws.facts["failed"]) and all(c["state"] == "failed" for c in failed["cases"])
    attention = client.get("/api/cases?attention=1").get_json()
    assert all(c["attention"] for c in attention["cases"])
    by_id = client.get("/api/cases?q=case-000007").get_json()
    assert [c["id"] for c in by_id["cases"]] == ["case-000007"]
    assert client.get("/api/cases?q=7").get_json()["cases"][0]["id"] in ("case-000027", "case-000017", "case-000007")
    by_label = client.get("/api/cases?q=PLAN-05").get_json()
    assert [c["id"] for c in by_label["cases"]] == ["case-000005"]
    assert client.get("/api/cases?q=100%25_").get_json()["total"] == 0  # LIKE wildcards are literal
    beyond = client.get("/api/cases?page=99").get_json()
    assert beyond["cases"] == [] and beyond["total"] == 30
    html = client.get("/cases?per_page=10").get_data(as_text=True)
    assert "page 1 of 3" in html and "older" in html


def test_case_detail_has_beams_steps_attempts_timeline_and_events(client, state_ws):
    uid = state_ws.facts["failed"][0]
    data = client.get(f"/api/cases/{uid}").get_json()
    assert data["id"] == uid and data["state"] == "failed"
    assert [b["number"] for b in data["beams"]] == [1, 2, 3, 4]
    simulate = [s for s in data["steps"] if s["step"] == "simulate"]
    failed = [s for s in simulate if s["state"] == "failed"]
    assert len(failed) == 1 and len(failed[0]["attempts"]) == 2 and failed[0]["attempts"][-1]["exit_code"] == 3
    assert all(a["dispatched_at"] and a["finished_at"] for s in simulate for a in s["attempts"])
    assert any("FATAL ERROR" in a["log_tail"] for a in failed[0]["attempts"])
    assert data["events"]
    html = client.get(f"/cases/{uid}").get_data(as_text=True)
    assert '<svg class="gantt"' in html and "beam 4" in html and "failed attempt" in html
    assert "exit code 3" in html and "FATAL ERROR" in html
    assert f'action="/cases/{uid}/retry"' in html  # failed: the whole case and the failed beam can be retried
    assert 'name="beam"' in html
    running = client.get("/cases/case-000029").get_data(as_text=True)
    assert "<progress" in running and 'action="/cases/case-000029/cancel"' in running


def test_case_by_number_and_unknown_case(client):
    assert client.get("/api/cases/1").get_json()["id"] == "case-000001"
    response = client.get("/cases/case-999999")
    assert response.status_code == 404 and b"no case" in response.data
    api = client.get("/api/cases/case-999999")
    assert api.status_code == 404 and api.get_json()["error"].startswith("no case")
    assert client.get("/cases/bad%20name!").status_code == 400
    assert client.post("/api/cases/case-999999/retry", headers={"X-CSRF-Token": "x"}).status_code == 403


def test_unknown_case_is_404_for_actions(client, csrf_of):
    token = csrf_of(client)
    assert client.post("/api/cases/case-999999/retry", headers={"X-CSRF-Token": token}).status_code == 404
    assert client.post("/api/cases/case-999999/cancel", headers={"X-CSRF-Token": token}).status_code == 404


@pytest.mark.parametrize("url", [
    "/cases?page=abc", "/cases?page=0", "/cases?per_page=1000", "/cases?state=Bad!", "/cases?attention=maybe",
    "/cases?q=" + "x" * 101, "/api/cases?page=-1", "/api/cases?per_page=x", "/api/events?before=x",
    "/api/events?limit=0", "/audit?people=2",
])
def test_bad_query_parameters_are_400_not_500(client, url):
    response = client.get(url)
    assert response.status_code == 400, (url, response.status_code)
    if url.startswith("/api/"):
        assert "error" in response.get_json()


def test_bad_action_parameters_are_400(client, csrf_of, state_ws):
    headers = {"X-CSRF-Token": csrf_of(client)}
    uid = state_ws.facts["failed"][0]
    assert client.post(f"/api/cases/{uid}/retry", data={"beam": "abc"}, headers=headers).status_code == 400
    assert client.post("/api/dlq/replay", data={"id": "abc"}, headers=headers).status_code == 400
    assert client.post("/api/dlq/purge", data={}, headers=headers).status_code == 400
    assert client.post("/api/dlq/purge", json=[1, 2], headers=headers).status_code == 400
    assert client.post(f"/api/cases/{uid}/retry", json="beam", headers=headers).status_code == 400
    assert client.post("/api/dlq/replay", json={"ids": "1"}, headers=headers).status_code == 400
    assert client.get(f"/api/cases/{uid}/retry").status_code == 405


def test_unknown_page_is_404(client):
    assert client.get("/nowhere").status_code == 404
    assert client.get("/api/nowhere").get_json()["status"] == 404


def test_events_api_pages_backwards(client):
    first = client.get("/api/events?limit=5").get_json()
    assert len(first["events"]) == 5 and first["next_before"] == first["events"][-1]["id"]
    older = client.get(f"/api/events?limit=5&before={first['next_before']}").get_json()
    assert older["events"][0]["id"] < first["events"][-1]["id"]


# --------------------------------------------------------------------------- live refresh, metrics, health


def test_partial_refresh_returns_only_the_live_part(client):
    response = client.get("/", headers={"X-MQI-Partial": "1"})
    html = response.get_data(as_text=True)
    assert response.status_code == 200 and "<html" not in html and "Cases by state" in html
    case = client.get("/cases/case-000029", headers={"X-MQI-Partial": "1"}).get_data(as_text=True)
    assert case.lstrip().startswith("<h1>case-000029") and "<svg" in case
    full = client.get("/").get_data(as_text=True)
    assert 'data-refresh="5.0"' in full and "X-MQI-Partial" in full


def test_metrics_are_prometheus_text(client, state_ws):
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = response.get_data(as_text=True)
    sample = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\]|\\.)*",?)*\})? -?[0-9.e+Inf-]+$')
    for line in text.splitlines():
        assert line.startswith("# HELP ") or line.startswith("# TYPE ") or sample.match(line), line
    for family in ("mqi_cases", "mqi_beams", "mqi_step_duration_seconds", "mqi_gpu_allocated", "mqi_queue_depth",
                   "mqi_worker_restarts_total", "mqi_dead_letters"):
        assert f"# TYPE {family} " in text, family
    done = state_ws.facts["by_state"]["done"]
    assert f'mqi_cases{{state="done"}} {done}' in text
    assert 'mqi_step_duration_seconds_bucket{step="simulate",outcome="ok",le="+Inf"}' in text
    assert 'mqi_worker_restarts_total{worker="execute"} 2' in text
    assert 'mqi_cases{state="downloading"} 0' in text  # every workflow state is exported, even at 0
    assert 'mqi_queue_depth{queue="mqi.execute"} 0' in text  # and every queue the config uses


def test_healthz(client, state_ws):
    assert client.get("/healthz").get_json()["status"] == "ok"
    state_ws.db.rename(state_ws.db.with_suffix(".moved"))
    response = client.get("/healthz")
    assert response.status_code == 503 and response.get_json()["status"] == "unavailable"
    assert client.get("/api/overview").status_code == 503


# --------------------------------------------------------------------------- security


def test_security_headers(client):
    for url in ("/", "/api/overview", "/metrics", "/cases/case-999999"):
        headers = client.get(url).headers
        csp = headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
        assert "unsafe-inline" not in csp and "http" not in csp and "*" not in csp
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["X-Frame-Options"] == "DENY"
        assert headers["Referrer-Policy"] == "same-origin"
        assert headers["Cache-Control"] == "no-store"


def test_inline_script_and_style_carry_the_csp_nonce(client):
    response = client.get("/")
    nonce = re.search(r"'nonce-([^']+)'", response.headers["Content-Security-Policy"]).group(1)
    html = response.get_data(as_text=True)
    assert f'<script nonce="{nonce}">' in html and f'<style nonce="{nonce}">' in html
    assert "<script src" not in html and "<link" not in html and " style=" not in html and " onclick" not in html


def test_patient_names_are_hidden_by_default(client, state_ws):
    uid = state_ws.facts["rejected"][0] if state_ws.facts["rejected"] else state_ws.facts["failed"][0]
    dead_letter(state_ws.loaded)
    dead_letter(state_ws.loaded, case="case-000009", reason_extra="PATIENT-000004")  # names another case
    for url in PAGES + API + ["/metrics", f"/cases/{uid}", f"/api/cases/{uid}", "/cases?q=PATIENT"]:
        body = client.get(url).get_data(as_text=True)
        assert "PATIENT-" not in body, url
    assert client.get("/api/cases?q=PATIENT-000001").get_json()["total"] == 0  # no probing by name
    assert client.get("/cases/PATIENT-000001").status_code == 404
    assert "[case folder]" in client.get("/api/dlq").get_data(as_text=True)


def test_patient_names_when_allowed(make_app, state_ws):
    client = make_app(show_patient_names=True).test_client()
    listing = client.get("/api/cases?q=PATIENT-000001").get_json()
    assert [c["name"] for c in listing["cases"]] == ["PATIENT-000001"]
    assert client.get("/api/cases/PATIENT-000002").get_json()["id"] == "case-000002"
    assert "PATIENT-000001" in client.get("/cases?per_page=500").get_data(as_text=True)


def test_local_dashboard_refuses_foreign_host_names(client):
    """Without credentials it answers only to localhost (a DNS-rebinding page cannot read it)."""
    assert client.get("/", headers={"Host": "attacker.example"}).status_code == 403
    assert client.get("/", headers={"Host": "127.0.0.1:8080"}).status_code == 200
    assert client.get("/", headers={"Host": "[::1]:8080"}).status_code == 200


def test_post_without_or_with_wrong_csrf_token_is_refused(client, state_ws):
    uid = state_ws.facts["failed"][0]
    assert client.post(f"/cases/{uid}/retry").status_code == 403
    assert client.post(f"/api/cases/{uid}/retry", headers={"X-CSRF-Token": "forged"}).status_code == 403
    assert client.post("/dlq/purge", data={"all": "1", "csrf_token": "forged"}).status_code == 403
    assert case_state(state_ws.db, uid) == "failed"
    assert events(state_ws.db, "case.retry") == []


def test_non_local_bind_requires_authentication(make_app, state_ws):
    app = make_app(host="0.0.0.0", token="s3cret-token")
    client = app.test_client()
    page = client.get("/cases")
    assert page.status_code == 302 and "/login?next=/cases" in page.headers["Location"]
    api = client.get("/api/overview")
    assert api.status_code == 401 and api.headers["WWW-Authenticate"].startswith("Bearer")
    assert client.get("/metrics").status_code == 401
    assert client.get("/api/overview", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/healthz").status_code == 200  # liveness probes need no credentials
    bearer = {"Authorization": "Bearer s3cret-token"}
    assert client.get("/api/overview", headers=bearer).status_code == 200
    assert client.get("/metrics", headers=bearer).status_code == 200
    assert client.get("/", headers={**bearer, "Host": "mqi.clinic.example"}).status_code == 200
    uid = state_ws.facts["failed"][0]
    assert client.post(f"/api/cases/{uid}/retry").status_code == 401
    # a bearer token is never sent by a browser on its own: no CSRF token needed
    response = client.post(f"/api/cases/{uid}/retry", headers=bearer)
    assert response.status_code == 200, response.get_json()
    assert events(state_ws.db, "case.retry")[-1]["actor"] == "dashboard:token"


def test_login_with_token_and_name(make_app, state_ws, csrf_of):
    client = make_app(host="0.0.0.0", token="s3cret-token").test_client()
    form = client.get("/login?next=/workers")
    assert form.status_code == 200 and b"access token" in form.data
    csrf = re.search(rb'name="csrf_token" value="([^"]+)"', form.data).group(1).decode()
    bad = client.post("/login", data={"user": "eve", "password": "guess", "csrf_token": csrf, "next": "/workers"})
    assert bad.status_code == 401
    assert client.post("/login", data={"user": "eve", "password": "s3cret-token", "next": "/workers"}).status_code == 400
    ok = client.post("/login", data={"user": "Dr Who", "password": "s3cret-token", "csrf_token": csrf,
                                     "next": "https://evil.example/"})
    assert ok.status_code == 302 and ok.headers["Location"] == "/"  # never redirected off-site
    assert client.get("/workers").status_code == 200
    uid = state_ws.facts["failed"][0]
    assert client.post(f"/api/cases/{uid}/retry").status_code == 403  # a session needs the CSRF token
    response = client.post(f"/api/cases/{uid}/retry", headers={"X-CSRF-Token": csrf_of(client)})
    assert response.status_code == 200
    assert events(state_ws.db, "case.retry")[-1]["actor"] == "dashboard:Dr Who"
    logout = client.post("/logout", data={"csrf_token": csrf_of(client)})
    assert logout.status_code == 302 and client.get("/workers").status_code == 302


def test_logout_ends_the_session_on_the_server(make_app, csrf_of):
    client = make_app(host="0.0.0.0", token="s3cret-token").test_client()
    csrf = re.search(rb'name="csrf_token" value="([^"]+)"', client.get("/login").data).group(1).decode()
    assert client.post("/login", data={"user": "alice", "password": "s3cret-token", "csrf_token": csrf}).status_code == 302
    saved = client.get_cookie("mqi_dashboard").value  # a copy kept by a browser, a proxy log, a thief
    assert client.get("/workers").status_code == 200
    client.post("/logout", data={"csrf_token": csrf_of(client)})
    client.set_cookie("mqi_dashboard", saved)
    assert client.get("/workers").status_code == 302  # the old cookie is signed but dead
    assert client.get("/api/cases").status_code == 401


def test_login_with_password_of_a_user(make_app, state_ws, csrf_of):
    from mqi_dashboard.auth import hash_password

    client = make_app(host="0.0.0.0", users={"alice": hash_password("correct horse")}).test_client()
    csrf = re.search(rb'name="csrf_token" value="([^"]+)"', client.get("/login").data).group(1).decode()
    assert client.post("/login", data={"user": "alice", "password": "wrong", "csrf_token": csrf}).status_code == 401
    assert client.post("/login", data={"user": "bob", "password": "correct horse", "csrf_token": csrf}).status_code == 401
    assert client.post("/login", data={"user": "alice", "password": "correct horse", "csrf_token": csrf}).status_code == 302
    uid = state_ws.facts["running"][0]
    response = client.post(f"/cases/{uid}/cancel", data={"csrf_token": csrf_of(client)})
    assert response.status_code == 303 and response.headers["Location"] == f"/cases/{uid}"
    assert events(state_ws.db, "case.cancel")[-1]["actor"] == "dashboard:alice"
    assert "cancel requested" in client.get(f"/cases/{uid}").get_data(as_text=True)  # the flash message


def test_failed_logins_are_throttled(make_app):
    client = make_app(host="0.0.0.0", token="s3cret-token").test_client()
    csrf = re.search(rb'name="csrf_token" value="([^"]+)"', client.get("/login").data).group(1).decode()
    from mqi_dashboard import auth

    codes = [client.post("/login", data={"password": "nope", "csrf_token": csrf}).status_code
             for _ in range(auth.MAX_FAILURES + 1)]
    assert codes[:auth.MAX_FAILURES] == [401] * auth.MAX_FAILURES and codes[-1] == 429
    assert client.post("/login", data={"password": "s3cret-token", "csrf_token": csrf}).status_code == 429


# --------------------------------------------------------------------------- actions


def test_retry_failed_case_from_the_page(client, state_ws, csrf_of):
    uid = state_ws.facts["failed"][0]
    response = client.post(f"/cases/{uid}/retry", data={"csrf_token": csrf_of(client), "next": "/"})
    assert response.status_code == 303 and response.headers["Location"] == "/"
    assert case_state(state_ws.db, uid) not in ("failed",)
    event = events(state_ws.db, "case.retry")[-1]
    assert event["actor"] == "dashboard:local" and event["case_id"] == int(uid.split("-")[1])
    assert "retry requested" in client.get("/").get_data(as_text=True)


def test_retry_one_beam(client, state_ws, csrf_of):
    uid = state_ws.facts["failed"][0]
    detail = client.get(f"/api/cases/{uid}").get_json()
    beam = next(b["number"] for b in detail["beams"] if b["state"] == "failed")
    response = client.post(f"/api/cases/{uid}/retry", json={"beam": beam}, headers={"X-CSRF-Token": csrf_of(client)})
    assert response.status_code == 200 and response.get_json()["ok"]
    assert events(state_ws.db, "case.retry")[-1]["message"] == f"retry requested for beam {beam}"


def test_retry_of_a_done_case_is_refused_with_the_reason(client, state_ws, csrf_of):
    uid = state_ws.facts["done"][0]
    response = client.post(f"/api/cases/{uid}/retry", headers={"X-CSRF-Token": csrf_of(client)})
    assert response.status_code == 409 and "only failed" in response.get_json()["error"]
    page = client.post(f"/cases/{uid}/retry", data={"csrf_token": csrf_of(client)}, follow_redirects=True)
    assert page.status_code == 200 and b"only failed" in page.data


def test_cancel_running_case(client, state_ws, csrf_of):
    uid = state_ws.facts["running"][0]
    response = client.post(f"/api/cases/{uid}/cancel", headers={"X-CSRF-Token": csrf_of(client)})
    assert response.status_code == 200 and response.get_json()["state"] in ("cancelling", "cancelled")
    assert events(state_ws.db, "case.cancel")[-1]["actor"] == "dashboard:local"
    again = client.post(f"/api/cases/{uid}/cancel", headers={"X-CSRF-Token": csrf_of(client)})
    assert again.status_code in (200, 409)


def test_dlq_list_replay_and_purge(client, state_ws, csrf_of):
    first = dead_letter(state_ws.loaded)
    second = dead_letter(state_ws.loaded, case="case-000004", step="upload")
    listing = client.get("/api/dlq").get_json()["dead_letters"]
    assert [d["id"] for d in listing] == [first, second]
    assert listing[0]["case"] == "case-000003" and listing[0]["step"] == "prepare" and "body" not in listing[0]
    html = client.get("/dlq").get_data(as_text=True)
    assert "FileNotFoundError" in html and 'data-confirm="Replay dead letter' in html
    assert client.get("/api/overview").get_json()["dead_letters"] == 2
    token = csrf_of(client)
    replay = client.post("/dlq/replay", data={"id": first, "csrf_token": token})
    assert replay.status_code == 303
    assert [d["id"] for d in client.get("/api/dlq").get_json()["dead_letters"]] == [second]
    replayed = events(state_ws.db, "dlq.replay")
    assert len(replayed) == 1 and replayed[0]["actor"] == "dashboard:local" and replayed[0]["case_id"] == 3
    assert "PATIENT" not in replayed[0]["message"]
    missing = client.post("/api/dlq/purge", json={"ids": ["999999"]}, headers={"X-CSRF-Token": token})
    assert missing.status_code == 404
    purge = client.post("/api/dlq/purge", json={"all": True}, headers={"X-CSRF-Token": token})
    assert purge.status_code == 200 and purge.get_json()["count"] == 1
    assert client.get("/api/dlq").get_json()["dead_letters"] == []
    assert events(state_ws.db, "dlq.purge")[-1]["step"] == "upload"
    audit = client.get("/audit?people=1").get_data(as_text=True)
    assert "dlq.replay" in audit and "dlq.purge" in audit and "dashboard:local" in audit


# --------------------------------------------------------------------------- pages from other plugins


def test_plugins_add_pages_through_mqi_register_dashboard_pages(make_app, mqi_pm, register_plugin):
    def mqi_register_dashboard_pages(register):
        register("/site/report", "Site report", lambda: "<p>weekly QA report</p>")
        register("/cases", "Clash", lambda: "no")  # an existing path is refused, not replaced
        register("no-slash", "Bad", lambda: "no")

    pages = types.ModuleType("site_pages")
    pages.mqi_register_dashboard_pages = hookimpl(mqi_register_dashboard_pages)
    register_plugin(pages, name="site-pages")
    client = make_app(plugin_host=mqi_pm).test_client()
    page = client.get("/site/report")
    assert page.status_code == 200 and b"weekly QA report" in page.data and b"<h1>Site report</h1>" in page.data
    assert b'href="/site/report"' in client.get("/").data
    assert b"Clash" not in client.get("/").data
    assert client.get("/cases").status_code == 200 and b"no case matches" not in client.get("/cases").data


def test_case_list_has_per_case_progress_and_a_legend_of_the_chips(client):
    """Issue 19: beam chips had no legend and the list no per-case progress."""
    everything = client.get("/api/cases?per_page=10").get_json()["cases"]
    html = client.get("/cases?per_page=10").get_data(as_text=True)
    with_beams = [case for case in everything if case["beams"]]
    assert with_beams
    for case in with_beams:
        done = sum(1 for b in case["beams"] if b["state"] == "done")
        assert f"{done}/{len(case['beams'])} done" in html
    assert 'class="legend' in html and "waiting for a GPU, a retry or a delivery" in html


def test_the_case_page_shows_notes_and_the_delivery_analysis(client, state_ws):
    """Issue 16.2: the delivery analysis per beam and layer, and the interpreter's notes."""
    import json as _json

    from mqi_framework.store import open_state, transaction

    layer = {"layer": 5, "energy": 120.5, "planned_spots": 400, "delivered_spots": 400, "missing_spots": 0,
             "extra_spots": 0, "position_mean_mm": [2.0, 0.0], "position_max_mm": 2.004, "position_rms_mm": 2.0,
             "mu_diff_pct": 0.01, "level": "action"}
    analysis = {"2": {"beam": 2, "level": "action", "mu_planned": 100.0, "mu_delivered": 100.01, "mu_diff_pct": 0.01,
                      "position_max_mm": 2.004, "layers_planned": 24, "layers_delivered": 24, "restarts": 0,
                      "flags": ["layer 5: spot position off by up to 2.00 mm"], "layers": [layer],
                      "levels": {"position_tolerance_mm": 1.0, "position_action_mm": 2.0, "mu_tolerance_pct": 1.0,
                                 "mu_action_pct": 2.0, "match_radius_mm": 3.0}}}
    info = {"plan_label": "QA1", "notes": ["beam 2: delivery layer 5: spot position off by up to 2.00 mm"],
            "delivery_analysis": analysis}
    conn = open_state(state_ws.db)
    with transaction(conn):
        conn.execute("INSERT INTO cases(id, uid, name, inbox, path, state, detected_at, updated_at, info) "
                     "VALUES (999, 'case-000999', 'DELIVERY', '/in', '/in/DELIVERY', 'running', 0, 0, ?)",
                     (_json.dumps(info),))
    conn.close()
    response = client.get("/cases/case-000999")
    html = response.get_data(as_text=True)
    assert response.status_code == 200, html[html.find("<main"):][:1500]
    assert "<h2>Notes</h2>" in html and "beam 2: delivery layer 5: spot position off by up to 2.00 mm" in html
    assert "Delivery against the plan" in html and 'id="delivery-beam-2"' in html
    assert "2.004" in html and "+0.01" in html and 'class="pill st-failed">action' in html

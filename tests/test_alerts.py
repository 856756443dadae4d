"""The alert sinks (connectors/alerts.py) against real local HTTP receivers.

Each sink makes one attempt per `send`; these tests pin what goes over the wire
(signatures, Slack blocks, PagerDuty events), how answers are classified (2xx,
rejected, retryable with Retry-After, timeouts) and the safety rules (URL checks, no
secret and no response body in any error).
"""

from __future__ import annotations

import base64
import json
import time

import pytest

from connectors.alerts import (
    AlertBatch,
    AlertItem,
    AlertmanagerSink,
    DeliveryTimeout,
    PagerDutySink,
    RejectedDelivery,
    RetryableDelivery,
    Secret,
    SignatureError,
    SlackSink,
    WebhookSink,
    decode_signing_keys,
    parse_retry_after,
    redact_url,
    sign,
    validate_url,
    verify,
)
from monitor.reports import incident_path
from tests.receivers import Answer, HangingReceiver, Receiver, standard_webhooks_verify

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
KEYS = decode_signing_keys(SECRET)


def _item(transition: str = "firing", subject: str = "f.age", severity: str = "warning",
          seq: int = 1) -> AlertItem:
    return AlertItem(seq=seq, transition=transition, incident_id=f"feature_drift/ctr/{subject}@60000",
                     fingerprint=f"feature_drift/ctr/{subject}", kind="feature_drift", model="ctr",
                     subject=subject, severity=severity, summary=f"{subject} drifted: PSI 0.310",
                     opened_ms=60_000, updated_ms=120_000,
                     resolved_ms=180_000 if transition == "resolved" else None, version="7",
                     facts={"psi": 0.31, "p_adjusted": 1e-9},
                     path=incident_path(f"feature_drift/ctr/{subject}@60000"))


def _batch(*items: AlertItem, batch_id: str = "dl_test1") -> AlertBatch:
    return AlertBatch(id=batch_id, source="g", model="ctr", created_ms=1_767_225_600_000,
                      items=items or (_item(),), base_url="http://driftloop.test:8080")


# -- Standard Webhooks signatures --------------------------------------------------------


def test_webhook_is_signed_so_an_independent_verifier_accepts_it() -> None:
    with Receiver() as r:
        WebhookSink("hook", r.url + "/hook", KEYS).send(_batch())
    req = r.requests[0]
    assert standard_webhooks_verify(SECRET, req.headers, req.body) == "dl_test1"
    assert verify(KEYS, req.headers, req.body) == "dl_test1"
    doc = json.loads(req.body)
    alert = doc["data"]["alerts"][0]
    assert doc["type"] == "driftloop.incidents" and doc["data"]["model"] == "ctr"
    assert alert["status"] == "firing" and alert["model_version"] == "7"
    assert alert["report_url"] == "http://driftloop.test:8080/incidents/feature_drift/ctr/f.age@60000"


def test_tampered_body_and_old_timestamp_fail_verification() -> None:
    body = b'{"a":1}'
    now = int(time.time())
    headers = {"webhook-id": "m1", "webhook-timestamp": str(now),
               "webhook-signature": sign(KEYS, "m1", now, body)}
    assert verify(KEYS, headers, body) == "m1"
    with pytest.raises(SignatureError, match="no signature matches"):
        verify(KEYS, headers, b'{"a":2}')
    with pytest.raises(AssertionError, match="signature mismatch"):
        standard_webhooks_verify(SECRET, headers, b'{"a":2}')
    old = now - 301
    stale = {**headers, "webhook-timestamp": str(old), "webhook-signature": sign(KEYS, "m1", old, body)}
    with pytest.raises(SignatureError, match="off"):
        verify(KEYS, stale, body)
    with pytest.raises(AssertionError, match="too old"):
        standard_webhooks_verify(SECRET, stale, body)
    # The id is signed too: replaying a body under another id fails.
    with pytest.raises(SignatureError):
        verify(KEYS, {**headers, "webhook-id": "m2"}, body)


def test_rotated_secrets_sign_with_every_key() -> None:
    new = "whsec_" + base64.b64encode(b"N" * 32).decode()
    keys = decode_signing_keys(f"{SECRET}\n{new}")
    with Receiver() as r:
        WebhookSink("hook", r.url, keys).send(_batch())
    req = r.requests[0]
    assert len(req.headers["webhook-signature"].split()) == 2
    standard_webhooks_verify(SECRET, req.headers, req.body)
    standard_webhooks_verify(new, req.headers, req.body)


@pytest.mark.parametrize(("secret", "error"), [
    ("", "empty"), ("whsec_not*base64", "not base64"),
    ("whsec_" + base64.b64encode(b"short").decode(), "at least 16"),
])
def test_bad_signing_secrets_are_refused_without_echoing_them(secret: str, error: str) -> None:
    with pytest.raises(ValueError, match=error) as info:
        decode_signing_keys(secret)
    assert not secret or secret not in str(info.value)


# -- answers -----------------------------------------------------------------------------


def test_answers_are_classified_and_retry_after_is_honoured() -> None:
    answers = iter([Answer(500), Answer(429, {"Retry-After": "7"}), Answer(503, {"Retry-After": "x"}),
                    Answer(400), Answer(404), Answer(302, {"Location": "https://elsewhere/"}),
                    Answer(202)])
    with Receiver(lambda _r: next(answers)) as r:
        sink = WebhookSink("hook", r.url, KEYS)
        outcomes = []
        for _ in range(7):
            try:
                sink.send(_batch())
                outcomes.append("ok")
            except RetryableDelivery as exc:
                outcomes.append((exc.reason, exc.retry_after))
            except RejectedDelivery as exc:
                outcomes.append(("rejected", exc.reason))
    assert outcomes == [("http_5xx", None), ("http_429", 7.0), ("http_5xx", None),
                        ("rejected", "http_400"), ("http_4xx", None), ("redirect", None), "ok"]
    assert len(r.requests) == 7  # the redirect was not followed


def test_retry_after_as_an_http_date() -> None:
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412490.0) == 0.0


def test_a_hanging_receiver_is_a_timeout_not_a_hang() -> None:
    with HangingReceiver() as h:
        sink = WebhookSink("hook", h.url, KEYS, timeout_s=0.5)
        t0 = time.monotonic()
        with pytest.raises(DeliveryTimeout):
            sink.send(_batch())
        assert time.monotonic() - t0 < 3


def test_no_secret_and_no_response_body_in_errors() -> None:
    token = "T0001/B0002/SeCrEtToKeN"
    marker = "RECEIVER-SAYS-" + "x" * 50
    with Receiver(lambda _r: Answer(500, body=marker.encode())) as r:
        sink = SlackSink("slack", f"{r.url}/services/{token}")
        with pytest.raises(RetryableDelivery) as info:
            sink.send(_batch())
        assert r.requests[0].path == f"/services/{token}"
    text = f"{info.value} {info.value!r} {sink!r}"
    assert token not in text and "SeCrEt" not in text and marker not in text
    assert redact_url(f"{r.url}/services/{token}") in text
    # The same for a refused connection (nothing listens on that port any more).
    with pytest.raises(RetryableDelivery) as info2:
        SlackSink("slack", f"{r.url}/services/{token}", timeout_s=1).send(_batch())
    assert token not in str(info2.value)
    assert "***" in repr(Secret(token)) and token not in repr(Secret(token))


# -- URL rules ---------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "ok"), [
    ("https://hooks.example.com/x", True),
    ("http://127.0.0.1:9/x", True),
    ("http://localhost/x", True),
    ("http://[::1]:80/x", True),
    ("http://10.1.2.3/x", False),
    ("http://alerts.internal/x", False),
    ("ftp://example.com/x", False),
    ("https://user:pw@example.com/x", False),
    ("https:///nohost", False),
])
def test_urls_must_be_https_or_loopback(url: str, ok: bool) -> None:
    if ok:
        assert validate_url(url) == url
    else:
        with pytest.raises(ValueError) as info:
            validate_url(url)
        assert "pw" not in str(info.value)


def test_plain_http_elsewhere_needs_allow_http() -> None:
    assert validate_url("http://10.1.2.3/x", allow_http=True)


def test_tls_is_verified_by_default() -> None:
    # A plain-http server behind an https URL: the TLS handshake fails, which proves the
    # client tried TLS; with a self-signed receiver the verification error is the same
    # RetryableDelivery('network').
    with Receiver() as r:
        port = r.url.rsplit(":", 1)[1]
        sink = WebhookSink("hook", f"https://127.0.0.1:{port}/x", KEYS, timeout_s=2)
        with pytest.raises(RetryableDelivery) as info:
            sink.send(_batch())
    assert info.value.reason == "network" and not r.requests


# -- Slack and PagerDuty payloads --------------------------------------------------------


def test_slack_message_says_what_how_much_since_when_which_version_and_links() -> None:
    with Receiver(lambda _r: Answer(200, body=b"ok")) as r:
        SlackSink("slack", r.url + "/services/T/B/x").send(
            _batch(_item(), _item("resolved", "f.price <b>", seq=2)))
    msg = json.loads(r.requests[0].body)
    assert msg["text"] == "driftloop: 1 firing, 1 resolved for model ctr"
    text = json.dumps(msg["blocks"])
    for needle in ("FIRING", "RESOLVED", "f.age drifted: PSI 0.310", "since 1970-01-01T00:01:00",
                   "ctr v7", "|drift report>", "psi 0.31"):
        assert needle in text, needle
    assert "f.price &lt;b&gt;" in text and "<b>" not in text  # mrkdwn escaped


def test_pagerduty_trigger_and_resolve_share_a_stable_dedup_key() -> None:
    with Receiver(lambda _r: Answer(202, body=b'{"status":"success"}')) as r:
        sink = PagerDutySink("pd", r.url + "/v2/enqueue", Secret("R" * 32))
        sink.send(_batch(_item(severity="critical")))
        sink.send(_batch(_item("resolved", severity="critical"), batch_id="dl_test2"))
    trigger, resolve = (json.loads(q.body) for q in r.requests)
    assert trigger["event_action"] == "trigger" and resolve["event_action"] == "resolve"
    assert trigger["dedup_key"] == resolve["dedup_key"] == "driftloop/g/feature_drift/ctr/f.age@60000"
    assert trigger["routing_key"] == "R" * 32
    p = trigger["payload"]
    assert p["severity"] == "critical" and p["source"] == "driftloop/g" and p["component"] == "ctr"
    assert p["custom_details"]["model_version"] == "7" and p["custom_details"]["psi"] == 0.31
    assert trigger["links"][0]["href"].endswith("/incidents/feature_drift/ctr/f.age@60000")
    assert "payload" not in resolve


def test_alertmanager_payload_ends_resolved_and_superseded_alerts() -> None:
    sink = AlertmanagerSink("am", "http://127.0.0.1:9093", resend_seconds=60, clock=lambda: 1000.0)
    firing = sink.render(_batch(_item()))
    assert [a["labels"]["severity"] for a in firing] == ["warning"]
    assert firing[0]["labels"]["alertname"] == "DriftloopFeatureDrift"
    assert firing[0]["endsAt"] == "1970-01-01T00:20:40.000+00:00"  # now + 4 x resend
    escalated = sink.render(_batch(_item("escalated", severity="critical")))
    ends = {a["labels"]["severity"]: a["endsAt"] for a in escalated}
    assert ends["warning"] == ends["info"] == "1970-01-01T00:16:40.000+00:00"  # ended now
    assert ends["critical"] == "1970-01-01T00:20:40.000+00:00"

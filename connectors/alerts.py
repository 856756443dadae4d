"""Alert sinks: where incidents leave driftloop, one narrow edge per kind of receiver.

Each sink turns an `AlertBatch` (the incidents of one model that changed together)
into the receiver's own format and POSTs it with httpx:

* `WebhookSink`: generic JSON, signed the Standard Webhooks way (``webhook-id``,
  ``webhook-timestamp``, ``webhook-signature: v1,<base64 HMAC-SHA256 of
  "id.timestamp.body">``); the id is the batch's idempotency key, so a receiver that
  remembers ids sees every alert once even when driftloop sends it twice;
* `SlackSink`: an incoming webhook, one message of readable blocks;
* `PagerDutySink`: Events API v2, one ``trigger``/``resolve`` event per incident with
  a stable ``dedup_key``;
* `AlertmanagerSink`: ``POST /api/v2/alerts``; firing alerts are re-sent while they
  fire (`AlertmanagerSink.refresh`), resolved ones carry ``endsAt``.

The outbox, retries, rate limits and grouping are not here (monitor/alerting.py):
a sink makes one attempt and says how it went, by returning or by raising one of:

    DeliveryError                  the alert did not arrive; the outbox keeps it
    ├── RetryableDelivery          try again later: network, 408/425/429/5xx and
    │   │                          401/403/404 (a receiver being fixed);
    │   │                          ``retry_after`` is the receiver's Retry-After
    │   └── DeliveryTimeout        no answer within the sink's timeout
    └── RejectedDelivery           400/413/422: the same bytes cannot succeed
    SignatureError                 a Standard Webhooks signature does not verify

Safety rules every sink follows: URLs are validated (https, or http only on
loopback unless ``allow_http``), TLS certificates are verified unless switched off,
redirects are not followed (a signed body must not travel to another host), a
receiver's response body is never read, and no URL path, secret or routing key
appears in an error message (`redact_url`; a Slack webhook URL *is* a secret).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import email.utils
import hashlib
import hmac
import ipaddress
import json
import logging
import ssl
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import httpx
import msgspec

__all__ = [
    "AlertBatch",
    "AlertItem",
    "AlertmanagerSink",
    "DeliveryError",
    "DeliveryTimeout",
    "PagerDutySink",
    "RejectedDelivery",
    "RetryableDelivery",
    "Secret",
    "SignatureError",
    "SlackSink",
    "WebhookSink",
    "decode_signing_keys",
    "parse_retry_after",
    "redact_url",
    "sign",
    "validate_url",
    "verify",
]

#: The Standard Webhooks default tolerance for a signature's timestamp.
SIGNATURE_TOLERANCE_S = 300
#: A receiver cannot park a sink for longer than this with Retry-After (the
#: outbox's give-up age still applies).
MAX_RETRY_AFTER_S = 3600.0
#: The status codes after which the same request cannot succeed.
_REJECTED = frozenset({400, 413, 422})
#: PagerDuty's limit on dedup_key; Slack's on a message's blocks.
_PD_DEDUP_MAX = 255
_SLACK_MAX_ITEMS = 20
USER_AGENT = "driftloop-alerts/0.1"

# httpx logs every request's full URL at INFO, and httpcore its connections at DEBUG:
# for a Slack webhook the URL is the credential. Their warnings still get through.
for _name in ("httpx", "httpcore"):
    logging.getLogger(_name).setLevel(logging.WARNING)


class DeliveryError(RuntimeError):
    """An alert did not reach its receiver. Messages never carry URLs or secrets."""


class RetryableDelivery(DeliveryError):
    """Worth another attempt later; ``retry_after`` (seconds) is the receiver's wish."""

    def __init__(self, message: str, *, reason: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after = retry_after


class DeliveryTimeout(RetryableDelivery):
    """The receiver did not answer within the sink's timeout."""


class RejectedDelivery(DeliveryError):
    """The receiver refused the payload itself: retrying the same bytes cannot help."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class SignatureError(ValueError):
    """A Standard Webhooks signature is missing, stale or does not match."""


class Secret:
    """A string that does not print: ``repr`` and ``str`` show ``***``.

    Example:
        >>> s = Secret("hunter2")
        >>> f"{s}", repr(s), s.reveal()
        ('***', "Secret('***')", 'hunter2')
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"


# -- what is sent ---------------------------------------------------------------------


class AlertItem(msgspec.Struct, frozen=True, kw_only=True):
    """One incident transition, as every sink renders it.

    ``facts`` are the scalar statistics of the incident's latest evidence (PSI,
    adjusted p-value, observed and reference rates...); ``path`` is the incident's
    report page on the daemon (``/incidents/<id>``), made absolute at send time.
    """

    seq: int
    transition: str  # firing | escalated | resolved
    incident_id: str
    fingerprint: str
    kind: str
    model: str
    subject: str
    severity: str  # info | warning | critical
    summary: str
    opened_ms: int
    updated_ms: int
    resolved_ms: int | None = None
    version: str | None = None
    facts: dict[str, Any] = msgspec.field(default_factory=dict)
    path: str = ""

    @property
    def firing(self) -> bool:
        return self.transition != "resolved"


class AlertBatch(msgspec.Struct, frozen=True, kw_only=True):
    """The alerts of one model that changed together: one message per sink.

    ``id`` is the idempotency key (the Standard Webhooks ``webhook-id``): the same
    for every attempt at delivering this batch to this sink.
    """

    id: str
    source: str
    model: str
    created_ms: int
    items: tuple[AlertItem, ...]
    #: Prefix of the report links, set when the batch is sent (the configured
    #: ``alerts.base_url`` can change between enqueue and a retry).
    base_url: str = ""

    def link(self, item: AlertItem) -> str:
        return f"{self.base_url.rstrip('/')}{item.path}" if self.base_url and item.path else ""

    def to_json(self) -> str:
        return msgspec.json.encode(self).decode()

    @classmethod
    def from_json(cls, text: str | bytes) -> AlertBatch:
        return msgspec.json.decode(text, type=cls)


# -- URLs, secrets and signatures -------------------------------------------------------


def _is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def redact_url(url: str) -> str:
    """``scheme://host:port`` plus ``/...`` when there is more: what logs may show.

    >>> redact_url("https://hooks.slack.com/services/T0/B0/secret")
    'https://hooks.slack.com/...'
    """
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<invalid url>"
    more = "/..." if parts.path not in ("", "/") or parts.query else ""
    return f"{parts.scheme}://{host}{port}{more}"


def validate_url(url: str, *, allow_http: bool = False) -> str:
    """Check a receiver URL; returns it unchanged.

    https anywhere; http only to a loopback address unless ``allow_http`` (plain
    http would carry the alert, and for Slack the URL's own token, in clear text).
    Credentials in the URL are refused: they would end up wherever URLs are logged.

    Raises:
        ValueError: naming what is wrong and the URL's redacted form only.
    """
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        msg = "is not a valid URL"
        raise ValueError(msg) from None
    shown = redact_url(url)
    if parts.scheme not in ("https", "http"):
        msg = f"{shown}: scheme {parts.scheme!r} is not https (or http on loopback)"
        raise ValueError(msg)
    if not parts.hostname:
        msg = f"{shown}: has no host"
        raise ValueError(msg)
    if parts.username is not None or parts.password is not None:
        msg = f"{shown}: credentials in the URL are not accepted (they would be logged)"
        raise ValueError(msg)
    if port == 0:
        msg = f"{shown}: port 0"
        raise ValueError(msg)
    if parts.scheme == "http" and not allow_http and not _is_loopback(parts.hostname):
        msg = (f"{shown}: plain http to a host that is not loopback; use https, or set "
               "allow_http: true for this sink if the network path is trusted")
        raise ValueError(msg)
    return url


def decode_signing_keys(text: str) -> list[bytes]:
    """The HMAC keys in a Standard Webhooks secret: ``whsec_<base64>``, or bare base64.

    Several secrets separated by whitespace are all used to sign (each gives one
    ``v1,`` signature), which is how a secret is rotated without a gap: add the new
    one, move the receiver, drop the old one.

    Raises:
        ValueError: empty, not base64, or shorter than 16 bytes once decoded
            (the message never contains the secret).

    >>> decode_signing_keys("whsec_" + base64.b64encode(b"k" * 24).decode()) == [b"k" * 24]
    True
    """
    keys = []
    for token in text.split():
        raw = token.removeprefix("whsec_")
        try:
            key = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            msg = ("signing secret is not base64 (expected whsec_<base64>, e.g. "
                   "whsec_ + base64 of 32 random bytes)")
            raise ValueError(msg) from None
        if len(key) < 16:
            msg = f"signing secret decodes to {len(key)} bytes; use at least 16 (32 recommended)"
            raise ValueError(msg)
        keys.append(key)
    if not keys:
        msg = "signing secret is empty"
        raise ValueError(msg)
    return keys


def sign(keys: Sequence[bytes], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header: ``v1,<base64>`` per key, space-separated."""
    content = f"{msg_id}.{timestamp}.".encode() + body
    return " ".join("v1," + base64.b64encode(hmac.new(k, content, hashlib.sha256).digest()).decode()
                    for k in keys)


def verify(keys: Sequence[bytes], headers: Mapping[str, str], body: bytes, *,
           tolerance_s: float = SIGNATURE_TOLERANCE_S, now: float | None = None) -> str:
    """Verify a Standard Webhooks request as a receiver should; returns the webhook-id.

    ``headers`` must be looked up case-insensitively (an ``email.message.Message`` or
    an httpx/requests headers object; a plain dict needs lower-case keys).

    Raises:
        SignatureError: a header is missing, the timestamp is further than
            ``tolerance_s`` from ``now`` (a replay), or no signature matches.
    """
    msg_id, ts, sigs = (headers.get("webhook-id"), headers.get("webhook-timestamp"),
                        headers.get("webhook-signature"))
    if not msg_id or not ts or not sigs:
        msg = "missing webhook-id, webhook-timestamp or webhook-signature"
        raise SignatureError(msg)
    try:
        stamp = int(ts)
    except ValueError:
        msg = "webhook-timestamp is not an integer"
        raise SignatureError(msg) from None
    current = time.time() if now is None else now
    if abs(current - stamp) > tolerance_s:
        msg = f"webhook-timestamp is {current - stamp:+.0f}s off (tolerance {tolerance_s}s)"
        raise SignatureError(msg)
    expected = {s.split(",", 1)[1] for s in sign(keys, msg_id, stamp, body).split()}
    for candidate in sigs.split():
        version, _, value = candidate.partition(",")
        if version == "v1" and any(hmac.compare_digest(value, e) for e in expected):
            return msg_id
    msg = "no signature matches"
    raise SignatureError(msg)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date).

    Bounded by `MAX_RETRY_AFTER_S`; None when absent or unreadable.

    >>> parse_retry_after("7"), parse_retry_after("soon"), parse_retry_after("99999")
    (7.0, None, 3600.0)
    """
    if not value:
        return None
    v = value.strip()
    if v.isdigit():
        return min(float(v), MAX_RETRY_AFTER_S)
    try:
        when = email.utils.parsedate_to_datetime(v)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    current = time.time() if now is None else now
    return min(max(0.0, when.timestamp() - current), MAX_RETRY_AFTER_S)


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).isoformat(timespec="seconds")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


# -- the sinks ------------------------------------------------------------------------


class _HttpSink:
    """One receiver URL and an httpx client for it; one attempt per `send`."""

    kind: ClassVar[str] = "http"

    def __init__(self, name: str, url: str, *, timeout_s: float = 10.0, tls_verify: bool = True,
                 ca_file: str | None = None, allow_http: bool = False,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.name = name
        self._url = validate_url(url, allow_http=allow_http)
        self.redacted_url = redact_url(url)
        self.timeout_s = timeout_s
        verify: ssl.SSLContext | bool = tls_verify
        if tls_verify and ca_file:
            verify = ssl.create_default_context(cafile=ca_file)
        self._client = httpx.Client(
            timeout=httpx.Timeout(timeout_s), verify=verify, follow_redirects=False,
            headers={"User-Agent": USER_AGENT}, transport=transport)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, url={self.redacted_url!r})"

    def close(self) -> None:
        self._client.close()

    def _post(self, url: str, body: bytes, headers: Mapping[str, str]) -> int:
        """POST and classify the answer; returns the (2xx) status code.

        The response body is never read: a receiver cannot make us buffer, log or
        echo what it says. Only the status and Retry-After are used.
        """
        where = f"{self.kind} sink {self.name!r} ({self.redacted_url})"
        try:
            with self._client.stream("POST", url, content=body,
                                     headers={"Content-Type": "application/json", **headers}) as r:
                status = r.status_code
                retry_after = parse_retry_after(r.headers.get("retry-after"))
        # `from None`: httpx's exceptions can carry the request URL, which for Slack
        # is the secret; the class name says what happened.
        except httpx.TimeoutException as exc:
            msg = f"{where}: no answer within {self.timeout_s:g}s ({type(exc).__name__})"
            raise DeliveryTimeout(msg, reason="timeout") from None
        except httpx.HTTPError as exc:
            msg = f"{where}: {type(exc).__name__}"
            raise RetryableDelivery(msg, reason="network") from None
        if 200 <= status < 300:
            return status
        if status in _REJECTED:
            msg = f"{where}: HTTP {status}, the receiver rejected the payload"
            raise RejectedDelivery(msg, reason=f"http_{status}")
        if 300 <= status < 400:
            msg = f"{where}: HTTP {status} redirect, not followed (fix the URL)"
            raise RetryableDelivery(msg, reason="redirect")
        msg = f"{where}: HTTP {status}"
        reason = "http_429" if status == 429 else ("http_5xx" if status >= 500 else "http_4xx")
        raise RetryableDelivery(msg, reason=reason, retry_after=retry_after)


def _item_dict(batch: AlertBatch, item: AlertItem) -> dict[str, Any]:
    return {
        "transition": item.transition, "incident_id": item.incident_id,
        "fingerprint": item.fingerprint, "kind": item.kind, "model": item.model,
        "model_version": item.version, "subject": item.subject, "severity": item.severity,
        "status": "resolved" if item.transition == "resolved" else "firing",
        "summary": item.summary, "opened_at": _iso(item.opened_ms),
        "updated_at": _iso(item.updated_ms), "resolved_at": _iso(item.resolved_ms),
        "facts": item.facts, "report_url": batch.link(item) or None,
    }


class WebhookSink(_HttpSink):
    """Generic JSON webhook, signed the Standard Webhooks way.

    The body (identical on every attempt, so a receiver may hash it too)::

        {"type": "driftloop.incidents", "timestamp": "<batch created, ISO>",
         "data": {"id": ..., "source": ..., "model": ..., "alerts": [{...}, ...]}}

    Args:
        keys: HMAC keys (`decode_signing_keys`); each adds a ``v1,`` signature.
        clock: seconds since the epoch, for ``webhook-timestamp`` (tests).
    """

    kind = "webhook"

    def __init__(self, name: str, url: str, keys: Sequence[bytes], *, clock: Any = time.time,
                 **kw: Any) -> None:
        super().__init__(name, url, **kw)
        if not keys:
            msg = f"webhook sink {name!r} needs a signing secret"
            raise ValueError(msg)
        self._keys = list(keys)
        self._clock = clock

    def render(self, batch: AlertBatch) -> bytes:
        return json.dumps({
            "type": "driftloop.incidents", "timestamp": _iso(batch.created_ms),
            "data": {"id": batch.id, "source": batch.source, "model": batch.model,
                     "alerts": [_item_dict(batch, i) for i in batch.items]},
        }, separators=(",", ":"), allow_nan=False, default=str).encode()

    def send(self, batch: AlertBatch) -> None:
        body = self.render(batch)
        ts = int(self._clock())
        self._post(self._url, body, {
            "webhook-id": batch.id, "webhook-timestamp": str(ts),
            "webhook-signature": sign(self._keys, batch.id, ts, body)})


def _slack_escape(text: str) -> str:
    # Slack's mrkdwn control characters; everything else is shown as is.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class SlackSink(_HttpSink):
    """Slack incoming webhook: a header and one section per incident (what, how much,
    since when, which model version, a link to the report).

    The URL is the credential: give it with ``url_env``/``url_file``, never inline.
    """

    kind = "slack"

    def render(self, batch: AlertBatch) -> dict[str, Any]:
        firing = [i for i in batch.items if i.firing]
        resolved = [i for i in batch.items if not i.firing]
        parts = []
        if firing:
            parts.append(f"{len(firing)} firing")
        if resolved:
            parts.append(f"{len(resolved)} resolved")
        title = f"driftloop: {', '.join(parts)} for model {batch.model}"
        blocks: list[dict[str, Any]] = [
            {"type": "header", "text": {"type": "plain_text", "text": title[:150]}}]
        for item in batch.items[:_SLACK_MAX_ITEMS]:
            mark = {"resolved": ":white_check_mark: RESOLVED", "escalated": ":rotating_light: ESCALATED"}
            state = mark.get(item.transition, ":rotating_light: FIRING")
            head = (f"*{state}* `{_slack_escape(item.kind)}` on `{_slack_escape(item.subject)}` "
                    f"({item.severity})")
            summary = _slack_escape(item.summary or item.fingerprint)
            facts = ", ".join(f"{_slack_escape(k)} {_slack_escape(_fmt(v))}"
                              for k, v in list(item.facts.items())[:6])
            since = f"since {_iso(item.opened_ms)}"
            if item.resolved_ms is not None:
                since += f", resolved {_iso(item.resolved_ms)}"
            fields = [
                {"type": "mrkdwn", "text": f"*How much*\n{summary}"[:2000]},
                {"type": "mrkdwn", "text": f"*Since*\n{since}"},
                {"type": "mrkdwn", "text": (f"*Model*\n{_slack_escape(item.model)} "
                                            f"v{_slack_escape(item.version or '?')}")},
            ]
            if facts:
                fields.append({"type": "mrkdwn", "text": f"*Evidence*\n{facts}"[:2000]})
            section: dict[str, Any] = {"type": "section", "text": {"type": "mrkdwn", "text": head},
                                       "fields": fields}
            blocks.append(section)
            link = batch.link(item)
            if link:
                ref = f"<{link}|drift report> · `{_slack_escape(item.incident_id)}`"
                blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": ref}]})
        if len(batch.items) > _SLACK_MAX_ITEMS:
            blocks.append({"type": "context", "elements": [{
                "type": "mrkdwn", "text": f"and {len(batch.items) - _SLACK_MAX_ITEMS} more"}]})
        return {"text": title, "blocks": blocks}

    def send(self, batch: AlertBatch) -> None:
        self._post(self._url, json.dumps(self.render(batch), default=str).encode(), {})


#: driftloop severity -> PagerDuty's (critical, error, warning, info).
PAGERDUTY_SEVERITY = {"critical": "critical", "warning": "warning", "info": "info"}
PAGERDUTY_EVENTS_URL = "https://events.pagerduty.com/v2/enqueue"


class PagerDutySink(_HttpSink):
    """PagerDuty Events API v2: one event per incident, ``trigger`` while it fires and
    ``resolve`` when it clears, with ``dedup_key`` stable for the incident's life, so a
    repeated trigger (a retry, a restart) updates the same PagerDuty incident.

    Args:
        routing_key: the integration key (a secret).
    """

    kind = "pagerduty"

    def __init__(self, name: str, url: str, routing_key: Secret, **kw: Any) -> None:
        super().__init__(name, url, **kw)
        if not routing_key.reveal():
            msg = f"pagerduty sink {name!r} needs a routing key"
            raise ValueError(msg)
        self._routing_key = routing_key

    @staticmethod
    def dedup_key(batch: AlertBatch, item: AlertItem) -> str:
        key = f"driftloop/{batch.source}/{item.incident_id}"
        if len(key) > _PD_DEDUP_MAX:
            key = "driftloop/" + hashlib.sha256(key.encode()).hexdigest()
        return key

    def render(self, batch: AlertBatch, item: AlertItem) -> dict[str, Any]:
        event: dict[str, Any] = {
            "routing_key": self._routing_key.reveal(),
            "event_action": "resolve" if item.transition == "resolved" else "trigger",
            "dedup_key": self.dedup_key(batch, item),
        }
        if item.transition == "resolved":
            return event
        version = f" v{item.version}" if item.version else ""
        event["payload"] = {
            "summary": (f"[driftloop] {item.kind} {item.subject} on {item.model}{version}: "
                        f"{item.summary or item.fingerprint}")[:1024],
            "source": f"driftloop/{batch.source}",
            "severity": PAGERDUTY_SEVERITY.get(item.severity, "warning"),
            "timestamp": _iso(item.opened_ms),
            "component": item.model, "group": item.kind, "class": item.subject,
            "custom_details": {"incident_id": item.incident_id, "model_version": item.version,
                               "opened_at": _iso(item.opened_ms), **item.facts},
        }
        link = batch.link(item)
        if link:
            event["links"] = [{"href": link, "text": "driftloop drift report"}]
        return event

    def send(self, batch: AlertBatch) -> None:
        # One event per incident (the API takes one per request). A failure part-way
        # retries the whole batch: the events already accepted are deduplicated by
        # their dedup_key.
        for item in batch.items:
            self._post(self._url, json.dumps(self.render(batch, item), default=str).encode(), {})


class AlertmanagerSink(_HttpSink):
    """Prometheus Alertmanager, API v2 (``POST <url>/api/v2/alerts``).

    Labels identify an alert to Alertmanager: ``alertname`` (``Driftloop`` + the kind
    in CamelCase), ``model``, ``subject``, ``severity`` and ``driftloop_source``.
    Firing alerts carry ``endsAt`` = now + 4 x ``resend_seconds`` and are re-sent every
    ``resend_seconds`` by `refresh` (as Prometheus does), so they stay active while
    driftloop runs and expire if it stops; a resolved incident is sent with ``endsAt``
    = now. An escalation ends the alert under its lower severities.
    """

    kind = "alertmanager"

    def __init__(self, name: str, url: str, *, resend_seconds: float = 60.0,
                 clock: Any = time.time, **kw: Any) -> None:
        super().__init__(name, url, **kw)
        self._endpoint = url.rstrip("/") + "/api/v2/alerts"
        self.resend_seconds = resend_seconds
        self._clock = clock

    @staticmethod
    def alertname(kind: str) -> str:
        return "Driftloop" + "".join(p.capitalize() for p in kind.split("_"))

    def _alerts(self, batch: AlertBatch, item: AlertItem, now_ms: int) -> list[dict[str, Any]]:
        starts = min(item.opened_ms, now_ms)
        levels = ["info", "warning", "critical"]
        rank = levels.index(item.severity) if item.severity in levels else 1
        out = []
        for level in levels[:rank + 1]:
            current = level == item.severity
            if item.firing and current:
                ends = now_ms + int(4 * self.resend_seconds * 1000)
            elif item.transition in ("resolved", "escalated"):
                ends = max(now_ms, starts + 1)  # end now: resolved, or superseded by escalation
            else:
                continue
            annotations = {"summary": item.summary or item.fingerprint,
                           "incident_id": item.incident_id, "model_version": item.version or "",
                           "opened_at": _iso(item.opened_ms) or ""}
            annotations.update({f"fact_{k}": _fmt(v) for k, v in list(item.facts.items())[:8]})
            alert = {
                "labels": {"alertname": self.alertname(item.kind), "model": item.model,
                           "subject": item.subject, "severity": level,
                           "driftloop_source": batch.source},
                "annotations": annotations,
                "startsAt": _iso_ms(starts), "endsAt": _iso_ms(ends),
            }
            link = batch.link(item)
            if link:
                alert["generatorURL"] = link
            out.append(alert)
        return out

    def render(self, batch: AlertBatch) -> list[dict[str, Any]]:
        now_ms = int(self._clock() * 1000)
        return [a for item in batch.items for a in self._alerts(batch, item, now_ms)]

    def send(self, batch: AlertBatch) -> None:
        self._post(self._endpoint, json.dumps(self.render(batch), default=str).encode(), {})

    def refresh(self, batch: AlertBatch) -> None:
        """Re-send the incidents that still fire (``batch`` holds them, as firing items)."""
        if batch.items:
            self.send(batch)


def _iso_ms(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).isoformat(timespec="milliseconds")

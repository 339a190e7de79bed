"""Notifications out: what one history event becomes on the wire, and how it is signed and sent.

Pure functions and one HTTP call, no threads or files (those are :mod:`.notifier`'s), so the
payload, the signature, the event filter and the backoff are tested in process.

* Targets: ``-C notify=URL[,URL]``; a URL written ``slack+https://...`` is sent in Slack's
  incoming-webhook shape ``{"text": ...}`` (``&``, ``<``, ``>`` escaped as Slack asks), any other in
  the JSON shape below; ``-C notify_format=slack``
  makes Slack the default of every URL.
* JSON payload: ``{"deployment", "event", "time" (ISO 8601 UTC), "timestamp" (unix seconds),
  "text" (one line for humans), "details" (every other field of the history event)}``.
* Signed exactly as MLflow signs its webhooks (:func:`.webhooks.verify.sign_delivery`, the one
  implementation): ``X-MLflow-Delivery-Id``, ``X-MLflow-Timestamp``, ``X-MLflow-Signature:
  v1,<base64 HMAC-SHA256(secret, "{delivery_id}.{timestamp}.{body}")>``. A retry keeps the delivery
  id (receivers dedupe on it) but is signed again with a fresh timestamp: a receiver that refuses
  stale timestamps (ours allows 5 minutes) must still accept a delivery retried after an outage.
* Event filter: ``-C notify_events``: comma-separated shell patterns (``drift_*``); one starting
  with ``!`` excludes. Default ``all``: every history event is a lifecycle event (no per-request ones).
"""

from __future__ import annotations

import email.utils
import fnmatch
import hashlib
import json
import random
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from mlflow_deploy_plugin.lifecycle.webhooks.verify import (
    DELIVERY_ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    sign_delivery,
)

FORMATS = ("json", "slack")
SLACK_PREFIX = "slack+"
# Answers that say "try again later"; any other 4xx is the receiver refusing this payload for good.
RETRYABLE_STATUS = frozenset({408, 425, 429})
USER_AGENT = "mlflow-deploy-notifier/1"
POST_TIMEOUT_S = 10.0  # one attempt's longest wait for an answer (less near a deadline)
# Every history event, by kind: the README lists them, `notify_events` can pick. A test checks that each
# event name the package writes is in one (a kind that missed one silently never sent it).
EVENT_KINDS: dict[str, tuple[str, ...]] = {
    "deploy": ("created", "updated", "deleted", "create_failed", "update_failed"),
    "lifecycle": ("challenger", "promoted", "rejected", "rolled_back", "rolled_forward", "rollback_failed", "canary_ended",
                  "shadow_ended", "rollback_impossible", "gates_failed", "follow_failed", "op_abandoned", "step_failed",
                  "policy_invalid"),
    "verdicts": ("drift_verdict", "drift_alert", "quality_verdict", "quality_alert", "shadow_verdict",
                 "drift_report_failed", "drift_window_skipped", "quality_estimate_verdict"),
    "faults": ("failed", "crashed", "worker_hung", "worker_given_up", "restart_failed", "bad_request",
               "shadow_crashed", "capture_dropping", "capture_lost", "registry_unavailable", "lifecycle_error",
               "untag_failed"),
    "healed": ("worker_recovered", "shadow_recovered", "restarted", "taken_over", "supervisor_replaced",
               "step_recovered", "lifecycle_resumed", "policy_valid", "capture_recovered"),
}


@dataclass(frozen=True)
class Target:
    """One receiver: where to POST and in which shape."""

    url: str
    format: str = "json"

    @property
    def key(self) -> str:
        """A stable short id of this receiver (names its cursor file; never shows the URL)."""
        return hashlib.sha256(f"{self.format} {self.url}".encode()).hexdigest()[:16]

    @property
    def shown(self) -> str:
        """The URL safe to print and log: Slack-style URLs carry their secret in the path."""
        return redact_url(self.url)


def redact_url(url: str) -> str:
    """``scheme://host[:port]/…#abcd1234``: enough to tell receivers apart, never the path or credentials."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    tail = "/…" if parts.path.strip("/") or parts.query else ""
    return f"{parts.scheme}://{host}{tail}#{hashlib.sha256(url.encode()).hexdigest()[:8]}"


def parse_targets(text: str | None, default_format: str = "json") -> list[Target]:
    """The receivers of ``-C notify`` (comma-separated http(s) URLs, ``slack+`` for Slack's shape).

    ValueError says which entry is wrong and why (config.py turns it into a clear config error).
    """
    if default_format not in FORMATS:
        raise ValueError(f"format {default_format!r} is not one of {', '.join(FORMATS)}")
    targets: list[Target] = []
    for raw in (text or "").split(","):
        entry = raw.strip()
        if not entry:
            continue
        fmt = default_format
        if entry.lower().startswith(SLACK_PREFIX):
            fmt, entry = "slack", entry[len(SLACK_PREFIX):]
        parts = urllib.parse.urlsplit(entry)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{redact_url(entry) if parts.hostname else entry!r} is not an http(s) URL")
        target = Target(entry, fmt)
        if target not in targets:
            targets.append(target)
    return targets


def parse_event_filter(text: str | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``notify_events`` as (include patterns, exclude patterns). Kind names expand to their events."""
    include: list[str] = []
    exclude: list[str] = []
    for raw in (text or "all").split(","):
        pattern = raw.strip()
        if not pattern:
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip()
        if not pattern or not all(c.isalnum() or c in "_*?[]-" for c in pattern):
            raise ValueError(f"{raw.strip()!r} is not an event name, kind or pattern")
        expanded = ["*"] if pattern == "all" else list(EVENT_KINDS.get(pattern, (pattern,)))
        (exclude if negate else include).extend(expanded)
    return tuple(include or ["*"]), tuple(exclude)


def selected(event: str, event_filter: tuple[tuple[str, ...], tuple[str, ...]]) -> bool:
    """Whether ``event`` passes the filter of :func:`parse_event_filter`."""
    include, exclude = event_filter
    return (any(fnmatch.fnmatchcase(event, p) for p in include)
            and not any(fnmatch.fnmatchcase(event, p) for p in exclude))


def delivery_id(deployment: str, target: Target, offset: int, event: dict[str, Any]) -> str:
    """The id of the delivery of the history line at byte ``offset`` to ``target``.

    Derived, not drawn: an agent restarted mid-retry sends the same id again, so receivers that
    dedupe on it (as MLflow's do) see one delivery however often it was tried.
    """
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"mlflow-deploy:{deployment}:{target.key}:{offset}:{event.get('time')}"))


def summary(deployment: str, event: dict[str, Any]) -> str:
    """One line for humans: deployment, event, model version, reason (Slack's text, the JSON's text)."""
    model = event.get("model") if isinstance(event.get("model"), dict) else None
    parts = [f"[{deployment}] {event.get('event')}"]
    if model and model.get("model_version"):
        parts.append(f"{model.get('model_name')} v{model.get('model_version')}")
    elif event.get("model_version"):
        parts.append(f"v{event['model_version']}")
    for key in ("status", "reason", "error"):
        if event.get(key):
            parts.append(f"{key}: {event[key]}" if key != "reason" else str(event[key]))
    parts.extend(_verdict_words(event))
    return " · ".join(str(part) for part in parts)[:3000]


def _verdict_words(event: dict[str, Any]) -> list[str]:
    """What a ``*_verdict`` event found, for people: a Slack channel gets only the text, and
    "shadow_verdict · churn v5" alone did not say whether the shadow passed or how it answered."""
    if not str(event.get("event") or "").endswith("_verdict"):
        return []
    words: list[str] = []
    verdict = event.get("verdict")  # the policy's judgement of a shadow stage
    if isinstance(verdict, dict) and verdict.get("status") and not event.get("status"):
        words.append(f"verdict: {verdict['status']}")
    told = event.get("summary") or event.get("text")  # shadow figures; a quality estimate's line
    if isinstance(told, str) and told.strip():
        return [*words, told.strip()]
    if isinstance(event.get("share"), int | float):  # drift
        drifted = event.get("drifted_columns")
        words.append(f"drift share {event['share']:.3g}" + (f" ({drifted} columns)" if drifted is not None else ""))
    figures = event.get("figures")
    if isinstance(figures, dict):  # quality: the labelled figures
        shown = [f"{name} {value:.4g}" for name, value in list(figures.items())[:4]
                 if isinstance(value, int | float)]
        rows = event.get("labelled_rows")
        if shown:
            words.append(", ".join(shown) + (f" on {rows} labelled rows" if rows is not None else ""))
    return words


def payload(deployment: str, event: dict[str, Any], fmt: str = "json") -> bytes:
    """The body POSTed for one history event, in ``fmt`` (``json`` or ``slack``)."""
    if fmt == "slack":
        return json.dumps({"text": slack_escape(summary(deployment, event))}).encode()
    stamp = float(event.get("time") or 0.0)
    details = {k: v for k, v in event.items() if k not in ("time", "event")}
    return json.dumps({
        "deployment": deployment, "event": event.get("event"),
        "time": datetime.fromtimestamp(stamp, tz=UTC).isoformat().replace("+00:00", "Z"),
        "timestamp": stamp, "text": summary(deployment, event), "details": details,
    }, default=str, sort_keys=True).encode()


def slack_escape(text: str) -> str:
    """Slack reads ``<...>`` as links and mentions (``<!channel>``) and ``&`` as an entity: a reason such
    as "agreement 0.91 < 0.95 required" must reach the channel as written, and never ping anyone.
    These three are all Slack asks to escape (api.slack.com, "Formatting text for app surfaces")."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def signed_headers(secret: str, delivery: str, body: bytes, now: float | None = None) -> dict[str, str]:
    """The headers of one attempt: MLflow's three webhook headers, signed with ``secret``."""
    timestamp = str(int(time.time() if now is None else now))
    return {
        "Content-Type": "application/json", "User-Agent": USER_AGENT,
        DELIVERY_ID_HEADER: delivery, TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: sign_delivery(secret, delivery, timestamp, body),
    }


@dataclass(frozen=True)
class Attempt:
    """What one POST came to: ``status`` (None when no answer), ``error``, and whether to try again."""

    status: int | None
    error: str | None
    retry: bool
    retry_after_s: float | None = None  # what the receiver's Retry-After asked for (429, 503)

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def post(url: str, body: bytes, headers: dict[str, str], timeout_s: float = POST_TIMEOUT_S) -> Attempt:
    """POST once, waiting at most ``timeout_s`` for each socket operation (connect, send, answer).
    Network errors, timeouts, 5xx, 408/425/429 say retry; other 4xx say refused for good."""
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310 (http(s) checked)
            response.read(65536)
            return Attempt(response.status, None, False)
    except urllib.error.HTTPError as exc:
        status = exc.code
        retry = status >= 500 or status in RETRYABLE_STATUS
        asked = retry_after_s(exc.headers.get("Retry-After")) if retry and exc.headers is not None else None
        return Attempt(status, f"HTTP {status} {exc.reason}", retry, asked)
    except (OSError, ValueError) as exc:  # URLError, timeouts, refused connections, bad redirects
        reason = getattr(exc, "reason", None) or exc
        return Attempt(None, f"{type(exc).__name__}: {reason}"[:300], True)


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks to wait (delta-seconds or an HTTP date; a date in the past
    is 0), or None when there is none or it cannot be read."""
    text = (value or "").strip()
    if not text:
        return None
    if text.isdigit():
        return float(int(text))
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def next_wait_s(attempt: int, result: Attempt, *, base_s: float = 1.0, cap_s: float = 300.0,
                rng: random.Random | None = None) -> float:
    """Seconds before trying again after failed attempt ``attempt``: the backoff, or longer when the
    receiver asked for it with Retry-After (Slack and most APIs send it with 429 and 503; trying
    sooner only meets another 429), never beyond ``cap_s`` (alerts keep flowing once it is back)."""
    wait = backoff_s(attempt, base_s=base_s, cap_s=cap_s, rng=rng)
    if result.retry_after_s is not None:
        wait = min(cap_s, max(wait, result.retry_after_s))
    return wait


def backoff_s(attempt: int, *, base_s: float = 1.0, cap_s: float = 300.0,
              rng: random.Random | None = None) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based): base·2^(n-1), capped, ±10 %
    jitter so receivers coming back are not hit by every deployment at the same instant."""
    delay = min(cap_s, base_s * 2 ** max(0, attempt - 1))
    return delay * (0.9 + 0.2 * (rng or random).random())

"""Is this delivery really from our MLflow server, recent, and new? Signatures, freshness, dedupe.

Kept apart from the HTTP receiver because it is the security boundary: plain functions of headers
and bytes, with no web framework, that tests (and tools that send deliveries) use directly.

MLflow sends three headers with every delivery: ``X-MLflow-Delivery-Id`` (a UUID, reused by the
sender's retries), ``X-MLflow-Timestamp`` (unix seconds) and ``X-MLflow-Signature: v1,<base64
HMAC-SHA256>`` computed with the webhook's secret over ``"{delivery_id}.{timestamp}.{body}"`` (see
``mlflow/webhooks/delivery.py``). The sender retries on 429/500/502/503/504 with the *same* request,
so a duplicate delivery id is normal and is answered 200 without handling it twice
(:class:`DeliveryDeduper`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping

# The names MLflow uses (mlflow/webhooks/constants.py); header lookup is case-insensitive.
SIGNATURE_HEADER = "X-MLflow-Signature"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
DELIVERY_ID_HEADER = "X-MLflow-Delivery-Id"
SIGNATURE_VERSION = "v1"

# MLflow's delivery ids are UUIDs (36 chars); anything far longer is not from MLflow.
_MAX_DELIVERY_ID_CHARS = 200

_ERROR_CODES = {
    400: "MALFORMED_REQUEST",
    401: "UNAUTHENTICATED",
    413: "REQUEST_LIMIT_EXCEEDED",
    500: "INTERNAL_ERROR",
}


def error_code_for(status: int) -> str:
    """The MLflow-style error code of an HTTP status the receiver answers."""
    return _ERROR_CODES.get(status, "BAD_REQUEST")


class WebhookRejected(ValueError):
    """A delivery we refuse, with the HTTP status to answer and a reason safe to show the sender."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status}: {reason}")
        self.status = status
        self.reason = reason

    @property
    def error_code(self) -> str:
        """The MLflow-style error code for :attr:`status`."""
        return error_code_for(self.status)


# --------------------------------------------------------------------------------------------------
# Verification


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """Case-insensitive lookup that works for plain dicts as well as Starlette's ``Headers``."""
    wanted = name.lower()
    for key, value in headers.items():
        if key.lower() == wanted:
            return value
    return None


def _digest(secret: str, delivery_id: str, timestamp: str, body: bytes) -> bytes:
    """HMAC-SHA256 over ``"{delivery_id}.{timestamp}.{body}"``: the one implementation of the scheme,
    used to verify deliveries in and to sign notifications out (``lifecycle/notify.py``)."""
    return hmac.new(secret.encode("utf-8"), f"{delivery_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()


def sign_delivery(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """The ``X-MLflow-Signature`` value MLflow sends for this delivery (and our notifications carry)."""
    return f"{SIGNATURE_VERSION},{base64.b64encode(_digest(secret, delivery_id, timestamp, body)).decode('ascii')}"


def verify_delivery(secret: str, headers: Mapping[str, str], body: bytes, *, now: float | None = None,
                    max_age_s: float = 300) -> None:
    """Check that a delivery is signed with ``secret`` and recent; raise :class:`WebhookRejected` if not.

    ``body`` must be the raw bytes as received: the signature covers them byte for byte. A signature
    header may carry several space-separated ``v1,<base64>`` entries (Standard Webhooks style); one
    match is enough. ``max_age_s`` bounds how far the timestamp may lie in the past (replays) or the
    future (clock skew) relative to ``now`` (default: the current time).
    """
    if not secret:
        raise ValueError("the webhook secret must not be empty")
    delivery_id = _header(headers, DELIVERY_ID_HEADER)
    timestamp = _header(headers, TIMESTAMP_HEADER)
    signature = _header(headers, SIGNATURE_HEADER)
    missing = [name for name, value in ((DELIVERY_ID_HEADER, delivery_id), (TIMESTAMP_HEADER, timestamp),
                                        (SIGNATURE_HEADER, signature)) if not value]
    if missing:
        raise WebhookRejected(401, f"missing header(s): {', '.join(missing)}")
    assert delivery_id is not None and timestamp is not None and signature is not None  # for type checkers
    if len(delivery_id) > _MAX_DELIVERY_ID_CHARS or not delivery_id.isascii():
        raise WebhookRejected(401, f"malformed {DELIVERY_ID_HEADER}")
    if not (timestamp.isascii() and timestamp.isdigit()):
        raise WebhookRejected(401, f"malformed {TIMESTAMP_HEADER} (expected unix seconds)")

    # The timestamp is checked before the HMAC: it is cheap, and it is what stops a captured,
    # correctly signed delivery from being replayed after the dedupe memory has forgotten it.
    current = time.time() if now is None else now
    age = current - int(timestamp)
    if age > max_age_s:
        raise WebhookRejected(401, f"timestamp is {age:.0f}s old (limit {max_age_s:.0f}s): stale or replayed")
    if -age > max_age_s:
        raise WebhookRejected(401, f"timestamp is {-age:.0f}s in the future (limit {max_age_s:.0f}s)")

    expected = _digest(secret, delivery_id, timestamp, body)
    well_formed = matched = False
    for candidate in signature.split():
        version, sep, encoded = candidate.partition(",")
        if not sep or version != SIGNATURE_VERSION:
            continue
        try:
            decoded = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            continue
        well_formed = True
        # No early exit and a constant-time compare: timing must not tell how close a forgery was.
        matched |= hmac.compare_digest(decoded, expected)
    if not well_formed:
        raise WebhookRejected(401, f"malformed {SIGNATURE_HEADER} (expected '{SIGNATURE_VERSION},<base64>')")
    if not matched:
        raise WebhookRejected(401, "signature mismatch")


# --------------------------------------------------------------------------------------------------
# De-duplication


class DeliveryDeduper:
    """Remembers recently seen delivery ids, bounded in both count and age.

    MLflow retries a delivery with the same id when it got no 2xx (e.g. our answer was lost), so the
    second copy must be recognised. Entries older than ``ttl_s`` are forgotten; beyond
    ``max_entries`` the oldest go first. Keep ``ttl_s`` above the receiver's ``max_age_s``: older
    deliveries are already refused by their timestamp, so that is all the memory that is needed.
    """

    def __init__(self, max_entries: int = 10_000, ttl_s: float = 3600,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 1 or ttl_s <= 0:
            raise ValueError("max_entries must be >= 1 and ttl_s > 0")
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._clock = clock
        self._seen: OrderedDict[str, float] = OrderedDict()  # insertion order == time order
        self._lock = threading.Lock()

    def first_time(self, delivery_id: str) -> bool:
        """Record ``delivery_id``; True if it was not seen within the TTL (so handle it), else False."""
        now = self._clock()
        with self._lock:
            self._expire(now)
            if delivery_id in self._seen:
                return False
            self._seen[delivery_id] = now
            while len(self._seen) > self.max_entries:
                self._seen.popitem(last=False)
            return True

    def forget(self, delivery_id: str) -> None:
        """Drop ``delivery_id`` so that a retry of it is handled again (after a failed hand-over)."""
        with self._lock:
            self._seen.pop(delivery_id, None)

    def __len__(self) -> int:
        with self._lock:
            self._expire(self._clock())
            return len(self._seen)

    def _expire(self, now: float) -> None:
        while self._seen:
            oldest_id, seen_at = next(iter(self._seen.items()))
            if now - seen_at < self.ttl_s:
                break
            del self._seen[oldest_id]

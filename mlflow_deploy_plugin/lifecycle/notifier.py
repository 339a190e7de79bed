"""Deliver a deployment's history to its ``-C notify`` receivers: a thread of the agent, one per receiver.

The deployment's ``history.jsonl`` already is the durable, ordered log of everything that happens
to it, written by every process (CLI, supervisor, agent, report jobs). So notifications are not
sent from the places events happen (which would block them on a slow receiver, and lose what was
not sent when a process dies): each receiver's :class:`Channel` tails the history from a persisted
byte offset (``notify/cursor-<key>.json``) and moves it past an event only once that event was
delivered or refused for good. An agent restart, a supervisor takeover or a receiver down for hours
loses nothing; a receiver that is down delays only its own channel, in order.

Every attempt is appended to ``notify/deliveries.jsonl`` (``mlflow-deploy notifications NAME``).
Transient failures (no answer, 5xx, 408/425/429) are retried with exponential backoff (1 s doubling,
capped at 5 min; longer when the receiver's Retry-After asks for it, up to that cap) without end:
alerts matter most when things are broken for a while. Any other 4xx is the receiver refusing the
payload: recorded as ``refused`` and the channel moves on.

When a receiver is first configured the channel starts at the first event since the spec changed
(so adding ``notify`` to an old deployment does not replay its whole past; a receiver added to the
policy file while the agent runs starts at that moment); removing it forgets its cursor.
Receivers come from ``-C notify`` and from the policy file's ``notify:`` section.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow_deploy_plugin.lifecycle import notify
from mlflow_deploy_plugin.spec import DeploymentSpec, SpecError, load_spec
from mlflow_deploy_plugin.state import (
    DeploymentPaths,
    StateStore,
    append_history_file,
    read_json,
    read_or_create_secret,
    write_json_atomic,
)

_logger = logging.getLogger(__name__)
DELIVERIES = "deliveries.jsonl"
_START_SLACK_S = 5.0  # events this much older than the spec change that configured a receiver still go
# On the agent's way out, what is written and not yet delivered gets this long more, in all (see
# Notifier.run_forever): a POST in flight when the agent is told to stop ends within notify.POST_TIMEOUT_S
# (no longer than this), and none starts after it, so the whole stop stays within the 20 s the agent
# waits for its notifier, the 30 s the supervisor waits for the agent, and delete's timeout_s + 15.
LAST_WORD_S = 10.0
CLI_LAST_WORD_S = 5.0  # the same for `deleted` / `create_failed`, sent by the CLI (deliver_pending)
_JOIN_GRACE_S = 1.0  # past a deadline, what a channel may take to save its cursor and return


class SecretUnavailable(RuntimeError):
    """``notify_secret_env`` names a variable that is not set in the agent's environment."""


def notify_secret(spec: DeploymentSpec, paths: DeploymentPaths) -> str:
    """The signing secret: the variable ``notify_secret_env`` names, else the deployment's ``notify.key``.

    Never logged, never in ``get``: only its source is shown (:func:`secret_source`).
    """
    name = spec.config.notify_secret_env
    if name:
        value = os.environ.get(name)
        if not value:
            raise SecretUnavailable(f"notify_secret_env={name} is unset or empty in the agent's environment")
        return value
    return read_or_create_secret(paths.notify_key)


def secret_source(spec: DeploymentSpec, paths: DeploymentPaths) -> str:
    """Where the signing secret comes from, for humans (never the secret)."""
    if spec.config.notify_secret_env:
        return f"environment variable {spec.config.notify_secret_env}"
    return f"file {paths.notify_key}"


def targets_of(spec: DeploymentSpec) -> list[notify.Target]:
    """The receivers the spec names (``notify`` with ``notify_format`` as default shape)."""
    return notify.parse_targets(spec.config.notify, spec.config.notify_format)


def receivers(spec: DeploymentSpec, policy_notify: Any = None) -> dict[notify.Target, str]:
    """Every receiver with its ``notify_events`` filter: ``-C notify``'s, then the policy file's
    ``notify:`` ones (a URL in both keeps the ``-C`` settings). ``policy_notify``: the policy's
    :class:`~.policy.NotifyPolicy` if the caller has it, else read from ``spec.config.policy``.
    """
    found = {target: spec.config.notify_events for target in targets_of(spec)}
    if policy_notify is None and spec.config.policy:
        from mlflow_deploy_plugin.lifecycle.policy import PolicyError, load_policy

        try:
            policy_notify = load_policy(spec.config.policy).notify
        except PolicyError as exc:
            _logger.warning("Notifications: the policy's receivers are unusable (%s)", exc)
    if policy_notify is not None:
        for target in notify.parse_targets(policy_notify.urls, policy_notify.format):
            found.setdefault(target, policy_notify.events)
    return found


def read_new_events(history: Path, offset: int) -> list[tuple[int, int, dict[str, Any] | None]]:
    """Complete lines of ``history`` from byte ``offset``: (start, end, event or None if unreadable).

    A line still being written (no newline yet) is left for the next call; a line torn by a crash
    is completed by the next writer's newline (``state.append_history_file``) and read as None.
    """
    import json

    try:
        with open(history, "rb") as handle:
            handle.seek(offset)
            data = handle.read()
    except FileNotFoundError:
        return []
    lines = []
    position = offset
    for raw in data.split(b"\n")[:-1]:  # the last piece has no newline: not complete yet
        start, end = position, position + len(raw) + 1
        position = end
        if not raw.strip():
            continue
        try:
            event = json.loads(raw)
        except ValueError:
            event = None
        lines.append((start, end, event if isinstance(event, dict) and "event" in event else None))
    return lines


def start_offset(history: Path, since: float) -> int:
    """Byte offset of the first event at or after ``since`` (the history's end if none)."""
    position = 0
    for start, _end, event in read_new_events(history, 0):
        if event is not None and float(event.get("time") or 0) >= since:
            return start
        position = _end
    return position


EventFilter = tuple[tuple[str, ...], tuple[str, ...]]


@dataclass
class Settings:
    """What the channels need from the spec and policy; replaced as a whole when they change."""

    spec: DeploymentSpec
    filters: dict[notify.Target, EventFilter]


class Channel:
    """Delivers the history of one deployment to one receiver, in order, from its own cursor."""

    def __init__(self, paths: DeploymentPaths, target: notify.Target, settings: Callable[[], Settings], *,
                 poll_s: float = 0.5, base_backoff_s: float = 1.0, max_backoff_s: float = 300.0,
                 since: float | None = None, until_caught_up: bool = False, deadline: float | None = None,
                 final: bool = False) -> None:
        # Without a cursor, start at the first event this recent (default: a little before the spec change).
        self.since = since
        # time.monotonic() after which no attempt starts and none lasts (the last word's budget); None: no end.
        self.deadline = deadline
        # Nobody retries after this channel (the CLI's, for a deployment that has no agent any more): an
        # attempt cut short by the deadline is recorded `undelivered`, not `retrying`.
        self.final = final
        self.paths = paths
        self.target = target
        self.settings = settings
        self.poll_s = poll_s
        self.base_backoff_s = base_backoff_s
        self.max_backoff_s = max_backoff_s
        self.until_caught_up = until_caught_up  # return once every written event is handled (last word)
        self.cursor_path = paths.notify / f"cursor-{target.key}.json"
        self.stop = threading.Event()
        self._wake = threading.Event()  # set by halt() and finish(): a wait ends at once
        # When the next attempt at the event at the cursor may start (monotonic), and whether the
        # receiver asked for it (Retry-After: kept in the cursor file, honoured by the next channel).
        self._next_try = 0.0
        self._asked = False
        self.thread = threading.Thread(target=self.run, name=f"notify-{target.key}", daemon=True)

    def halt(self) -> None:
        """Stop now: the current attempt ends, the cursor stays before its event."""
        self.stop.set()
        self._wake.set()

    def finish(self, deadline: float) -> None:
        """Deliver what is written by ``deadline`` (monotonic), then return: the last word of a running
        channel, from its own cursor and with its pending Retry-After (no second channel on it)."""
        self.deadline = deadline
        self.until_caught_up = True
        if not self._asked:
            self._next_try = 0.0  # a plain backoff is cut short once: one more try before the agent goes
        self._wake.set()

    def _wait(self, seconds: float) -> None:
        if self._wake.wait(max(0.0, seconds)):
            self._wake.clear()  # the caller looks at stop / deadline again after this

    def load_cursor(self) -> int:
        stored = read_json(self.cursor_path)
        if isinstance(stored, dict) and isinstance(stored.get("offset"), int):
            not_before = stored.get("not_before")
            if isinstance(not_before, int | float) and not_before > time.time():
                self._next_try, self._asked = time.monotonic() + (not_before - time.time()), True
            return int(stored["offset"])
        since = self.since if self.since is not None else self.settings().spec.updated_at - _START_SLACK_S
        offset = start_offset(self.paths.history, since)
        self.save_cursor(offset)
        return offset

    def save_cursor(self, offset: int, not_before: float | None = None) -> None:
        """Persist ``offset``; ``not_before``: the wall time a receiver's Retry-After asked to wait until."""
        state: dict[str, Any] = {"offset": offset, "target": self.target.shown, "format": self.target.format}
        if not_before is not None:
            state["not_before"] = round(not_before, 3)
        write_json_atomic(self.cursor_path, state)

    def run(self) -> None:
        """Deliver until :attr:`stop` is set; a delivery interrupted by it is sent again next time."""
        try:
            offset = self.load_cursor()
            while not self.stop.is_set():
                batch = read_new_events(self.paths.history, offset)
                for start, end, event in batch:
                    wanted = event is not None and notify.selected(str(event["event"]), self._filter())
                    if wanted and event is not None and not self.deliver(start, event):
                        return  # stopped mid-delivery: the cursor stays before this event
                    offset = end
                    self._next_try, self._asked = 0.0, False
                    self.save_cursor(offset)
                if not batch:
                    if self.until_caught_up:
                        return
                    self._wait(self.poll_s)
        except Exception:  # the agent goes on following and judging; the next agent resumes here
            _logger.exception("Notifications to %s stopped", self.target.shown)

    def _filter(self) -> EventFilter:
        return self.settings().filters.get(self.target) or notify.parse_event_filter("all")

    def _may_start(self) -> float | None:
        """The POST timeout of an attempt that may start now; None when none may (stopped, past the
        deadline, or the receiver asked to wait beyond it). Waits out a pending backoff first."""
        while not self.stop.is_set():
            now = time.monotonic()
            if self.deadline is not None and (now >= self.deadline or self._next_try >= self.deadline):
                return None
            if self._next_try > now:
                self._wait(self._next_try - now)
                continue
            left = notify.POST_TIMEOUT_S if self.deadline is None else self.deadline - now
            return min(notify.POST_TIMEOUT_S, left)
        return None

    def deliver(self, offset: int, event: dict[str, Any]) -> bool:
        """Send one event until it is delivered or refused (True), or the channel is stopped or past its
        deadline (False): then the cursor stays before it."""
        spec = self.settings().spec
        delivery = notify.delivery_id(spec.name, self.target, offset, event)
        body = notify.payload(spec.name, event, self.target.format)
        attempt = 0
        while (timeout_s := self._may_start()) is not None:
            attempt += 1
            try:
                headers = notify.signed_headers(notify_secret(self.settings().spec, self.paths), delivery, body)
                result = notify.post(self.target.url, body, headers, timeout_s=timeout_s)
            except SecretUnavailable as exc:
                result = notify.Attempt(None, str(exc), True)
            outcome = "delivered" if result.delivered else "retrying" if result.retry else "refused"
            if outcome != "retrying":
                self.record(event, delivery, attempt, result, outcome, None)
                if outcome == "refused":
                    _logger.warning("%s refused %s (%s): moving on", self.target.shown, event["event"], result.error)
                return True
            wait = notify.next_wait_s(attempt, result, base_s=self.base_backoff_s, cap_s=self.max_backoff_s)
            asked = result.retry_after_s is not None
            self._next_try, self._asked = time.monotonic() + wait, asked
            if asked:
                self.save_cursor(offset, not_before=time.time() + wait)
            if self.deadline is not None and self._next_try >= self.deadline:
                # This channel tries no more: no next try is announced (the next agent's channel tries
                # again, honouring a Retry-After kept above; after the CLI's, nobody does).
                self.record(event, delivery, attempt, result, "undelivered" if self.final else outcome, None)
                _logger.warning("Delivery of %s to %s failed (%s); out of time, not sent from here", event["event"],
                                self.target.shown, result.error)
                return False
            self.record(event, delivery, attempt, result, outcome, wait)
            if attempt == 1 or attempt % 10 == 0:
                _logger.warning("Delivery of %s to %s failed (%s); retrying in %.0fs", event["event"],
                                self.target.shown, result.error, wait)
        return False

    def record(self, event: dict[str, Any], delivery: str, attempt: int, result: notify.Attempt,
               outcome: str, next_try_s: float | None) -> None:
        details: dict[str, Any] = {"outcome": outcome, "delivery_id": delivery, "target": self.target.shown,
                                   "format": self.target.format, "attempt": attempt, "status": result.status,
                                   "event_time": event.get("time")}
        if result.error:
            details["error"] = result.error
        if result.retry_after_s is not None:
            details["retry_after_s"] = round(result.retry_after_s, 2)
        if next_try_s is not None:
            details["next_try_s"] = round(next_try_s, 2)
        with contextlib.suppress(OSError):  # a full disk must not stop delivering
            self.paths.notify.mkdir(mode=0o700, exist_ok=True)
            append_history_file(self.paths.notify / DELIVERIES, str(event["event"]), **details)


class Notifier:
    """One deployment's channels, kept in step with its spec (receivers added, removed, refiltered)."""

    def __init__(self, store: StateStore, name: str, *, paths: DeploymentPaths | None = None,
                 **channel_options: Any) -> None:
        """``paths``: the deployment's folder when it is not ``store``'s (an archived one)."""
        self.store = store
        self.name = name
        self.paths = paths or store.paths(name)
        self.channel_options = channel_options
        self.channels: dict[notify.Target, Channel] = {}
        self._settings: Settings | None = None
        self._policy_cache: tuple[tuple[str, int], Any] | None = None
        self._first_refresh = True

    def _policy_notify(self, spec: DeploymentSpec) -> Any:
        """The policy file's ``notify:`` section, re-read when the file changes; the last valid one
        while it is unusable (as the lifecycle controller keeps the last valid policy)."""
        path = spec.config.policy
        if not path:
            self._policy_cache = None
            return None
        try:
            stamp = (path, os.stat(path).st_mtime_ns)
        except OSError:
            return self._policy_cache[1] if self._policy_cache else None
        if self._policy_cache is None or self._policy_cache[0] != stamp:
            from mlflow_deploy_plugin.lifecycle.policy import PolicyError, load_policy

            try:
                self._policy_cache = (stamp, load_policy(path).notify)
            except PolicyError as exc:
                _logger.warning("Notifications: policy file unusable, keeping its last receivers (%s)", exc)
                return self._policy_cache[1] if self._policy_cache else None
        return self._policy_cache[1]

    def current(self) -> Settings:
        assert self._settings is not None
        return self._settings

    def read_settings(self) -> Settings | None:
        """The spec and every receiver's filter as they are now; None (warned) when unusable."""
        try:
            spec = load_spec(self.paths.spec)
        except SpecError as exc:
            _logger.warning("Notifications: unreadable spec (%s); keeping the last one", exc)
            return None
        if spec is None:
            return None
        try:
            wanted = receivers(spec, self._policy_notify(spec))
            return Settings(spec, {target: notify.parse_event_filter(events) for target, events in wanted.items()})
        except ValueError as exc:  # validated at create/update; a hand-edited spec may still be wrong
            _logger.warning("Notifications: %s", exc)
            return None

    def refresh(self) -> None:
        """Re-read the spec; start channels of new receivers, stop (and forget) removed ones."""
        settings = self.read_settings()
        if settings is None:
            return
        targets = list(settings.filters)
        self._settings = settings
        for target in list(self.channels):
            if target not in targets:
                channel = self.channels.pop(target)
                channel.halt()
                channel.thread.join(timeout=15)
                with contextlib.suppress(FileNotFoundError):
                    channel.cursor_path.unlink()
        for target in targets:
            running = self.channels.get(target)
            if running is None or not running.thread.is_alive():  # new, or died of an unexpected error
                # A receiver there when the agent starts gets the events since the spec change (the
                # agent starts after `created`); one added later (a policy edit) those from now on.
                since = None if self._first_refresh else time.time() - _START_SLACK_S
                channel = Channel(self.paths, target, self.current, since=since, **self.channel_options)
                self.channels[target] = channel
                channel.thread.start()
        self._first_refresh = False

    def run_forever(self, stop: threading.Event, interval_s: float = 1.0, last_word_s: float = LAST_WORD_S) -> None:
        """Keep the channels in step with the spec until ``stop``; then give what is still undelivered
        ``last_word_s`` more, in all (:meth:`last_word`; cursors are kept)."""
        while not stop.is_set():
            self.refresh()
            stop.wait(interval_s)
        self.last_word(time.monotonic() + last_word_s)

    def last_word(self, deadline: float, *, final: bool = False, since: float | None = None) -> None:
        """Deliver what was written and not yet delivered until ``deadline`` (monotonic), then stop.

        The agent is stopped right after the events that matter most: a crash-looping deployment's
        ``failed`` is written by the supervisor just before it stops the agent (and nothing starts it
        again until someone acts), a stop's or a takeover's last events likewise. Without this, the
        channel's next poll never came and a receiver heard nothing. A running channel finishes from
        where it is (its cursor, its pending Retry-After: never a second channel on one cursor); a
        receiver without one gets a channel until the deadline. No attempt starts after the deadline
        and none lasts beyond it, except one already in flight (at most notify.POST_TIMEOUT_S). What
        is still undelivered stays behind the cursor, for the next agent. ``final``: no agent comes
        after (the CLI's); ``since``: where a receiver without a cursor starts (see :class:`Channel`).
        """
        if self._settings is None:
            return
        options = {**self.channel_options, "until_caught_up": True, "deadline": deadline, "final": final}
        if since is not None:
            options["since"] = since
        channels = []
        for target in self._settings.filters:
            running = self.channels.get(target)
            if running is not None and running.thread.is_alive():
                running.finish(deadline)
                channels.append(running)
            elif time.monotonic() < deadline:
                channel = Channel(self.paths, target, self.current, **options)
                self.channels[target] = channel
                channel.thread.start()
                channels.append(channel)
        for target, channel in self.channels.items():  # removed from the spec, still stopping
            if target not in self._settings.filters:
                channel.halt()
        for channel in channels:
            channel.thread.join(max(0.0, deadline - time.monotonic()))
        for channel in channels:
            channel.halt()  # past the deadline: a receiver still down keeps its cursor before the event
        # A thread still alive then is left (daemon): an attempt in flight since before a deadline
        # shorter than notify.POST_TIMEOUT_S, or a hung DNS lookup, which no socket timeout bounds.
        for channel in channels:
            channel.thread.join(max(0.0, deadline + _JOIN_GRACE_S - time.monotonic()))


def deliver_pending(store: StateStore, name: str, budget_s: float = CLI_LAST_WORD_S, *,
                    paths: DeploymentPaths | None = None, since: float | None = None) -> None:
    """Deliver ``name``'s undelivered events from this process, for at most ``budget_s`` in all.

    For what the CLI writes when no agent will: ``deleted`` (after the deployment's processes, its
    agent with them, are stopped) and ``create_failed`` (before any agent ran); ``paths``: the
    folder it was archived to (cursors and deliveries are recorded there); ``since``: the time of
    the event the CLI just wrote, where a receiver no agent ever had a cursor for starts (not weeks
    of history back at the last spec change). Never raises: the verb that wrote the event has done
    its work; a receiver that does not answer in time is recorded as ``undelivered`` (nobody
    retries), and the event stays in the (archived) history.
    """
    deadline = time.monotonic() + budget_s
    try:
        notifier = Notifier(store, name, paths=paths)
        settings = notifier.read_settings()
        if settings is None or not settings.filters:
            return
        notify_secret(settings.spec, notifier.paths)  # not in this environment: nothing can be signed
        notifier._settings = settings
        notifier.last_word(deadline, final=True, since=since)
    except SecretUnavailable as exc:
        _logger.warning("Notifications of %s not sent from here: %s", name, exc)
    except Exception:  # never fail the verb for a notification
        _logger.exception("Notifications of %s could not be sent", name)


def read_deliveries(paths: DeploymentPaths) -> list[dict[str, Any]]:
    """Every recorded attempt, oldest first."""
    from mlflow_deploy_plugin.state import read_history_file

    return read_history_file(paths.notify / DELIVERIES)


def pending(paths: DeploymentPaths) -> dict[str, int]:
    """Per receiver (shown URL): history events not yet past its cursor (whatever the filter)."""
    counts: dict[str, int] = {}
    for cursor_file in sorted(paths.notify.glob("cursor-*.json")):
        stored = read_json(cursor_file) or {}
        offset = int(stored.get("offset") or 0)
        counts[str(stored.get("target"))] = sum(1 for _s, _e, ev in read_new_events(paths.history, offset) if ev)
    return counts

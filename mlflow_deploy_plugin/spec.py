"""What a deployment should run: one typed :class:`DeploymentSpec`, loaded, checked and saved here.

The spec is the contract between the CLI side (which writes it), the engines (which run it), the
worker processes (which serve it) and the agent (which moves it). It used to be a dict read with
``.get(key, local default)`` in many places, so two readers could disagree on a default; now every
default lives in one dataclass and every reader gets the same typed object.

Standard library only: the local supervisor imports this module and must stay small.

On disk (``deployment.json``) the spec carries ``schema_version``. Files written before the version
existed (schema 0) load unchanged: their shape is schema 1 without the field. A file from a newer
schema is refused with a message saying so, rather than misread.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
FLAVOR = "python_function"


class SpecError(ValueError):
    """A spec (or a part of it) that cannot be used; the message names the key and the file."""


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$", re.IGNORECASE)
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_s(text: str) -> float:
    """Seconds in a duration such as "90s", "30m", "24h" or "7d"; ValueError if it is not one.

    The one parser of durations: `-C drift_max_window` and the CLI's ``--since 24h`` both use it.
    """
    match = _DURATION.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a duration such as 90s, 30m, 24h or 7d")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2).lower()]


def split_names(text: str | None) -> tuple[str, ...]:
    """Column names of a comma-separated list such as ``-C capture_exclude=ssn,email``."""
    return tuple(name.strip() for name in (text or "").split(",") if name.strip())


def is_loopback_host(host: str) -> bool:
    """Whether an address to bind or listen on only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost: may resolve anywhere
        return False


@dataclass(frozen=True)
class DeploymentConfig:
    """The validated settings of one deployment (``config.CONFIG_KEYS`` documents each key)."""

    port: int | None = None
    host: str = "127.0.0.1"
    workers: int = 1
    timeout_s: float = 60.0
    max_body_mb: float = 32.0
    auth_token_env: str | None = None
    max_batch_rows: int = 4096
    max_rows: int = 100_000
    max_cells: int = 10_000_000
    max_queue: int = 256
    batching: str = "auto"
    startup_timeout_s: float = 180.0
    max_restarts: int = 5
    warm_standby: bool = True
    poll_interval_s: float = 10.0
    policy: str | None = None
    capture: bool = True
    capture_sample_rate: float = 1.0
    capture_retention_days: int | None = None
    capture_uri: str | None = None
    capture_buffer_mb: float = 64.0
    capture_exclude: str | None = None
    capture_hash: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    reference_data: str | None = None
    drift_min_rows: int = 200
    drift_methods: str | None = None
    drift_effect_floor: str | None = None
    drift_schedule: str | None = None
    drift_max_window: str = "24h"
    drift_experiment: str | None = None
    # Model quality from ground truth (mlflow_deploy_plugin.quality); see config.CONFIG_KEYS.
    task: str | None = None
    label_horizon: str = "30d"
    quality_min_labelled_rows: int = 100
    # Notifications out (lifecycle/notify.py); see config.CONFIG_KEYS.
    notify: str | None = None
    notify_format: str = "json"
    notify_events: str = "all"
    notify_secret_env: str | None = None
    # Ray Serve engine (lifecycle:/ray) only; see config.CONFIG_KEYS.
    ray_address: str | None = None
    num_replicas: int | None = None
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None
    max_ongoing_requests: int | None = None
    num_cpus: float | None = None
    # Shadow deployment (serving/shadow.py): a version that sees a copy of the traffic, never answers it.
    shadow: str | None = None
    shadow_sample_rate: float = 1.0

    @property
    def is_loopback(self) -> bool:
        """Whether the bind address only accepts connections from this machine."""
        return is_loopback_host(self.host)

    @property
    def drift_max_window_s(self) -> float:
        """``drift_max_window`` ("24h", "90m", "7d", "3600s") in seconds."""
        return duration_s(self.drift_max_window)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def capture_buffer_bytes(self) -> int:
        return int(self.capture_buffer_mb * 1024 * 1024)

    @property
    def capture_exclude_columns(self) -> tuple[str, ...]:
        """``capture_exclude`` as column names (empty if unset)."""
        return split_names(self.capture_exclude)

    @property
    def capture_hash_columns(self) -> tuple[str, ...]:
        """``capture_hash`` as column names (empty if unset)."""
        return split_names(self.capture_hash)

    @property
    def scheme(self) -> str:
        """``https`` when the deployment serves TLS, else ``http``."""
        return "https" if self.tls_cert else "http"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable form, as kept in ``deployment.json``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_stored(cls, stored: Mapping[str, Any]) -> DeploymentConfig:
        """A config as kept in deployment state: type-checked, but its values not validated again.

        Re-validating (policy file readable, cron valid) would make a running deployment depend on
        things that may change later: a policy file moved or edited must not stop its workers from
        restarting. Unknown keys (written by a newer version) are ignored.
        """
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in stored:
                continue
            value = stored[f.name]
            values[f.name] = _check_type(f"config.{f.name}", value, _CONFIG_TYPES[f.name])
        return cls(**values)


_TYPE_NAMES = {"int": int, "float": float, "str": str, "bool": bool, "None": type(None)}
_CONFIG_TYPES: dict[str, tuple[type, ...]] = {
    f.name: tuple(_TYPE_NAMES[part.strip()] for part in str(f.type).split("|"))
    for f in dataclasses.fields(DeploymentConfig)
}


def _check_type(key: str, value: Any, allowed: tuple[type, ...]) -> Any:
    if isinstance(value, bool) and bool not in allowed:
        raise SpecError(f"{key}={value!r} should be {' or '.join(t.__name__ for t in allowed)}")
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, allowed):
        raise SpecError(f"{key}={value!r} should be {' or '.join(t.__name__ for t in allowed)}")
    return value


@dataclass(frozen=True)
class ModelRef:
    """A registry URI pinned to the version it meant when it was resolved."""

    requested_uri: str  # what the user asked for, e.g. models:/churn@champion
    model_name: str
    model_version: str
    run_id: str | None = None
    source: str = ""  # the version's artifact source, e.g. models:/m-abc or runs:/.../model

    @property
    def version_uri(self) -> str:
        """The URI of exactly this version: what workers load, so restarts never drift."""
        return f"models:/{self.model_name}/{self.model_version}"

    @property
    def key(self) -> tuple[str, str]:
        return (self.model_name, self.model_version)

    @property
    def is_floating(self) -> bool:
        """Whether the requested URI can point at another version later (alias, stage, latest)."""
        if "@" in self.requested_uri:
            return True
        return not self.requested_uri.rstrip("/").rsplit("/", 1)[-1].isdigit()

    def to_dict(self) -> dict[str, Any]:
        return dict(dataclasses.asdict(self), version_uri=self.version_uri)

    @classmethod
    def from_dict(cls, data: Any, where: str = "model") -> ModelRef:
        if not isinstance(data, Mapping):
            raise SpecError(f"{where} should be an object with requested_uri, model_name and model_version")
        missing = [k for k in ("requested_uri", "model_name", "model_version") if not data.get(k)]
        if missing:
            raise SpecError(f"{where} lacks {', '.join(missing)}")
        return cls(str(data["requested_uri"]), str(data["model_name"]), str(data["model_version"]),
                   data.get("run_id") or None, str(data.get("source") or ""))


@dataclass(frozen=True)
class TrafficShare:
    """One version served side by side with others, and its share of requests in percent."""

    model: ModelRef
    percent: float

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(), "percent": self.percent}


@dataclass(frozen=True)
class DeploymentSpec:
    """Everything an engine needs to run one deployment, and nothing about how it runs."""

    name: str
    model: ModelRef
    config: DeploymentConfig = field(default_factory=DeploymentConfig)
    traffic: tuple[TrafficShare, ...] = ()  # empty: ``model`` gets 100%
    # The version ``config.shadow`` resolved to: it predicts a copy of the requests, its answers only captured.
    shadow: ModelRef | None = None
    flavor: str = FLAVOR
    engine: str = "local"
    generation: int = 1
    tracking_uri: str | None = None
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)

    def shares(self) -> list[TrafficShare]:
        """The versions served with their percentages (the one version at 100% by default)."""
        return list(self.traffic) or [TrafficShare(self.model, 100.0)]

    def served_versions(self) -> set[tuple[str, str]]:
        """(model name, version) of everything this spec serves."""
        return {share.model.key for share in self.shares()}

    def tagged_versions(self) -> set[tuple[str, str]]:
        """(model name, version) of everything that runs for this spec: the served versions and the
        shadow (whose registry serving tag says where it sees traffic)."""
        return self.served_versions() | ({self.shadow.key} if self.shadow is not None else set())

    @property
    def needs_agent(self) -> bool:
        """Whether the deployment has background work: schedules, a policy, a moving reference, or
        notifications to deliver (the agent's notifier thread)."""
        return bool(self.config.drift_schedule or self.config.policy or self.model.is_floating
                    or self.config.notify)

    def replace(self, **changes: Any) -> DeploymentSpec:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION, "name": self.name, "flavor": self.flavor, "engine": self.engine,
            "generation": self.generation, "model": self.model.to_dict(), "config": self.config.to_dict(),
            "tracking_uri": self.tracking_uri, "created_at": self.created_at, "updated_at": self.updated_at,
        }
        if self.traffic:
            data["traffic"] = [share.to_dict() for share in self.traffic]
        if self.shadow is not None:
            data["shadow"] = self.shadow.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Any) -> DeploymentSpec:
        """Check and type a spec as stored (any schema up to :data:`SCHEMA_VERSION`)."""
        if not isinstance(data, Mapping):
            raise SpecError("a deployment spec should be a JSON object")
        version = data.get("schema_version", 0)
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise SpecError(f"schema_version={version!r} is newer than this mlflow-deploy-plugin understands "
                            f"({SCHEMA_VERSION}); upgrade the package")
        name = data.get("name")
        if not isinstance(name, str) or not name:
            raise SpecError("name is missing")
        config = data.get("config") or {}
        if not isinstance(config, Mapping):
            raise SpecError("config should be an object")
        traffic = []
        for index, entry in enumerate(data.get("traffic") or []):
            if not isinstance(entry, Mapping):
                raise SpecError(f"traffic[{index}] should be an object with model and percent")
            percent = _check_type(f"traffic[{index}].percent", entry.get("percent"), (float,))
            if not 0 <= percent <= 100:
                raise SpecError(f"traffic[{index}].percent={percent!r} should be from 0 to 100")
            traffic.append(TrafficShare(ModelRef.from_dict(entry.get("model"), f"traffic[{index}].model"), percent))
        now = time.time()
        return cls(
            name=name,
            model=ModelRef.from_dict(data.get("model")),
            config=DeploymentConfig.from_stored(config),
            traffic=tuple(traffic),
            shadow=ModelRef.from_dict(data["shadow"], "shadow") if data.get("shadow") else None,
            flavor=str(data.get("flavor") or FLAVOR),
            engine=str(data.get("engine") or "local"),
            generation=_check_type("generation", data.get("generation", 1), (int,)),
            tracking_uri=data.get("tracking_uri"),
            created_at=_check_type("created_at", data.get("created_at", now), (float,)),
            updated_at=_check_type("updated_at", data.get("updated_at", now), (float,)),
        )


def load_spec(path: Path) -> DeploymentSpec | None:
    """The spec stored at ``path``, or None if there is none. SpecError names the file if it is bad."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    try:
        return DeploymentSpec.from_dict(json.loads(text))
    except (ValueError, SpecError) as exc:
        raise SpecError(f"{path}: {exc}") from None


def spec_to_json(spec: DeploymentSpec, **extra: Any) -> dict[str, Any]:
    """The stored form of ``spec``, plus engine-private keys (ignored when the spec is loaded)."""
    return dict(spec.to_dict(), **extra)

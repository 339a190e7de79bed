"""`-C key=value` strings -> a typed, validated :class:`DeploymentConfig`.

`mlflow deployments` hands every `-C` value over as a string; the Python API may hand over real
ints and bools. Both go through the same converters so the CLI and the API accept the same things
and reject them with the same message.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from mlflow_deploy_plugin.errors import InvalidRequest
from mlflow_deploy_plugin.spec import DeploymentConfig

__all__ = ["CONFIG_KEYS", "DeploymentConfig", "config_help", "parse_config"]

_ENV_VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _invalid(key: str, value: Any, allowed: str) -> InvalidRequest:
    return InvalidRequest(f"Invalid deployment config: {key}={value!r}. Allowed: {allowed}.")


def _to_int(lo: int, hi: int) -> Callable[[str, Any], int]:
    def convert(key: str, value: Any) -> int:
        try:
            if isinstance(value, bool):
                raise ValueError
            number = int(str(value).strip())
        except ValueError:
            raise _invalid(key, value, f"an integer from {lo} to {hi}") from None
        if not lo <= number <= hi:
            raise _invalid(key, value, f"an integer from {lo} to {hi}")
        return number

    return convert


def _to_float(lo: float, hi: float, lo_open: bool = False) -> Callable[[str, Any], float]:
    allowed = f"a number {'>' if lo_open else '>='} {lo:g} and <= {hi:g}"

    def convert(key: str, value: Any) -> float:
        try:
            if isinstance(value, bool):
                raise ValueError
            number = float(str(value).strip())
        except ValueError:
            raise _invalid(key, value, allowed) from None
        if number != number or number > hi or number < lo or (lo_open and number == lo):
            raise _invalid(key, value, allowed)
        return number

    return convert


def _to_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise _invalid(key, value, "true or false")


def _to_host(key: str, value: Any) -> str:
    text = str(value).strip()
    if text == "localhost":
        return text
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise _invalid(key, value, "an IP address to bind, such as 127.0.0.1 or 0.0.0.0") from None
    return text


def _to_env_name(key: str, value: Any) -> str:
    text = str(value).strip()
    if not _ENV_VAR_NAME.match(text):
        raise _invalid(key, value, "the NAME of an environment variable holding the token")
    return text


def _to_text(key: str, value: Any) -> str:
    text = str(value).strip()
    if not text:
        raise _invalid(key, value, "a non-empty string")
    return text


def _to_choice(*choices: str) -> Callable[[str, Any], str]:
    def convert(key: str, value: Any) -> str:
        text = str(value).strip().lower()
        if text not in choices:
            raise _invalid(key, value, " or ".join(choices))
        return text

    return convert


def _to_batching(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value).strip().lower()
    if text in _TRUE:
        return "true"
    if text in _FALSE:
        return "false"
    return _to_choice("auto", "true", "false")(key, value)


def _to_columns(key: str, value: Any) -> str:
    from mlflow_deploy_plugin.spec import split_names

    names = split_names(str(value))
    if not names or len(set(names)) != len(names):
        raise _invalid(key, value, "comma-separated column names, each once, such as ssn,email")
    return ",".join(names)


def _to_pem_file(key: str, value: Any) -> str:
    from pathlib import Path

    path = Path(str(value).strip()).expanduser().resolve()
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise _invalid(key, value, f"a readable PEM file ({getattr(exc, 'strerror', None) or exc})") from None
    if "-----BEGIN " not in text:
        raise _invalid(key, value, "a PEM file (-----BEGIN ...)")
    return str(path)


def _check_tls(cert: str | None, key: str | None) -> None:
    """Both or neither, and a key that matches the certificate (what uvicorn will load)."""
    if bool(cert) != bool(key):
        raise InvalidRequest("Invalid deployment config: tls_cert and tls_key go together: set both (PEM "
                             "certificate chain and its private key) or neither.")
    if cert and key:
        import ssl

        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
        except (ssl.SSLError, OSError) as exc:
            raise InvalidRequest(f"Invalid deployment config: tls_cert={cert!r} and tls_key={key!r} could not "
                                 f"be loaded together ({exc}). Allowed: a PEM certificate and its unencrypted "
                                 "private key.") from None


def _to_policy_path(key: str, value: Any) -> str:
    from pathlib import Path

    from mlflow_deploy_plugin.lifecycle.policy import PolicyError, load_policy

    path = Path(str(value).strip()).expanduser().resolve()
    try:
        load_policy(path)
    except PolicyError as exc:
        raise _invalid(key, value, f"a valid policy file ({exc})") from None
    except OSError as exc:
        raise _invalid(key, value, f"a readable policy YAML file ({exc.strerror})") from None
    return str(path)


def _to_drift_floors(key: str, value: Any) -> str:
    from mlflow_deploy_plugin.monitoring.drift_methods import parse_floors

    text = str(value).strip()
    try:
        parse_floors(text)
    except ValueError as exc:
        raise _invalid(key, value, f"one floor for both kinds, e.g. 0.1, or 'numeric=0.1,categorical=0.1,"
                                   f"missing=0.05' ({exc})") from None
    return text


def _to_duration(key: str, value: Any) -> str:
    from mlflow_deploy_plugin.spec import duration_s

    text = str(value).strip().lower()
    try:
        seconds = duration_s(text)
    except ValueError:
        seconds = 0.0
    if seconds <= 0:
        raise _invalid(key, value, "a positive duration such as 30m, 24h or 7d")
    return text


def _to_model_uri(key: str, value: Any) -> str:
    text = str(value).strip()
    if not text.startswith("models:/") or len(text) <= len("models:/"):
        raise _invalid(key, value, "a registry model URI such as models:/churn/5 or models:/churn@challenger")
    return text


def _to_notify_urls(key: str, value: Any) -> str:
    from mlflow_deploy_plugin.lifecycle.notify import parse_targets

    try:
        targets = parse_targets(str(value))
    except ValueError as exc:
        raise _invalid(key, "…", f"comma-separated http(s) URLs, optionally slack+https://... ({exc})") from None
    if not targets:
        raise _invalid(key, value, "comma-separated http(s) URLs")
    return ",".join(f"slack+{t.url}" if t.format == "slack" else t.url for t in targets)


def _to_notify_events(key: str, value: Any) -> str:
    from mlflow_deploy_plugin.lifecycle.notify import parse_event_filter

    text = str(value).strip()
    try:
        parse_event_filter(text)
    except ValueError as exc:
        raise _invalid(key, value, f"event names, kinds or patterns, comma-separated ({exc})") from None
    return text


def _to_cron(key: str, value: Any) -> str:
    text = str(value).strip()
    from croniter import croniter

    if not croniter.is_valid(text):
        raise _invalid(key, value, 'a cron expression such as "*/30 * * * *"')
    return text


@dataclass(frozen=True)
class _Key:
    name: str
    type_name: str
    default: Any
    help: str
    convert: Callable[[str, Any], Any]


# One table drives parsing, defaults and `mlflow deployments help -t lifecycle`.
CONFIG_KEYS: tuple[_Key, ...] = (
    _Key("port", "int", None, "Port to listen on (default: a free port chosen at create).",
         _to_int(1, 65535)),
    _Key("host", "str", "127.0.0.1",
         "Address to bind. A non-loopback address requires auth_token_env, and should serve TLS "
         "(tls_cert, tls_key) so the token never travels in clear.", _to_host),
    _Key("workers", "int", 1, "Server worker processes sharing the port.", _to_int(1, 32)),
    _Key("timeout_s", "float", 60.0, "Per-request prediction timeout in seconds (504 after).",
         _to_float(0, 3600, lo_open=True)),
    _Key("max_body_mb", "float", 32.0, "Largest request body accepted, in MiB (413 above).",
         _to_float(0, 4096, lo_open=True)),
    _Key("auth_token_env", "str", None,
         "Name of an environment variable holding a bearer token required on the API "
         "(/ping and /health stay open).", _to_env_name),
    _Key("max_batch_rows", "int", 4096,
         "Concurrent requests are coalesced into one predict call up to this many rows "
         "(1 disables batching).", _to_int(1, 1_000_000)),
    _Key("batching", "str", "auto",
         "Coalesce concurrent requests into one predict call: auto (on for row-wise flavors: sklearn, "
         "xgboost, lightgbm, catboost, h2o, spark; off for custom python_function models), true or "
         "false. Only for models whose answer for a row does not depend on the other rows.", _to_batching),
    _Key("max_rows", "int", 100_000,
         "Most rows one request may decode to (413 above); checked before decoding (Parquet metadata, "
         "JSON structure, CSV rows).", _to_int(1, 1_000_000_000)),
    _Key("max_cells", "int", 10_000_000,
         "Most cells (rows x columns; JSON values) one request may decode to (413 above).",
         _to_int(1, 10_000_000_000)),
    _Key("max_queue", "int", 256,
         "Requests that may wait for the model, per worker (per replica on Ray) and per served version; "
         "when full, requests get 503 with Retry-After at once (load shedding). Each version also has "
         "the batch it took from its queue in predict, so a local deployment holds at most workers x "
         "versions served (2 during a canary) x 2 x max_queue requests (an update adds the new workers' "
         "until the old ones drain; on Ray, Serve hands a replica max_ongoing_requests at most).",
         _to_int(1, 1_000_000)),
    _Key("startup_timeout_s", "float", 180.0,
         "How long create/update wait for the model to load and answer /health.",
         _to_float(1, 3600)),
    _Key("max_restarts", "int", 5,
         "Crashes in a row (without 60 s of healthy uptime between) before the deployment is "
         "marked failed.", _to_int(0, 1000)),
    _Key("warm_standby", "bool", True,
         "Keep one spare worker process with imports done, so updates and crash restarts take "
         "about a model load instead of a cold start (costs one idle process).", _to_bool),
    _Key("poll_interval_s", "float", 10.0,
         "How often a deployment of an alias, stage or latest URI re-resolves it and follows the "
         "registry (webhooks via `mlflow-deploy watch` make it immediate).", _to_float(0.2, 86400)),
    _Key("policy", "str", None,
         "Path of a lifecycle policy YAML (promotion gates, canary, drift actions) for the served "
         "model.", _to_policy_path),
    _Key("capture", "bool", True, "Record requests and predictions to Parquet.", _to_bool),
    _Key("capture_sample_rate", "float", 1.0, "Fraction of requests captured.",
         _to_float(0, 1, lo_open=True)),
    _Key("capture_retention_days", "int", None, "Delete captured partitions older than N days.",
         _to_int(1, 36500)),
    _Key("capture_uri", "str", None,
         "Where captured rows go (folder or pyarrow filesystem URI); default: the deployment's "
         "folder under $MLFLOW_DEPLOY_HOME.", _to_text),
    _Key("capture_buffer_mb", "float", 64.0,
         "Captured requests a worker may have waiting to be written (spooled, not yet Parquet), in "
         "MiB; requests beyond it are dropped from capture (counted), never delayed.", _to_float(0, 65536, lo_open=True)),
    _Key("capture_exclude", "str", None,
         "Comma-separated input columns never written to captured data, e.g. ssn,email.", _to_columns),
    _Key("capture_hash", "str", None,
         "Comma-separated input columns captured as a keyed hash (the key is a secret in the "
         "deployment's folder): drift on them still works as on categories.", _to_columns),
    _Key("tls_cert", "str", None,
         "PEM certificate (chain) to serve HTTPS with; needs tls_key. Use it whenever host is not "
         "loopback and a token is sent.", _to_pem_file),
    _Key("tls_key", "str", None, "PEM private key of tls_cert.", _to_pem_file),
    _Key("reference_data", "str", None,
         "Parquet/CSV path or URI of the drift reference data (default: the training dataset "
         "logged on the model version's run).", _to_text),
    _Key("drift_min_rows", "int", 200, "Fewer captured rows than this -> drift.status="
         "insufficient_data.", _to_int(1, 100_000_000)),
    _Key("drift_methods", "str", None,
         "Per-column drift tests and floors, e.g. 'age=ks:0.01+wasserstein:0.2,city=psi:0.2+missing:0.1', "
         "or a YAML/JSON file path.", _to_text),
    _Key("drift_effect_floor", "str", None,
         "Smallest effect that counts as drift (default 0.1: Wasserstein/std for numeric, Jensen-Shannon "
         "for categorical columns; missing-rate change 0.05): '0.2' or "
         "'numeric=0.2,categorical=0.15,missing=0.1'; 0 lets the test alone decide.", _to_drift_floors),
    _Key("drift_schedule", "str", None, 'Cron expression for automatic drift reports, e.g. '
         '"*/30 * * * *".', _to_cron),
    _Key("drift_max_window", "str", "24h",
         "Longest window a scheduled report covers: after downtime the catch-up run covers at most "
         "this much (the gap before it is recorded as skipped). 30m, 24h, 7d.", _to_duration),
    _Key("drift_experiment", "str", None,
         "MLflow experiment for drift report runs (default: drift/<deployment>).", _to_text),
    _Key("task", "str", None,
         "classification or regression: how labels are checked and quality is measured (default: read "
         "from the model's signature, else from the captured predictions).",
         _to_choice("classification", "regression")),
    _Key("label_horizon", "str", "30d",
         "How far back labels may reach: a label joins a prediction made at most this long ago, and "
         "quality reports re-run the windows it lands in.", _to_duration),
    _Key("quality_min_labelled_rows", "int", 100,
         "Fewer labelled rows of a version in a window than this -> quality.status=not_enough_labels "
         "(no figures, no decision).", _to_int(1, 100_000_000)),
    _Key("shadow", "str", None,
         "Registry URI of a shadow version (models:/churn/5, models:/churn@challenger; resolved to a "
         "version like the model): a copy of the requests goes to it after the answer is sent, its answers "
         "are captured (role shadow) and never returned. Needs capture. `mlflow-deploy shadow report` "
         "compares the pairs; set it to none to stop.", _to_model_uri),
    _Key("shadow_sample_rate", "float", 1.0,
         "Fraction of captured requests mirrored to the shadow version (under pressure more are dropped, "
         "counted in mlflow_deploy_shadow_dropped_requests_total).", _to_float(0, 1, lo_open=True)),
    _Key("notify", "str", None,
         "Comma-separated http(s) URLs that receive every lifecycle event as a signed JSON POST (MLflow's "
         "webhook signature); prefix a URL with slack+ (slack+https://hooks.slack.com/...) for Slack's "
         "{\"text\"} shape. Retried with backoff, never blocking serving; `mlflow-deploy notifications NAME` "
         "lists the deliveries.", _to_notify_urls),
    _Key("notify_format", "str", "json", "Shape of every notify URL without a prefix: json or slack.",
         _to_choice("json", "slack")),
    _Key("notify_events", "str", "all",
         "Which history events are sent: comma-separated names, shell patterns (drift_*) or kinds (deploy, "
         "lifecycle, verdicts, faults, healed); a leading ! excludes, e.g. 'all,!drift_window_skipped'.",
         _to_notify_events),
    _Key("notify_secret_env", "str", None,
         "Name of an environment variable holding the secret notifications are signed with (read in the "
         "deployment's environment; default: a random secret kept in the deployment's notify.key, 0600).",
         _to_env_name),
    # Ray Serve engine (lifecycle:/ray): the other engines refuse these (Engine.check_config).
    _Key("ray_address", "str", None,
         "[ray] Address of the Ray cluster (host:port of its GCS), default $RAY_ADDRESS, else the "
         "cluster `ray start --head` started on this machine.", _to_text),
    _Key("num_replicas", "int", None, "[ray] Fixed number of Serve replicas (default 1).",
         _to_int(1, 1000)),
    _Key("min_replicas", "int", None,
         "[ray] Autoscaling lower bound (setting min/max_replicas turns Serve's autoscaling on).",
         _to_int(0, 1000)),
    _Key("max_replicas", "int", None, "[ray] Autoscaling upper bound.", _to_int(1, 1000)),
    _Key("target_ongoing_requests", "float", None,
         "[ray] Autoscaling target of in-flight requests per replica (Serve's default 2).",
         _to_float(0, 100000, lo_open=True)),
    _Key("max_ongoing_requests", "int", None,
         "[ray] Requests Serve hands one replica at a time (default 2 x max_queue: a full queue plus a "
         "batch of it in predict, so the replica's batcher sees the backlog and sheds what is beyond it "
         "with 503; Serve's own default of 5 keeps the rest waiting at its router).",
         _to_int(1, 1_000_000)),
    _Key("num_cpus", "float", None,
         "[ray] CPUs reserved per replica (Serve's default 1). An update starts the new replicas "
         "beside the old ones, so the cluster needs room for twice the replicas meanwhile.",
         _to_float(0, 1024)),
)
_KEYS_BY_NAME = {key.name: key for key in CONFIG_KEYS}


_FIELD_NAMES = {f.name for f in fields(DeploymentConfig)}
assert set(_KEYS_BY_NAME) == _FIELD_NAMES, "CONFIG_KEYS and DeploymentConfig disagree"
assert all(getattr(DeploymentConfig(), key.name) == key.default for key in CONFIG_KEYS), \
    "CONFIG_KEYS and DeploymentConfig disagree on a default"


def parse_config(
    raw: Mapping[str, Any] | None, base: DeploymentConfig | None = None
) -> DeploymentConfig:
    """Validate raw `-C` values (strings or typed) and return a :class:`DeploymentConfig`.

    Unknown keys and bad values raise :class:`InvalidRequest` naming the key, the value and what
    is allowed.
    """
    values = (base or DeploymentConfig()).to_dict()
    for key, value in (raw or {}).items():
        spec = _KEYS_BY_NAME.get(key)
        if spec is None:
            raise InvalidRequest(
                f"Unknown deployment config key {key!r}. Known keys: "
                f"{', '.join(sorted(_KEYS_BY_NAME))}. See `mlflow deployments help -t lifecycle`.")
        if value is None or (isinstance(value, str) and value.strip().lower() in {"", "none"}):
            values[key] = None if spec.default is None else spec.default
            continue
        values[key] = spec.convert(key, value)
    config = DeploymentConfig(**values)
    overlap = set(config.capture_exclude_columns) & set(config.capture_hash_columns)
    if overlap:
        raise InvalidRequest(f"Invalid deployment config: {', '.join(sorted(overlap))} is in both capture_exclude "
                             "and capture_hash; a column is either left out of capture or hashed.")
    _check_tls(config.tls_cert, config.tls_key)
    if config.shadow and not config.capture:
        raise InvalidRequest("Invalid deployment config: shadow needs capture=true: a shadow's answers are only "
                             "captured (never returned), so without capture they would go nowhere.")
    if not config.is_loopback and not config.auth_token_env:
        raise InvalidRequest(
            f"Refusing to bind host={config.host} without authentication: a non-loopback address "
            "exposes the model to the network. Set -C auth_token_env=<ENV VAR holding a token>, "
            "or bind 127.0.0.1.")
    return config


def config_help() -> str:
    """A table of every `-C` key with its type, default and meaning."""
    lines = []
    for key in CONFIG_KEYS:
        default = "(none)" if key.default is None else str(key.default).lower() if isinstance(
            key.default, bool) else key.default
        lines.append(f"  {key.name:<24} {key.type_name:<6} default {default}\n      {key.help}")
    return "\n".join(lines)

"""Typed settings, built once from defaults < TOML file < environment < command line.

Every field can be set in the TOML file under its own name, and in the environment as
``GATEWAY_<NAME>`` (upper case), e.g. ``upstream_url`` / ``GATEWAY_UPSTREAM_URL``.

>>> s = Settings.load(env={"GATEWAY_DB": "x.db"})
>>> s.db
'x.db'
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ConfigError", "Settings"]

DEFAULT_DB = "gateway.db"
DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024
ENV_PREFIX = "GATEWAY_"
# The words a boolean setting may be written as (any other is an error, never a silent false).
_BOOLS = {
    **dict.fromkeys(("1", "true", "yes", "on"), True),
    **dict.fromkeys(("0", "false", "no", "off"), False),
}
REGISTRY_TABLES = ("tokenizers", "models")


class ConfigError(Exception):
    """A setting is missing, unknown or malformed; the message says which."""


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    # Base URL of the backend's OpenAI-compatible API, e.g. https://api.deepinfra.com/v1/openai.
    # Client paths below /v1/openai or /v1 are appended to it. None: the bundled emulator.
    upstream_url: str | None = None
    # The operator's own credential for the backend; replaces the customer's key upstream.
    upstream_api_key: str | None = field(default=None, repr=False)
    # The ledger: a SQLite file (one gateway process), or a postgresql:// URL that several
    # replicas share.
    db: str = DEFAULT_DB
    # Quota and rate counters shared by replicas (redis://host:port/db). Unset: in this process.
    redis_url: str | None = None
    # When Redis cannot be reached: false refuses with 503 (fail-closed); true serves the request
    # unchecked, counted in gateway_quota_store_errors_total and logged (fail-open).
    quota_fail_open: bool = False
    # Prefix of every Redis key the gateway writes (several gateways can share one Redis).
    redis_prefix: str = "gw:"
    # Connections of redis-py's pool per process (heartbeats; every quota call with rediss://):
    # calls beyond it wait for a free one. Quota scripts otherwise share one pipelined connection.
    redis_max_connections: int = 64
    # Replicas: how long one may stay silent (killed, cut off) before another bills its pending
    # ledger rows as estimates and releases its quota reservations. Heartbeats go every third.
    replica_timeout: float = 30.0
    # Reserved for the admin API; the admin API is off while it is unset.
    admin_token: str | None = field(default=None, repr=False)
    # Server secret for the keyed hash of API keys. Unset: kept in a file beside the database.
    key_secret: str | None = field(default=None, repr=False)
    connect_timeout: float = 5.0
    # LLM answers are slow: a long read timeout, but never an unbounded one.
    read_timeout: float = 600.0
    # How long the backend may take none of a request body still being sent (its buffers full).
    write_timeout: float = 60.0
    pool_timeout: float = 30.0
    max_connections: int = 512
    max_keepalive_connections: int = 128
    # The connection pool under the upstream client: "http1" (the gateway's own HTTP/1.1 client,
    # the default; https backends go to aiohttp's pool), "aiohttp", or "httpx" (httpcore's pool).
    upstream_transport: str = "http1"
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # `gateway serve`'s garbage collector (gateway.gc_policy): the first generation's threshold
    # (Python's own is 700; 0 keeps Python's thresholds), and whether the heap is frozen out of
    # collections once the application has started.
    gc_threshold: int = 7000
    gc_freeze: bool = True
    # Latency the embedded demo emulator adds per answer (only used without upstream_url).
    emulator_latency: float = 0.0
    log_level: str = "info"
    # Per-customer metric series (opt-in): this many keys, the first by name, get their own
    # `key` label on gateway_key_tokens_total; every other key is "other". 0: none.
    metrics_per_key: int = 0
    # Addresses of reverse proxies whose X-Forwarded-For/-Proto the server may believe
    # (comma-separated). Empty: forwarding headers from clients are never trusted.
    trusted_proxies: str = ""
    # Whether the backend's usage.prompt_tokens already include the injected tools (vLLM and
    # DeepInfra: yes). If not, the gateway adds its own tool count; never both.
    backend_counts_tools: bool = True
    # A registry model whose tokenizer counts models the registry does not know (as estimates).
    # Unset: count_tokens refuses unknown models, and their proxied tool tokens stay unknown.
    fallback_model: str | None = None
    # Models whose tokenizers load before the gateway listens (comma-separated, as clients name
    # them; "*": every registered model), not on each model's first request. Each tokenizer
    # costs memory (all of the shipped ones: about 175 MB).
    preload_models: str = ""
    # The backend refuses `stream: true` with tools (the seed's backend does): the gateway asks it
    # without streaming and streams the answer back in OpenAI's chunk format. Off: pass through.
    emulate_tool_streams: bool = True
    # The backend's documented limits, enforced before forwarding (a clear 400 instead of the
    # backend's): the tool_choice values it accepts (comma-separated; empty: any), how many tools
    # a request may carry, how deep a tool's parameter schema may nest.
    tool_choices: str = "auto,none"
    max_tools: int = 128
    max_schema_depth: int = 32
    # Output tokens reserved (and sent upstream as max_tokens) for a key with token or spend
    # budgets when the client sets no max_tokens: without a cap a budget could be overshot.
    default_max_tokens: int = 1024
    # The operator's currency; prices and spend limits are integer micro-units of it.
    currency: str = "USD"
    config_file: str | None = None
    # The operator's model registry tables ([tokenizers.*], [[models]]) from the config file.
    registry: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def load(
        cls,
        *,
        config_file: str | None = None,
        env: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> Settings:
        """Build settings: defaults, then the TOML file, then the environment, then overrides."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        config_file = config_file or env.get(ENV_PREFIX + "CONFIG")
        if config_file:
            data = _read_toml(config_file)
            registry = {k: data.pop(k) for k in REGISTRY_TABLES if k in data}
            values.update(data)
            values["config_file"] = config_file
            if registry:
                values["registry"] = registry
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for name in fields.keys() - {"registry", "config_file"}:
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is not None and raw != "":
                values[name] = raw
        for name, value in (overrides or {}).items():
            if value is not None:
                values[name] = value
        return cls(
            **{
                name: value if name == "registry" else _coerce(name, fields[name].type, value)
                for name, value in values.items()
            }
        )

    @property
    def key_secret_file(self) -> Path:
        return Path(self.db + ".secret")


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    known = ({f.name for f in dataclasses.fields(Settings)} - {"config_file", "registry"}) | set(
        REGISTRY_TABLES
    )
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown setting(s) in {path}: {', '.join(unknown)}")
    return data


def _coerce(name: str, annotation: Any, value: Any) -> Any:
    kind = str(annotation)
    try:
        if kind.startswith("int"):
            return int(value)
        if kind.startswith("float"):
            return float(value)
        if kind.startswith("bool"):
            if isinstance(value, str):
                word = value.strip().lower()
                if word not in _BOOLS:
                    raise ValueError(word)  # a typo must not read as false
                return _BOOLS[word]
            return bool(value)
    except (TypeError, ValueError):
        raise ConfigError(f"setting {name!r}: {value!r} is not a valid {kind.split()[0]}") from None
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"setting {name!r}: expected a string, got {value!r}")
    return value

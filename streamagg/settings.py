"""The one Settings object (CONTRACT section 1): the only reader of the environment.

Values come from ``STREAMAGG_*`` variables; a CLI flag of the same name overrides them (the
CLI passes its flags as keyword arguments). Unknown ``STREAMAGG_*`` variables and malformed
values fail at start with a message naming the variable. The DSN is a ``SecretStr`` and only
:meth:`Settings.redacted_dsn` is ever logged.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from sketches import Kind, SketchKindError

from .catalogue import METRICS, METRICS_BY_NAME
from .errors import ConfigError

ENV_PREFIX = "STREAMAGG_"


def _default_stack_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"streamagg-stack-{os.getuid()}"


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "streamagg"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid", case_sensitive=False)

    kafka_bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers, comma separated")
    database_url: SecretStr = Field(
        SecretStr("postgresql://postgres@127.0.0.1:5432/streamagg"), description="PostgreSQL DSN (asyncpg)"
    )
    topic_prefix: str = Field("telemetry.", description="prefix of every topic")
    app_id: str = Field("streamagg", min_length=1, description="Faust app id = consumer group")
    partitions: int = Field(8, ge=1, le=1024, description="partitions of the source topics when the worker creates them")
    grace_seconds: int = Field(300, ge=0, description="an hour closes once the watermark passes hour end + grace")
    max_lateness_seconds: int = Field(172800, ge=0, description="how long a closed hour still accepts late events")
    flush_interval_seconds: float = Field(10.0, gt=0, description="how often dirty closed buckets are written")
    checkpoint_interval_seconds: float = Field(
        10.0, gt=0, description="how often changed aggregates are checkpointed to the table and offsets committed"
    )
    rollup_interval_seconds: float | None = Field(
        None, gt=0, description="how often the days and weeks of flushed hours are rolled up while no backlog "
        "is worked off (while one is: every 12 intervals); default 5 x the flush interval, at least 5 s",
    )
    metrics_host: str = Field("127.0.0.1", description="Prometheus /metrics host")
    metrics_port: int = Field(9108, ge=0, le=65535, description="Prometheus /metrics port")
    max_series_per_dimension: int = Field(
        10000, ge=1, description="distinct values per (hour, metric, dimension type) before __overflow__"
    )
    sketch_kind: str = Field("req-hra-k128", description="default quantile sketch kind of full metrics")
    sketch_kinds: dict[str, str] = Field(
        default_factory=dict, description='per-metric sketch kinds, JSON, e.g. {"trace.tokens": "kll-k200"}'
    )
    session_timeout_seconds: float = Field(
        30.0, ge=6, le=1800, description="Kafka group session timeout: how soon a dead worker's partitions move"
    )
    stack_dir: Path = Field(default_factory=_default_stack_dir, description="state of `streamagg stack` (throwaway)")
    cache_dir: Path = Field(default_factory=_default_cache_dir, description="cache of the Kafka jars from Maven Central")

    @field_validator("kafka_bootstrap")
    @classmethod
    def _bootstrap(cls, value: str) -> str:
        for server in value.split(","):
            host, sep, port = server.strip().rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"{server!r} is not host:port")
            if not 0 < int(port) <= 65535:
                raise ValueError(f"{server!r}: the port must be a number from 1 to 65535")
        return value

    @field_validator("topic_prefix", "app_id")
    @classmethod
    def _topic_name_part(cls, value: str) -> str:
        """Both go into topic names (the app id into its changelog's), which Kafka limits to 249
        characters of ASCII letters, digits, '.', '_' and '-'."""
        if not re.fullmatch(r"[A-Za-z0-9._-]*", value):
            raise ValueError(f"{value!r} may hold only ASCII letters, digits, '.', '_' and '-' (it names topics)")
        if len(value) > 200:
            raise ValueError("longer than 200 characters: the topic names it makes would pass Kafka's 249")
        return value

    @field_validator("database_url")
    @classmethod
    def _dsn(cls, value: SecretStr) -> SecretStr:
        parts = urlsplit(value.get_secret_value())
        if parts.scheme not in ("postgresql", "postgres"):
            raise ValueError("must be a postgresql:// URL")
        try:  # each host of the list asyncpg takes (host1:port1,host2:port2)
            for host in parts.netloc.rpartition("@")[2].split(","):
                urlsplit(f"//{host}").port  # noqa: B018  (parsed on access)
        except ValueError:
            raise ValueError("the port must be a number from 0 to 65535") from None
        return value

    @field_validator("sketch_kinds", mode="before")
    @classmethod
    def _kinds_text(cls, value: object) -> object:
        """The flag gives the JSON text itself (the variable's is decoded before this)."""
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError:
                raise ValueError("not valid JSON") from None
        return value

    @field_validator("sketch_kind")
    @classmethod
    def _kind(cls, value: str) -> str:
        try:
            return str(Kind.parse(value))
        except SketchKindError as exc:
            raise ValueError(str(exc)) from exc

    @field_validator("sketch_kinds")
    @classmethod
    def _kinds(cls, value: dict[str, str]) -> dict[str, str]:
        for metric, kind in value.items():
            if metric not in METRICS_BY_NAME or not METRICS_BY_NAME[metric].is_full:
                raise ValueError(f"{metric!r} is not a full metric of the catalogue")
            try:
                Kind.parse(kind)
            except SketchKindError as exc:
                raise ValueError(str(exc)) from exc
        return value

    # -- derived ----------------------------------------------------------------------------
    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    def metric_sketch_kinds(self) -> dict[str, Kind]:
        """The sketch kind of every full metric: its override, or the default."""
        return {m.name: Kind.parse(self.sketch_kinds.get(m.name, self.sketch_kind)) for m in METRICS if m.is_full}

    def redacted_dsn(self) -> str:
        return redact_dsn(self.database_url.get_secret_value())


def redact_dsn(dsn: str) -> str:
    """The DSN with its password, given before the host or as a ``password`` parameter, replaced
    by ``***`` (safe for logs and error messages)."""
    parts = urlsplit(dsn)
    if parts.password is not None:
        parts = parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1))
    query = _PASSWORD_PARAMETER.sub(r"\1***", parts.query)
    if parts.password is None and query == parts.query:
        return dsn
    return urlunsplit(parts._replace(query=query))


_PASSWORD_PARAMETER = re.compile(r"((?:^|&)password=)[^&]*", re.IGNORECASE)


def without_password(text: str, dsn: str) -> str:
    """``text`` (a client library's message about ``dsn``) with the DSN's password, as written
    and as decoded, replaced by ``***`` wherever it appears."""
    parts = urlsplit(dsn)
    given = [parts.password or "", *(value for name, value in parse_qsl(parts.query) if name.lower() == "password")]
    for secret in sorted({form for value in given if value for form in (value, unquote(value))}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def load_settings(overrides: Mapping[str, Any] | None = None) -> Settings:
    """Build Settings from the environment plus explicit overrides; a clear ConfigError otherwise."""
    known = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
    unknown = sorted(name for name in os.environ if name.upper().startswith(ENV_PREFIX) and name.upper() not in known)
    if unknown:
        raise ConfigError(f"unknown setting {unknown[0]}; known settings: {', '.join(sorted(known))}")
    given = {key: value for key, value in (overrides or {}).items() if value is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "?"
        # Not chained: pydantic's own message quotes the input, which may hold the DSN's password.
        raise ConfigError(f"{ENV_PREFIX}{field.upper()}: {first['msg']}") from None
    except SettingsError as exc:  # a variable of a structured setting that is not JSON
        named = re.search(r'field "(\w+)"', str(exc))
        field = named.group(1).upper() if named else "?"
        raise ConfigError(f"{ENV_PREFIX}{field}: not valid JSON") from None

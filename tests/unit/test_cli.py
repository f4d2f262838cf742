"""The command line's own parsing of times and settings (CONTRACT sections 1 and 5), without services."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry

from streamagg.buckets import rfc3339
from streamagg.cli import TIME, main
from streamagg.errors import ConfigError
from streamagg.settings import load_settings, redact_dsn, without_password
from streamagg.telemetry import serve


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-26", "2026-11-26T00:00:00Z"),  # a date: midnight UTC
        ("2026-11-26T13:00:00Z", "2026-11-26T13:00:00Z"),
        ("2026-11-26T15:00:00+02:00", "2026-11-26T13:00:00Z"),
        ("2026-11-26 13:00:00", "2026-11-26T13:00:00Z"),  # no offset: UTC
    ],
)
def test_a_time_is_rfc_3339_or_a_date(text: str, expected: str) -> None:
    assert rfc3339(TIME.convert(text, None, None)) == expected


@pytest.mark.parametrize("text", ["2026-1-26", "20261126", "2026-W48-5", "2026-11-26T13:00", "tomorrow", "2026-13-26"])
def test_other_times_are_refused_with_a_one_line_reason(text: str) -> None:
    """Quoting the text as given (a bad date was quoted with the time it was read as)."""
    with pytest.raises(click.BadParameter, match=f"^'{text}' is not an RFC 3339 time or a date$"):
        TIME.convert(text, None, None)


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [
        ("postgresql://app:s3cret@db:5432/metrics", "postgresql://app:***@db:5432/metrics"),
        ("postgresql://app@db/metrics?password=s3cret&sslmode=require", "postgresql://app@db/metrics?password=***&sslmode=require"),
        ("postgresql://app@db/metrics?sslmode=require&PASSWORD=s3cret", "postgresql://app@db/metrics?sslmode=require&PASSWORD=***"),
        ("postgresql://db/metrics", "postgresql://db/metrics"),
    ],
)
def test_the_dsn_password_is_never_shown(dsn: str, shown: str) -> None:
    """CONTRACT section 1; a password given as a parameter was shown in a connection error."""
    assert redact_dsn(dsn) == shown


def test_a_client_message_loses_the_dsn_password_as_written_and_as_decoded() -> None:
    dsn = "postgresql://app:s3%2Fcret@db/metrics?password=other&sslmode=bogus"
    said = "bad DSN postgresql://app:s3%2Fcret@db, password s3/cret or other; sslmode bogus"
    assert without_password(said, dsn) == "bad DSN postgresql://app:***@db, password *** or ***; sslmode bogus"
    assert without_password("nothing secret", "postgresql://db/metrics") == "nothing secret"


def test_malformed_settings_are_one_line_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    """They were tracebacks: a DSN port that is not a number, a structured variable that is not JSON."""
    with pytest.raises(ConfigError, match="^STREAMAGG_DATABASE_URL: .*port must be a number") as info:
        load_settings({"database_url": "postgresql://app:s3cret@db:notaport/metrics"})
    assert "s3cret" not in str(info.value)
    monkeypatch.setenv("STREAMAGG_SKETCH_KINDS", "notjson")
    with pytest.raises(ConfigError, match="^STREAMAGG_SKETCH_KINDS: not valid JSON$"):
        load_settings()
    monkeypatch.delenv("STREAMAGG_SKETCH_KINDS")
    with pytest.raises(ConfigError, match="^STREAMAGG_SKETCH_KINDS: .*not valid JSON$"):
        load_settings({"sketch_kinds": "notjson"})  # the flag
    with pytest.raises(ConfigError, match="^STREAMAGG_DATABASE_URL: .*port must be a number"):
        load_settings({"database_url": "postgresql://app@db1:5432,db2:notaport/metrics"})
    # Accepted before, failing only later: a port past 65535, topic names Kafka refuses.
    with pytest.raises(ConfigError, match="^STREAMAGG_KAFKA_BOOTSTRAP: .*'h:99999': the port must be a number from 1"):
        load_settings({"kafka_bootstrap": "k:9092,h:99999"})
    for name, value in (("topic_prefix", "bad prefix/"), ("app_id", "a:b"), ("topic_prefix", "x" * 201)):
        with pytest.raises(ConfigError, match=f"^STREAMAGG_{name.upper()}: .*(only ASCII letters|200 characters)"):
            load_settings({name: value})
    assert load_settings({"topic_prefix": "", "app_id": "Team_A-1.v2"}).topic("traces") == "traces"


def test_the_flags_of_structured_and_multi_host_settings_read_as_their_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every setting is a flag too: --sketch-kinds gives the JSON text (it was refused as not a
    dictionary), and a DSN may list hosts as asyncpg does (refused as a bad port)."""
    monkeypatch.delenv("STREAMAGG_SKETCH_KINDS", raising=False)
    settings = load_settings({"sketch_kinds": '{"trace.tokens": "kll-k200"}'})
    assert settings.sketch_kinds == {"trace.tokens": "kll-k200"}
    dsn = "postgresql://app:s3cret@db1:5432,[::1]:5433/metrics"
    assert load_settings({"database_url": dsn}).database_url.get_secret_value() == dsn


def test_a_metrics_port_in_use_is_a_one_line_error() -> None:
    registry = CollectorRegistry()
    server, _ = serve(registry, "127.0.0.1", 0)
    try:
        with pytest.raises(ConfigError, match=f"cannot serve /metrics on 127.0.0.1:{server.server_port}: "):
            serve(registry, "127.0.0.1", server.server_port)
    finally:
        server.shutdown()


def test_progress_off_a_terminal_is_a_line_every_few_seconds_and_at_each_milestone(capsys: pytest.CaptureFixture[str]) -> None:
    from streamagg.cli import _ProgressDisplay

    with _ProgressDisplay("generate") as progress:
        for done in range(0, 300_001, 5_000):  # within the first 5 s: the first line and the last
            progress.show("producing", done, 300_000, f"{done:,} of 300,000 events", (done == 300_000,))
    assert capsys.readouterr().err.splitlines() == [
        "generate producing: 0 of 300,000 events",
        "generate producing: 300,000 of 300,000 events",
    ]



@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["query", "--from", "2026-11-26"], "Error: Missing option '--metric'; see 'streamagg query --help'"),
        (["bogus"], "Error: No such command 'bogus'; see 'streamagg --help'"),
        (["query", "--metric"], "Error: Option '--metric' requires an argument; see 'streamagg query --help'"),
        (
            ["query", "--metrc"],
            "Error: No such option: --metrc (Possible options: --metric, --metrics-host, --metrics-port); "
            "see 'streamagg query --help'",
        ),
        (["--nope"], "Error: No such option: --nope; see 'streamagg --help'"),
        (["stack", "nope"], "Error: No such command 'nope'; see 'streamagg stack --help'"),
        (
            ["query", "--metric", "trace.count", "--from", "2026-11-26", "--to", "2026-11-27", "--granularity", "month"],
            "Error: Invalid value for '--granularity': 'month' is not one of 'hour', 'day', 'week', 'total'; "
            "see 'streamagg query --help'",
        ),
        (
            ["stack", "up", "--kafka-port", "x"],
            "Error: Invalid value for '--kafka-port': 'x' is not a valid integer; see 'streamagg stack up --help'",
        ),
    ],
)
def test_usage_errors_are_one_line_with_where_the_help_is(args: list[str], said: str) -> None:
    """CONTRACT section 5: non-zero with a one-line reason. Click says a usage error in three
    lines (the usage, a hint, the error), at every level of commands."""
    result = CliRunner().invoke(main, args, prog_name="streamagg")
    assert result.exit_code == 2
    assert result.stderr == said + "\n"
    assert result.stdout == ""


def test_help_is_still_the_full_usage() -> None:
    result = CliRunner().invoke(main, ["query", "--help"], prog_name="streamagg")
    assert result.exit_code == 0
    assert result.stdout.startswith("Usage: streamagg query [OPTIONS]")
    result = CliRunner().invoke(main, ["stack"], prog_name="streamagg")  # a group without arguments: its help
    assert result.exit_code == 2
    assert result.stderr.startswith("Usage: streamagg stack [OPTIONS] COMMAND [ARGS]...") and "  up " in result.stderr

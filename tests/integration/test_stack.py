"""`streamagg stack`: a real Kafka and PostgreSQL, started, reused, checked and stopped."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncpg
import pytest

from streamagg.errors import StackError
from streamagg.settings import Settings, load_settings
from streamagg.smoke import smoke_check
from streamagg.stack import Stack, StackInfo, free_port

STREAMAGG = [sys.executable, "-m", "streamagg"]


def nothing_listens(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def processes_under(root: Path) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if str(root) in line and "ps -eo" not in line]


def test_session_stack_answers(stack_env: dict[str, str]) -> None:
    lines = list(smoke_check(load_settings()))
    assert "record round trip ok" in lines[0]
    assert "answers" in lines[1]


def test_up_is_idempotent_and_prints_only_exports(stack: tuple[Stack, StackInfo], stack_env: dict[str, str]) -> None:
    instance, info = stack
    pid_before = instance.status()["kafka"]["pid"]
    for _ in range(2):
        proc = subprocess.run([*STREAMAGG, "stack", "up"], env=stack_env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == info.exports()
        assert proc.stdout.splitlines() == [
            f"export STREAMAGG_KAFKA_BOOTSTRAP={info.kafka_bootstrap}",
            f"export STREAMAGG_DATABASE_URL={info.database_url}",
        ]
    assert instance.status()["kafka"]["pid"] == pid_before  # nothing was restarted


def test_up_makes_the_database_a_stopped_up_did_not(stack_factory) -> None:
    """An `up` interrupted after PostgreSQL started and before CREATE DATABASE: the next `up`
    finds the server running and still makes the database (it returned early, for good)."""
    instance, info = stack_factory()
    server = info.database_url.rsplit("/", 1)[0]

    async def databases(statement: str | None = None) -> list[str]:
        conn = await asyncpg.connect(f"{server}/postgres")
        try:
            if statement:
                await conn.execute(statement)
            return [r[0] for r in await conn.fetch("SELECT datname FROM pg_database")]
        finally:
            await conn.close()

    assert "streamagg" not in asyncio.run(databases('DROP DATABASE "streamagg"'))
    assert instance.up() == info
    assert "streamagg" in asyncio.run(databases())


def test_status_reports_both_running(stack_env: dict[str, str]) -> None:
    proc = subprocess.run([*STREAMAGG, "stack", "status"], env=stack_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count('"running": true') == 2


def test_lifecycle_leaves_no_process_behind(stack_factory) -> None:
    instance, info = stack_factory()
    kafka_port = int(info.kafka_bootstrap.rsplit(":", 1)[1])
    postgres_port = int(info.database_url.rsplit(":", 1)[1].split("/")[0])
    assert instance.up() == info  # second up: same addresses
    assert processes_under(instance.root)  # java and postgres run from this directory
    instance.down()
    assert processes_under(instance.root) == []
    assert nothing_listens(kafka_port) and nothing_listens(postgres_port)
    assert not instance.root.exists()
    instance.down()  # a second down is harmless


def fresh_root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="streamagg-test-stack-"))
    root.chmod(0o755)  # as root, the cluster runs as the postgres user (tests/conftest.py)
    return root


def test_two_ups_at_once_a_crashed_postgres_and_a_down_keep_what_the_stack_did_not_make() -> None:
    """Two `up`s of one directory at once share one stack (the second stopped the first one's
    starting broker); `down` after the postmaster was killed works (pg_ctl stop failed on the
    stale pid file, every time) and removes only what `up` made (the whole directory went)."""
    root = fresh_root()
    (root / "notes.txt").write_text("mine")
    cache_dir = Settings().cache_dir
    ports = (free_port(), free_port())
    try:
        with ThreadPoolExecutor(2) as pool:
            first, second = pool.map(lambda _: Stack(root, cache_dir).up(*ports), range(2))
        assert first == second
        postmaster = int((root / "postgres" / "data" / "postmaster.pid").read_text().split()[0])
        os.kill(postmaster, signal.SIGKILL)
        Stack(root, cache_dir).down()
        assert [item.name for item in root.iterdir()] == ["notes.txt"] and (root / "notes.txt").read_text() == "mine"
        deadline = time.monotonic() + 10  # the killed postmaster's backends notice and exit
        while processes_under(root) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert processes_under(root) == []
    finally:
        Stack(root, cache_dir).down()
        shutil.rmtree(root, ignore_errors=True)
        (root.parent / f".{root.name}.lock").unlink(missing_ok=True)


def test_a_taken_port_is_named_and_another_one_asked_for_is_taken_up() -> None:
    """The saved port of a stack that failed to start is not kept against a new one asked for
    (it was, until `down`); a running stack refuses to move."""
    root = fresh_root()
    kafka = free_port()
    try:
        with socket.create_server(("127.0.0.1", 0)) as taken:
            port = taken.getsockname()[1]
            with pytest.raises(StackError, match=f"cannot start postgres: 127.0.0.1:{port} is taken by another process"):
                Stack(root, Settings().cache_dir).up(kafka_port=kafka, postgres_port=port)
            other = free_port()
            info = Stack(root, Settings().cache_dir).up(postgres_port=other)
            assert info.database_url.startswith(f"postgresql://postgres@127.0.0.1:{other}/")
            assert info.kafka_bootstrap == f"127.0.0.1:{kafka}"
            with pytest.raises(StackError, match=f"runs with kafka on 127.0.0.1:{kafka} and postgres on 127.0.0.1:{other}"):
                Stack(root, Settings().cache_dir).up(postgres_port=free_port())
    finally:
        Stack(root, Settings().cache_dir).down()
        shutil.rmtree(root, ignore_errors=True)
        (root.parent / f".{root.name}.lock").unlink(missing_ok=True)


def test_a_stack_dir_that_is_a_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    env = {**os.environ, "STREAMAGG_STACK_DIR": str(tmp_path / "a-file" / "stack")}
    for command in ("up", "status"):
        proc = subprocess.run([*STREAMAGG, "stack", command], env=env, capture_output=True, text=True, timeout=60)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("Error: Not a directory: "), proc.stderr


def test_missing_prerequisite_is_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path), "STREAMAGG_STACK_DIR": str(tmp_path / "stack")}
    proc = subprocess.run([*STREAMAGG, "stack", "up"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "Error: java not found: install a JDK, e.g. `apt-get install -y openjdk-17-jdk-headless`"
    ]


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("STREAMAGG_PARTITIONS", "many", "STREAMAGG_PARTITIONS"),
        ("STREAMAGG_NO_SUCH_SETTING", "1", "unknown setting STREAMAGG_NO_SUCH_SETTING"),
        ("STREAMAGG_DATABASE_URL", "mysql://u:hunter2@h/db", "STREAMAGG_DATABASE_URL"),
    ],
)
def test_bad_settings_fail_at_start(name: str, value: str, message: str) -> None:
    env = {**os.environ, name: value}
    proc = subprocess.run([*STREAMAGG, "stack", "status"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], proc.stderr
    assert "hunter2" not in proc.stderr

"""`streamagg stack`: a real Kafka and PostgreSQL, started, reused, checked and stopped."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from streamagg.settings import load_settings
from streamagg.smoke import smoke_check
from streamagg.stack import Stack, StackInfo

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

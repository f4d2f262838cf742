"""`streamagg demo` pointed at the session's stack by its flags: SIGTERM stops it and its worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from streamagg.stack import Stack, StackInfo


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_sigterm_stops_the_demo_and_its_worker(stack: tuple[Stack, StackInfo]) -> None:
    """Its Kafka and PostgreSQL given as flags (the variables alone counted before, and the demo
    went to the local stack); SIGTERM while the worker runs ends both (the worker outlived it)."""
    _, info = stack
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMAGG_")}
    demo = subprocess.Popen(
        [sys.executable, "-m", "streamagg", "demo", "--hours", "1", "--events-per-hour", "3000",
         "--kafka-bootstrap", info.kafka_bootstrap, "--database-url", info.database_url],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (workers := children(demo.pid)) and demo.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert workers, "the demo started no worker"
        (worker,) = workers
        assert b"worker" in Path(f"/proc/{worker}/cmdline").read_bytes()
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(timeout=90) != 0
        deadline = time.monotonic() + 10
        while running(worker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not running(worker)
        assert f"using the configured Kafka {info.kafka_bootstrap}" in demo.stderr.read()  # type: ignore[union-attr]
    finally:
        if demo.poll() is None:
            demo.kill()

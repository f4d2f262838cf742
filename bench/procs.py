"""CPU seconds of the processes a bench runs against, read from /proc on this machine.

The benches run the broker and PostgreSQL on the same two cores as the worker (the local
stack), so where a run's time goes is first a question of which process used the CPU.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import threading
import time
from urllib.parse import urlsplit

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, reaped_children: bool = False) -> float | None:
    """User + system CPU of a process on this machine (None when it is not readable here); with
    ``reaped_children``, plus that of its children that have exited and been waited for."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    ticks = int(fields[11]) + int(fields[12])
    if reaped_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / _TICK


def tree_cpu_seconds(pid: int) -> float | None:
    """CPU of a server and its children, live or gone (PostgreSQL's postmaster and its backends:
    a backend that exits during a run moves its CPU into the postmaster's reaped-children time)."""
    own = cpu_seconds(pid, reaped_children=True)
    if own is None:
        return None
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as children:
            pids = [int(child) for child in children.read().split()]
    except OSError:
        return None
    return own + sum(filter(None, map(cpu_seconds, pids)))


def listener_pid(port: int) -> int | None:
    """The process on this machine listening on TCP ``port``, found through /proc; None if there
    is none here."""
    suffix = f":{port:04X}"
    sockets = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                if fields[1].endswith(suffix) and fields[3] == "0A":  # LISTEN
                    sockets.add(f"socket:[{fields[9]}]")
    for pid in filter(str.isdigit, os.listdir("/proc")) if sockets else ():
        with contextlib.suppress(OSError):
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in sockets for fd in os.listdir(f"/proc/{pid}/fd")):
                return int(pid)
    return None


def broker_port(bootstrap: str) -> int:
    """The port of the first bootstrap address."""
    return int(bootstrap.split(",")[0].rsplit(":", 1)[1])


def postgres_port(dsn: str) -> int:
    return urlsplit(dsn).port or 5432


class CpuSampler:
    """Samples the CPU seconds of named process trees every ``interval`` seconds in a thread, so
    that the CPU between any two moments of a run can be read afterwards (:meth:`between`)."""

    def __init__(self, pids: dict[str, int], interval: float = 0.1) -> None:
        self.names = list(pids)
        self._pids = pids
        self._interval = interval
        self._times: list[float] = []
        self._samples: list[list[float | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> CpuSampler:
        self._sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        """Takes the last sample (once): read :meth:`between` after this."""
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join()
            self._sample()

    def _sample(self) -> None:
        values = [tree_cpu_seconds(pid) for pid in self._pids.values()]
        self._times.append(time.monotonic())
        self._samples.append(values)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def _at(self, moment: float) -> list[float | None]:
        """The sample nearest ``moment``."""
        i = bisect.bisect_left(self._times, moment)
        if i == len(self._times) or (i > 0 and moment - self._times[i - 1] < self._times[i] - moment):
            i -= 1
        return self._samples[i]

    def between(self, start: float, end: float) -> dict[str, float | None]:
        """CPU seconds of each tree from ``start`` to ``end`` (``time.monotonic()``), to the nearest
        samples; None for a process that was not readable at either end."""
        first, last = self._at(start), self._at(end)
        return {name: None if a is None or b is None else b - a for name, a, b in zip(self.names, first, last)}

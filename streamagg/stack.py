"""A real local stack on loopback for development, the demo and the tests.

* **Apache Kafka** 4.x, single node in KRaft mode (broker and controller in one JVM). Its
  jars are resolved from Maven Central by Maven, from ``stack_files/pom.xml``, into a cache
  outside the repository, and started with the JDK: no Docker, no downloads of tarballs.
* **PostgreSQL**: a throwaway cluster made with the system's ``initdb``/``pg_ctl``, trust
  authentication, listening on 127.0.0.1 only. ``initdb`` refuses to run as root, so as root
  the cluster runs as the ``postgres`` system user (created if missing).

``up`` is idempotent (a running, answering component is left alone), waits until both answer
and returns their addresses; ``down`` stops both and waits until no process is left.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import glob
import hashlib
import json
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from .errors import PrerequisiteMissing, StackError

log = logging.getLogger(__name__)

DEFAULT_KAFKA_PORT = 9092
DEFAULT_POSTGRES_PORT = 5432
DATABASE = "streamagg"
_PG_SYSTEM_USER = "postgres"
_KAFKA_START_SECONDS = 120.0
_STOP_SECONDS = 60.0

_INSTALL_HINTS = {
    "java": "java not found: install a JDK, e.g. `apt-get install -y openjdk-17-jdk-headless`",
    "mvn": "mvn not found: install Maven, e.g. `apt-get install -y maven`",
    "initdb": "initdb not found: install the PostgreSQL server, e.g. `apt-get install -y postgresql`",
}


@dataclass(frozen=True)
class StackInfo:
    kafka_bootstrap: str
    database_url: str

    def exports(self) -> str:
        return (
            f"export STREAMAGG_KAFKA_BOOTSTRAP={self.kafka_bootstrap}\n"
            f"export STREAMAGG_DATABASE_URL={self.database_url}\n"
        )


@dataclass
class _State:
    """What ``up`` recorded in ``stack.json``; the source of truth for ``down`` and ``status``."""

    kafka_port: int
    controller_port: int
    postgres_port: int
    kafka_pid: int | None = None


def _require(program: str) -> str:
    path = shutil.which(program)
    if path is None and program in ("initdb", "pg_ctl"):
        candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{program}"), key=_pg_version)
        path = candidates[-1] if candidates else None
    if path is None:
        raise PrerequisiteMissing(_INSTALL_HINTS.get(program, f"{program} not found"))
    return path


def _pg_version(path: str) -> float:
    try:
        return float(Path(path).parts[-3])
    except (ValueError, IndexError):
        return 0.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_is_free(port: int) -> bool:
    """Nothing listens on the port. Connections a stopped server closed (TIME_WAIT) do not count,
    as neither server minds them: without SO_REUSEADDR here, `stack up` right after `stack
    down` took PostgreSQL to a random port."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _refuse_busy(port: int, server: str) -> None:
    if not _port_is_free(port):
        raise StackError(f"cannot start {server}: 127.0.0.1:{port} is taken by another process; stop it, "
                         f"or ask for another port (`streamagg stack up --{server}-port N`)")  # fmt: skip


def _answers(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1.0):
        return True
    return False


def _wait_for(what: str, ready: Callable[[], bool], deadline_seconds: float, alive: Callable[[], bool]) -> None:
    deadline = time.monotonic() + deadline_seconds
    delay = 0.05
    while time.monotonic() < deadline:
        if ready():
            return
        if not alive():
            raise StackError(f"{what} exited while starting")
        time.sleep(delay)
        delay = min(delay * 2, 1.0)
    raise StackError(f"{what} did not answer within {deadline_seconds:.0f} s")


def _pid_alive(pid: int | None, marker: str) -> bool:
    """True if ``pid`` runs and its command line contains ``marker`` (guards against reused pids)."""
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return marker.encode() in cmdline


class Stack:
    """The local stack rooted at ``stack_dir``; jars cached in ``cache_dir``."""

    def __init__(self, stack_dir: Path, cache_dir: Path) -> None:
        self.root = Path(stack_dir).resolve()  # relative, PostgreSQL's socket path broke
        self.cache_dir = Path(cache_dir)
        self.kafka_dir = self.root / "kafka"
        self.pg_dir = self.root / "postgres"
        self.pg_data = self.pg_dir / "data"
        self._state_file = self.root / "stack.json"

    # -- public ------------------------------------------------------------------------------
    def up(self, kafka_port: int | None = None, postgres_port: int | None = None) -> StackInfo:
        java = _require("java")
        initdb = _require("initdb")
        pg_ctl = _require("pg_ctl")
        try:
            self.root.mkdir(parents=True)
            self.root.chmod(0o755)  # the postgres system user must reach its data directory
        except FileExistsError:
            pass
        if os.geteuid() == 0 and not self.root.stat().st_mode & 0o001:  # a directory of someone else's: its mode stays
            raise StackError(f"{self.root} is closed to the postgres system user (mode "
                             f"{self.root.stat().st_mode & 0o777:o}); give a new directory, or open it with chmod o+x")  # fmt: skip
        with self._locked():
            state = self._load_state()
            if state is None:
                state = self._new_state(kafka_port, postgres_port)
            else:
                self._move(state, kafka_port, postgres_port)
            self._save_state(state)
            self._postgres_up(state, initdb, pg_ctl)
            self._kafka_up(state, java)
            self._save_state(state)
            return self.info(state)

    def _move(self, state: _State, kafka_port: int | None, postgres_port: int | None) -> None:
        """Ports asked of an existing stack: taken while its servers are stopped, refused while
        they run (they were ignored, and the stack came up on its saved ports)."""
        wanted = {"kafka": (kafka_port, state.kafka_port), "postgres": (postgres_port, state.postgres_port)}
        moved = {name: port for name, (port, now) in wanted.items() if port and port != now}
        if not moved:
            return
        if self._kafka_running(state) or self._postgres_running(state):
            raise StackError(f"the stack in {self.root} runs with kafka on 127.0.0.1:{state.kafka_port} and postgres "
                             f"on 127.0.0.1:{state.postgres_port}; `streamagg stack down` first to move it")  # fmt: skip
        state.kafka_port = moved.get("kafka", state.kafka_port)
        state.postgres_port = moved.get("postgres", state.postgres_port)

    def down(self) -> None:
        if not self.root.exists():
            log.info("no local stack at %s", self.root)
            return
        with self._locked():
            state = self._load_state()  # under the lock: an `up` still starting has not saved all of it
            if state is None:
                log.info("no local stack at %s", self.root)
                return
            self._kafka_down(state)
            self._postgres_down()
            # What `up` made, and nothing else: the directory may hold other files (it went whole).
            for made in (self.kafka_dir, self.pg_dir):
                shutil.rmtree(made, ignore_errors=True)
            self._state_file.unlink(missing_ok=True)
        try:
            self.root.rmdir()
            log.info("local stack at %s stopped and removed", self.root)
        except OSError:
            log.info("local stack at %s stopped and removed; the directory stays, with files it did not make", self.root)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One `up` or `down` of this stack at a time: a second `up` took the first one's broker,
        still starting, for a dead one and stopped it. The lock is a file beside the directory,
        never deleted: one inside went with a `down`, while others waited on it."""
        with open(self.root.parent / f".{self.root.name}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def status(self) -> dict[str, dict[str, object]]:
        state = self._load_state()
        if state is None:
            return {"kafka": {"running": False}, "postgres": {"running": False}}
        return {
            "kafka": {
                "running": self._kafka_running(state),
                "bootstrap": f"127.0.0.1:{state.kafka_port}",
                "pid": state.kafka_pid,
            },
            "postgres": {"running": self._postgres_running(state), "url": self.info(state).database_url},
        }

    def info(self, state: _State | None = None) -> StackInfo:
        state = state or self._load_state()
        if state is None:
            raise StackError(f"no local stack at {self.root}; run `streamagg stack up`")
        return StackInfo(
            kafka_bootstrap=f"127.0.0.1:{state.kafka_port}",
            database_url=f"postgresql://postgres@127.0.0.1:{state.postgres_port}/{DATABASE}",
        )

    # -- state file --------------------------------------------------------------------------
    def _load_state(self) -> _State | None:
        try:
            return _State(**json.loads(self._state_file.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as exc:
            raise StackError(f"unreadable {self._state_file}: {exc}; remove {self.root} and retry") from exc

    def _save_state(self, state: _State) -> None:
        tmp = self._state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(state)))
        tmp.replace(self._state_file)

    @staticmethod
    def _new_state(kafka_port: int | None, postgres_port: int | None) -> _State:
        def pick(wanted: int | None, default: int) -> int:
            if wanted:
                return wanted
            return default if _port_is_free(default) else free_port()

        return _State(
            kafka_port=pick(kafka_port, DEFAULT_KAFKA_PORT),
            controller_port=free_port(),
            postgres_port=pick(postgres_port, DEFAULT_POSTGRES_PORT),
        )

    # -- PostgreSQL --------------------------------------------------------------------------
    def _as_pg_user(self) -> list[str]:
        """Prefix that runs a command as the cluster's owner (root may not run initdb)."""
        if os.geteuid() != 0:
            return []
        try:
            pwd.getpwnam(_PG_SYSTEM_USER)
        except KeyError:
            subprocess.run(
                ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", _PG_SYSTEM_USER],
                check=True,
            )
        return ["runuser", "-u", _PG_SYSTEM_USER, "--"]

    def _pg_run(self, args: list[str], what: str, log_file: Path | None = None, log_from: int = 0) -> None:
        proc = subprocess.run(self._as_pg_user() + args, capture_output=True, text=True)
        if proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).strip().splitlines()
            said = detail[-1] if detail else f"exit {proc.returncode}"
            if log_file is not None:  # pg_ctl says only "Examine the log output."; this run's lines
                with contextlib.suppress(OSError), open(log_file, "rb") as lines:
                    lines.seek(log_from)
                    fatal = [line for line in lines.read().decode(errors="replace").splitlines() if "FATAL" in line]
                    said = f"{fatal[-1] if fatal else said} (log: {log_file})"
            raise StackError(f"{what} failed: {said}")

    def _postmaster_alive(self) -> bool:
        """postmaster.pid names a live postmaster of this data directory (not a stale file)."""
        try:
            pid = int((self.pg_data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return False
        return _pid_alive(pid, str(self.pg_data))

    def _postgres_running(self, state: _State) -> bool:
        return self._postmaster_alive() and _answers(state.postgres_port)

    def _postgres_up(self, state: _State, initdb: str, pg_ctl: str) -> None:
        if self._postgres_running(state):
            log.info("postgres already running on 127.0.0.1:%d", state.postgres_port)
        else:
            self._postgres_start(state, initdb, pg_ctl)
        # Also when it ran: an `up` stopped between the start and CREATE DATABASE left none for good.
        asyncio.run(self._create_database(state.postgres_port))

    def _postgres_start(self, state: _State, initdb: str, pg_ctl: str) -> None:
        run_dir = self.pg_dir / "run"
        if not (self.pg_data / "PG_VERSION").exists():
            shutil.rmtree(self.pg_dir, ignore_errors=True)
            run_dir.mkdir(parents=True)
            self._chown_to_pg_user(self.pg_dir)
            log.info("initdb %s", self.pg_data)
            self._pg_run(
                [initdb, "-D", str(self.pg_data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"],
                "initdb",
            )
        options = (
            f"-p {state.postgres_port} -k {run_dir} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        _refuse_busy(state.postgres_port, "postgres")
        log.info("starting postgres on 127.0.0.1:%d", state.postgres_port)
        log_file = self.pg_dir / "postgres.log"
        self._pg_run(
            [pg_ctl, "-D", str(self.pg_data), "-l", str(log_file), "-o", options, "-w", "-t", "60", "start"],
            "pg_ctl start", log_file, log_file.stat().st_size if log_file.exists() else 0,
        )  # fmt: skip

    def _chown_to_pg_user(self, path: Path) -> None:
        if os.geteuid() != 0:
            return
        entry = pwd.getpwnam(_PG_SYSTEM_USER)
        for item in [path, *path.rglob("*")]:
            os.chown(item, entry.pw_uid, entry.pw_gid)

    @staticmethod
    async def _create_database(port: int) -> None:
        import asyncpg

        conn = await asyncpg.connect(host="127.0.0.1", port=port, user="postgres", database="postgres")
        try:
            exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DATABASE)
            if not exists:
                await conn.execute(f'CREATE DATABASE "{DATABASE}"')
        finally:
            await conn.close()

    def _postgres_down(self) -> None:
        if not self._postmaster_alive():  # never started, stopped, or crashed (pg_ctl stop then fails)
            return
        try:
            pg_ctl = _require("pg_ctl")
        except PrerequisiteMissing:
            return
        log.info("stopping postgres")
        self._pg_run([pg_ctl, "-D", str(self.pg_data), "-m", "fast", "-w", "-t", "60", "stop"], "pg_ctl stop")

    # -- Kafka -------------------------------------------------------------------------------
    def _kafka_running(self, state: _State) -> bool:
        return _pid_alive(state.kafka_pid, str(self.kafka_dir)) and _answers(state.kafka_port)

    def _kafka_up(self, state: _State, java: str) -> None:
        if self._kafka_running(state):
            log.info("kafka already running on 127.0.0.1:%d", state.kafka_port)
            return
        if _pid_alive(state.kafka_pid, str(self.kafka_dir)):  # alive but not answering: start over
            self._kafka_down(state)
        libs = self._kafka_libs()
        config = self._write_kafka_config(state)
        classpath = f"{libs}/*"
        jvm = [java, "-Xms256m", "-Xmx1g", "-XX:+UseG1GC", "-Djava.awt.headless=true",
               f"-Dlog4j2.configurationFile={self.kafka_dir / 'log4j2.properties'}",
               f"-Dkafka.logs.dir={self.kafka_dir / 'logs'}", "-cp", classpath]  # fmt: skip
        if not (self.kafka_dir / "data" / "meta.properties").exists():
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
            proc = subprocess.run(
                [*jvm, "kafka.tools.StorageTool", "format", f"--cluster-id={cluster_id}", "--config", str(config)],
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                raise StackError(f"kafka storage format failed: {(proc.stderr or proc.stdout).strip()[-500:]}")
        _refuse_busy(state.kafka_port, "kafka")
        log.info("starting kafka on 127.0.0.1:%d", state.kafka_port)
        with open(self.kafka_dir / "kafka.out", "ab") as out:
            proc_k = subprocess.Popen(
                [*jvm, "kafka.Kafka", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        state.kafka_pid = proc_k.pid
        self._save_state(state)
        _wait_for(
            f"kafka on 127.0.0.1:{state.kafka_port} (log: {self.kafka_dir / 'logs'})",
            lambda: _kafka_answers(state.kafka_port),
            _KAFKA_START_SECONDS,
            lambda: proc_k.poll() is None,
        )

    def _write_kafka_config(self, state: _State) -> Path:
        (self.kafka_dir / "logs").mkdir(parents=True, exist_ok=True)
        config = self.kafka_dir / "server.properties"
        template = resources.files("streamagg.stack_files").joinpath("server.properties").read_text()
        config.write_text(
            template.format(
                port=state.kafka_port,
                controller_port=state.controller_port,
                data_dir=self.kafka_dir / "data",
            )
        )
        log4j = resources.files("streamagg.stack_files").joinpath("log4j2.properties").read_text()
        (self.kafka_dir / "log4j2.properties").write_text(log4j.replace("@LOG_DIR@", str(self.kafka_dir / "logs")))
        return config

    def _kafka_libs(self) -> Path:
        """The broker's jars, resolved by Maven once per pom and cached."""
        pom = resources.files("streamagg.stack_files").joinpath("pom.xml").read_bytes()
        libs = self.cache_dir / "kafka" / hashlib.sha256(pom).hexdigest()[:16] / "libs"
        if (libs / ".complete").exists():
            return libs
        mvn = _require("mvn")
        staging = libs.with_name(f"libs.{os.getpid()}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        (staging.parent / "pom.xml").write_bytes(pom)
        log.info("resolving the Kafka broker from Maven Central into %s (first run only)", libs)
        proc = subprocess.run(
            [mvn, "-q", "-B", "-f", str(staging.parent / "pom.xml"), "dependency:copy-dependencies",
             f"-DoutputDirectory={staging}", "-Dmdep.includeScope=runtime"],  # fmt: skip
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise StackError(f"maven could not resolve kafka: {(proc.stdout + proc.stderr).strip()[-800:]}")
        (staging / ".complete").touch()
        shutil.rmtree(libs, ignore_errors=True)
        staging.rename(libs)
        return libs

    def _kafka_down(self, state: _State) -> None:
        pid = state.kafka_pid
        if not _pid_alive(pid, str(self.kafka_dir)):
            return
        assert pid is not None
        log.info("stopping kafka (pid %d)", pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + _STOP_SECONDS
        while _pid_alive(pid, str(self.kafka_dir)) and time.monotonic() < deadline:
            _reap(pid)
            time.sleep(0.1)
        if _pid_alive(pid, str(self.kafka_dir)):
            log.warning("kafka did not stop within %.0f s; killing it", _STOP_SECONDS)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            while _pid_alive(pid, str(self.kafka_dir)):
                _reap(pid)
                time.sleep(0.05)
        state.kafka_pid = None


def _reap(pid: int) -> None:
    """Collect the exit status if the broker is our own child (it is after ``up`` in-process)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _kafka_answers(port: int) -> bool:
    """True once the broker serves metadata (a listening socket is not enough)."""
    if not _answers(port):
        return False
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    try:
        admin = KafkaAdminClient(bootstrap_servers=f"127.0.0.1:{port}", request_timeout_ms=5000, client_id="stack-probe")
    except KafkaError:
        return False
    try:
        admin.list_topics()
        return True
    except KafkaError:
        return False
    finally:
        admin.close()

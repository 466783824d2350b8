"""Throwaway servers for end-to-end tests: a PostgreSQL cluster and an ``mlflow server`` in front of it.

Both run as real processes on free 127.0.0.1 ports, in their own temp folders, and are stopped by PID
(the MLflow server by process group, PostgreSQL with ``pg_ctl stop`` and then by its postmaster PID), so a
failing test leaves nothing running. PostgreSQL refuses to run as root: when the tests run as root the
cluster belongs to the ``postgres`` system user (created by the Debian package) and its commands run
through ``runuser``.

Example:
    >>> pg = start_postgres()                                       # doctest: +SKIP
    >>> server = start_mlflow_server(pg.uri("mlflow"), tmp / "artifacts")  # doctest: +SKIP
    >>> server.url                                                  # doctest: +SKIP
    'http://127.0.0.1:54321'
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

PG_USER = "smolora"  # the cluster's superuser role (trust auth, 127.0.0.1 only)
PG_OS_USER = "postgres"  # who owns the cluster's files when the tests run as root


def _free_port() -> int:
    from conftest import free_port

    return free_port()


def pg_bindir() -> Path | None:
    """The folder holding initdb/pg_ctl: PG_BINDIR, then the newest /usr/lib/postgresql/*/bin, then PATH."""
    candidates = [os.environ.get("PG_BINDIR", "")]
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]),
                         reverse=True)
    which = shutil.which("initdb")
    candidates.append(str(Path(which).resolve().parent) if which else "")
    for c in candidates:
        if c and (Path(c) / "initdb").is_file() and (Path(c) / "pg_ctl").is_file():
            return Path(c)
    return None


def _as_owner(cmd: list[str]) -> list[str]:
    """Run ``cmd`` as the cluster owner: ourselves, or the postgres user when we are root."""
    if os.geteuid() != 0:
        return cmd
    if shutil.which("runuser"):
        return ["runuser", "-u", PG_OS_USER, "--", *cmd]
    import shlex

    return ["su", "-s", "/bin/sh", PG_OS_USER, "-c", shlex.join(cmd)]


def _owner_ids() -> tuple[int, int]:
    if os.geteuid() != 0:
        return os.getuid(), os.getgid()
    try:
        entry = pwd.getpwnam(PG_OS_USER)
    except KeyError:  # PostgreSQL from somewhere other than the Debian package, which creates this user
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_OS_USER],
                       check=True, capture_output=True)
        entry = pwd.getpwnam(PG_OS_USER)
    return entry.pw_uid, entry.pw_gid


def _run(cmd: list[str], what: str, timeout: float = 120) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode}): {proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


@dataclass
class Postgres:
    """A running throwaway PostgreSQL cluster."""

    bindir: Path
    root: Path
    port: int
    stopped: bool = field(default=False)

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "sock"

    @property
    def log(self) -> Path:
        return self.root / "postgres.log"

    def uri(self, database: str) -> str:
        # psycopg2 named explicitly: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg (3).
        return f"postgresql+psycopg2://{PG_USER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create ``name`` and return its SQLAlchemy URI."""
        _run([str(self.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", PG_USER, name],
             f"createdb {name}")
        return self.uri(name)

    def postmaster_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int((self.datadir / "postmaster.pid").read_text().splitlines()[0])
        return None

    def stop(self) -> None:
        """``pg_ctl stop -m fast``, then SIGKILL the postmaster if it is still there; remove the files."""
        if self.stopped:
            return
        self.stopped = True
        pid = self.postmaster_pid()
        with contextlib.suppress(Exception):
            subprocess.run(_as_owner([str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "fast", "-w",
                                      "-t", "30", "stop"]), capture_output=True, timeout=60, check=False)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)


def start_postgres() -> Postgres:
    """initdb into a fresh temp folder and start the cluster on a free 127.0.0.1 port.

    The folder is made with ``tempfile.mkdtemp`` (not pytest's tmp_path, whose parents are private to
    root, so the postgres user could not reach them) and handed to the cluster owner.
    """
    bindir = pg_bindir()
    if bindir is None:
        raise FileNotFoundError("PostgreSQL server binaries (initdb, pg_ctl) not found")
    uid, gid = _owner_ids()
    root = Path(tempfile.mkdtemp(prefix="smolora-pg-"))
    (root / "sock").mkdir()
    for p in (root, root / "sock"):
        os.chown(p, uid, gid)
    pg = Postgres(bindir=bindir, root=root, port=_free_port())
    try:
        _run(_as_owner([str(bindir / "initdb"), "-D", str(pg.datadir), "-U", PG_USER, "--auth=trust",
                        "--no-locale", "-E", "UTF8", "--no-sync"]), "initdb")
        # A throwaway cluster: no durability, small memory, TCP on 127.0.0.1 only, socket in our folder.
        opts = (f"-p {pg.port} -k {pg.socket_dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c shared_buffers=16MB -c max_connections=40")
        _run(_as_owner([str(bindir / "pg_ctl"), "-D", str(pg.datadir), "-l", str(pg.log), "-o", opts, "-w",
                        "-t", "60", "start"]), "pg_ctl start")
    except BaseException:
        log = pg.log.read_text(errors="replace")[-2000:] if pg.log.exists() else ""
        pg.stop()
        if log:
            sys.stderr.write(f"postgres log:\n{log}\n")
        raise
    return pg


@dataclass
class MlflowServer:
    """A running ``mlflow server`` (its own process group)."""

    proc: subprocess.Popen
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait(self, health: str = "/health", timeout: float = 180) -> str:
        """Wait until ``health`` answers 200 (stopping the server if it never does); returns the URL."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.proc.args[2:5]} exited with {self.proc.returncode}:\n{self.log_tail()}")
                with contextlib.suppress(requests.RequestException):
                    if requests.get(f"{self.url}{health}", timeout=5).status_code == 200:
                        return self.url
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.proc.args[2:5]} not healthy after {timeout:.0f} s:\n{self.log_tail()}")
                time.sleep(0.5)
        except BaseException:
            self.stop()
            raise

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def stop(self) -> None:
        """SIGTERM the server's process group, SIGKILL it after 10 s (uvicorn waits on idle keep-alives)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=20)
        # uvicorn's workers share the group; make sure none outlived their parent.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)


# Client-side settings a test process may carry; the server must not inherit them.
_CLIENT_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID",
               "MLFLOW_EXPERIMENT_NAME", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "PYTHONPATH")


def start_mlflow_server(backend_uri: str, artifacts_dir: str | os.PathLike, log_path: str | os.PathLike, *,
                        app_name: str | None = None, env: dict[str, str] | None = None,
                        timeout: float = 180, port: int | None = None) -> MlflowServer:
    """Start ``mlflow server`` with proxied artifacts (``mlflow-artifacts:``) and wait for ``/health``.

    ``launch_mlflow_server`` takes the same arguments (less ``timeout``) and returns before the server is
    up, for a caller that has other work to do meanwhile (then ``server.wait()``).

    Args:
        backend_uri: the SQLAlchemy URI of the tracking (and registry) store.
        artifacts_dir: where the server stores the artifacts it proxies.
        log_path: file for the server's stdout and stderr.
        app_name: e.g. ``basic-auth``.
        env: extra environment for the server (e.g. ``MLFLOW_AUTH_CONFIG_PATH``).
        timeout: seconds to wait for the server (database migrations run at first start).
    """
    server = launch_mlflow_server(backend_uri, artifacts_dir, log_path, app_name=app_name, env=env, port=port)
    server.wait("/health", timeout)
    return server


def launch_mlflow_server(backend_uri: str, artifacts_dir: str | os.PathLike, log_path: str | os.PathLike, *,
                         app_name: str | None = None, env: dict[str, str] | None = None,
                         port: int | None = None) -> MlflowServer:
    """Start ``mlflow server`` without waiting for it (see :func:`start_mlflow_server`)."""
    port = port or _free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
           "--serve-artifacts", "--artifacts-destination", str(artifacts_dir),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    if app_name:
        cmd += ["--app-name", app_name]
    return launch_server(cmd, port, log_path, env=env)


def start_model_server(model_uri: str | os.PathLike, log_path: str | os.PathLike, *, cwd=None,
                       env: dict[str, str] | None = None, timeout: float = 180) -> MlflowServer:
    """Start the real ``mlflow models serve`` (current environment) and wait for ``/ping``."""
    port = _free_port()
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model_uri), "--env-manager", "local",
           "-h", "127.0.0.1", "-p", str(port)]
    server = launch_server(cmd, port, log_path, env=env, cwd=cwd)
    server.wait("/ping", timeout)
    return server


def launch_server(cmd: list[str], port: int, log_path, *, env=None, cwd=None) -> MlflowServer:
    """Start ``cmd`` (a server listening on ``port``) in its own process group; ``env`` adds to a
    copy of this environment without the client-side MLflow settings."""
    server_env = {k: v for k, v in os.environ.items() if k not in _CLIENT_ENV}
    server_env.update(env or {})
    log = Path(log_path)
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=server_env, cwd=cwd,
                                start_new_session=True)
    return MlflowServer(proc=proc, port=port, log=log)


def save_served_model(path: Path, model_dir: str | os.PathLike) -> Path:
    """The demo model as a smolora flavor folder for the serving tests: 8 new tokens by default."""
    from smolora_mlflow import flavor

    flavor.save_model(path, model_dir, pip_requirements=["torch", "transformers", "safetensors"],
                      generation_defaults={"max_new_tokens": 8})
    return path

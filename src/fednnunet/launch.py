"""Starting the federation's real Flower processes: the server side, one site, or both on one machine.

- :class:`ServerNode`: a Flower SuperLink (TLS + SuperNode authentication, or insecure on loopback) plus the
  submission of a job with ``flwr run`` and following it until its ``result.json`` appears.
- :class:`SiteNode`: one site's worker process and its Flower SuperNode.
- :class:`LocalFederation`: a ServerNode and one SiteNode per dataset on loopback (``fednnunet run``).
Every process gets its own session so that its whole tree (ServerApp and ClientApp subprocesses included)
is stopped on exit, on failure and on Ctrl-C.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

from fednnunet.federation.job import JobSpec
from fednnunet.federation.runner import EVENTS_FILE, read_result

logger = logging.getLogger(__name__)

#: Flower 1.41 SuperExec task polling interval (environment variable read by flower-superexec) and our value.
SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
SUPEREXEC_POLL_S = "0.25"
#: Seconds between ``flwr ls`` checks for a run that ended without a result (see ServerNode.follow).
RUN_STATUS_CHECK_S = 30.0


class FederationError(RuntimeError):
    """The federation job failed; the message carries the site's or server's error."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"address {address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def _bin(name: str) -> str:
    """An executable of this environment (the venv's bin folder first, then PATH)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else (shutil.which(name) or name)


#: The packaged Flower App definitions ``flwr run`` can submit: (package, resource path) by folder name.
FLOWER_APPS = {"flower_app": ("fednnunet.flower", "app/pyproject.toml"),
               "echo_app": ("fednnunet.bench", "echo_app/pyproject.toml")}  # bench flower-floor


def app_dir(workdir: Path, name: str = "flower_app") -> Path:
    """A copy of a packaged Flower App definition (:data:`FLOWER_APPS`) that ``flwr run`` can build a FAB from."""
    package, resource = FLOWER_APPS[name]
    target = workdir / name
    target.mkdir(parents=True, exist_ok=True)
    (target / "pyproject.toml").write_text(resources.files(package).joinpath(resource).read_text())
    return target


def supernode_command(server: str, node_config: str = "", root_cert: Path | None = None,
                      auth_key: Path | None = None, max_wait_s: float | None = None) -> list[str]:
    """``flower-supernode`` connecting to the SuperLink at ``server`` (insecure without ``root_cert``)."""
    cmd = [_bin("flower-supernode"), "--superlink", server, "--port", str(free_port())]
    if node_config:
        cmd += ["--node-config", node_config]
    if root_cert is None:
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(root_cert)]
    if auth_key is not None:
        cmd += ["--auth-supernode-private-key", str(auth_key)]
    if max_wait_s is not None:
        cmd += ["--max-wait-time", str(max_wait_s)]
    return cmd


@dataclass
class Site:
    name: str
    dataset: str


@dataclass
class ServerTLS:
    """Files of ``fednnunet certs``: ca.crt, server.crt, server.key, and sites/*.pub to register."""

    folder: Path

    @property
    def ca(self) -> Path:
        return self.folder / "ca.crt"

    def site_public_keys(self) -> list[Path]:
        return sorted((self.folder / "sites").glob("*.pub"))

    def check(self) -> None:
        missing = [p for p in (self.ca, self.folder / "server.crt", self.folder / "server.key") if not p.exists()]
        if missing:
            raise FederationError(f"TLS files missing: {', '.join(map(str, missing))} (make them with "
                                  "`fednnunet certs`)")


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen
    log: Path


class StartStop:
    """``with X(...) as x:`` starts on entry (stopping what did start if starting fails) and stops on exit."""

    def start(self) -> "StartStop":
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self):  # noqa: ANN204 - returns the started object itself
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ProcessGroup(StartStop):
    """Processes started for one role, each logged to ``workdir/logs/<name>.log`` and stopped together."""

    def __init__(self, workdir: Path, extra_env: dict[str, str] | None = None) -> None:
        self.workdir = Path(workdir).resolve()
        self.logs = self.workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.flwr_home = self.workdir / "flwr_home"
        self.extra_env = dict(extra_env or {})
        self._procs: list[_Proc] = []

    def env(self, home: str) -> dict[str, str]:
        env = dict(os.environ)
        # Flower's processes start helpers (flower-superexec, flwr-serverapp, flwr-clientapp) from PATH
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env["FLWR_HOME"] = str(self.flwr_home / home)
        # Flower's SuperExec looks for a new task (a message to start a ClientApp for) once a second by default;
        # 0.25 s takes ~0.4 s off the average latency of every message; 0.1 s would cost a SuperLink plus a
        # SuperNode ~10 % of a core while idle (~5 % at the default 1 s).
        env.setdefault(SUPEREXEC_POLL_ENV, SUPEREXEC_POLL_S)
        env.update(self.extra_env)
        (self.flwr_home / home).mkdir(parents=True, exist_ok=True)
        return env

    def start_process(self, name: str, cmd: list[str], env: dict[str, str]) -> _Proc:
        log = self.logs / f"{name}.log"
        with log.open("ab") as f:
            popen = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                     preexec_fn=_stop_with_launcher if sys.platform == "linux" else None)
        proc = _Proc(name, popen, log)
        self._procs.append(proc)
        logger.debug("started %s (pid %d): %s", name, popen.pid, " ".join(cmd))
        return proc

    def check_alive(self) -> None:
        for p in self._procs:
            code = p.popen.poll()
            if code is not None:
                raise FederationError(f"{p.name} exited with code {code}; last log lines:\n{tail(p.log)}")

    def stop(self) -> None:
        terminate_all([p.popen for p in reversed(self._procs)])
        self._procs.clear()


class ServerNode(ProcessGroup):
    """The coordinating server: a SuperLink, and jobs submitted to it with ``flwr run``."""

    def __init__(self, workdir: Path, host: str = "127.0.0.1", port: int | None = None,
                 tls: ServerTLS | None = None, on_event: Callable[[dict], None] = lambda e: None,
                 insecure: bool = False) -> None:
        super().__init__(workdir)
        if tls is None and not insecure and not is_loopback(host):
            raise FederationError(f"refusing to serve {host} without TLS: pass --tls-dir (or --insecure to "
                                  "accept unencrypted, unauthenticated connections)")
        self.host = host
        self.port = port or free_port()
        self.tls = tls
        self.on_event = on_event

    @property
    def connect_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host

    def start(self) -> "ServerNode":
        cmd = [_bin("flower-superlink"), "--host", self.host, "--port", str(self.port),
               "--disable-runtime-dependency-installation"]
        if self.tls is None:
            cmd.append("--insecure")
        else:
            self.tls.check()
            cmd += ["--ssl-ca-certfile", str(self.tls.ca), "--ssl-certfile", str(self.tls.folder / "server.crt"),
                    "--ssl-keyfile", str(self.tls.folder / "server.key"), "--enable-supernode-auth"]
        self.start_process("superlink", cmd, self.env("superlink"))
        self._write_cli_config()
        deadline = time.monotonic() + 60
        while not _port_open(self.connect_host, self.port):
            self.check_alive()
            if time.monotonic() > deadline:
                raise FederationError(f"SuperLink not listening on {self.host}:{self.port} after 60 s")
            time.sleep(0.2)
        if self.tls is not None:
            self.register_sites(self.tls.site_public_keys())
        return self

    def _write_cli_config(self) -> None:
        home = self.flwr_home / "cli"
        home.mkdir(parents=True, exist_ok=True)
        security = ("insecure = true\n" if self.tls is None
                    else f'root-certificates = "{self.tls.ca}"\n')  # type: ignore[union-attr]
        # With TLS the certificate's subject names must include this host (`fednnunet certs --hosts`).
        (home / "config.toml").write_text(f'[superlink]\ndefault = "server"\n\n[superlink.server]\n'
                                          f'address = "{self.connect_host}:{self.port}"\n{security}')

    def register_sites(self, public_keys: Sequence[Path]) -> None:
        """Register site keys (Flower SuperNode authentication): only these sites can join."""
        if not public_keys:
            raise FederationError(f"no site public keys in {self.tls.folder / 'sites'}; "  # type: ignore[union-attr]
                                  "nothing could join")
        for key in public_keys:
            res = self.flwr("supernode", "register", str(key), "server")
            if res.returncode != 0:
                raise FederationError(f"registering {key.name} failed: {res.stdout}{res.stderr}")
            logger.info("registered site key %s", key.name)

    def flwr(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([_bin("flwr"), *args], env=self.env("cli"), capture_output=True, text=True,
                              timeout=120)

    def run(self, job: JobSpec, timeout_s: float | None = None,
            check: Callable[[], None] | None = None) -> dict:
        """Submit ``job`` with ``flwr run``, follow its events and return its result (raise on failure)."""
        run_id = self.submit(job)
        return self.follow(run_id, Path(job.out_dir), timeout_s, check or self.check_alive)

    def submit(self, job: JobSpec) -> str:
        """Submit ``job`` with ``flwr run`` and return its run id (the job starts at once, in the SuperLink)."""
        out = Path(job.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for stale in (out / "result.json", out / EVENTS_FILE):
            stale.unlink(missing_ok=True)
        job_file = out / "job.json"
        job.save(job_file)
        return self.submit_app(app_dir(self.workdir), f'job-file="{job_file}"')

    def submit_app(self, app: Path, run_config: str) -> str:
        """``flwr run`` the Flower App folder ``app`` with ``run_config``; returns the run id."""
        submitted = self.flwr("run", str(app), "server", "--format", "json", "--run-config", run_config)
        try:
            run_id = json.loads(submitted.stdout)["run-id"]
        except (json.JSONDecodeError, KeyError) as err:
            raise FederationError(f"flwr run failed: {submitted.stdout}{submitted.stderr}") from err
        return run_id

    def follow(self, run_id: str, out: Path, timeout_s: float | None, check: Callable[[], None]) -> dict:
        """Relay the run's events until its result appears; returns the result or raises FederationError.

        ``check`` raises if a local process died. A run that Flower reports finished without a result (the
        ServerApp crashed) is noticed through ``flwr ls`` every RUN_STATUS_CHECK_S: each call starts a Python
        process that costs about 2 s of CPU, which more frequent checks would take from the sites.
        """
        events = out / EVENTS_FILE
        seen = 0
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        last_status_check = 0.0
        while True:
            seen = self._emit_new_events(events, seen)
            result = read_result(out)
            if result is not None:
                self._emit_new_events(events, seen)
                if not result.get("ok"):
                    raise FederationError(result.get("error", "job failed"))
                return result
            check()
            if time.monotonic() - last_status_check > RUN_STATUS_CHECK_S:
                last_status_check = time.monotonic()
                status = self.run_status(run_id)
                if status.get("status", "").startswith("finished") and read_result(out) is None:
                    raise FederationError(f"run {run_id} ended ({status.get('status')}) without a result: "
                                          f"{status.get('status-details')}; logs in {self.logs}")
            if deadline is not None and time.monotonic() > deadline:
                raise FederationError(f"run {run_id} did not finish within {timeout_s:.0f} s")
            time.sleep(0.3)

    def run_status(self, run_id: str) -> dict:
        res = self.flwr("ls", "server", "--run-id", str(run_id), "--format", "json")
        try:
            return json.loads(res.stdout)["runs"][0]
        except (json.JSONDecodeError, KeyError, IndexError):
            return {}

    def _emit_new_events(self, events: Path, seen: int) -> int:
        if not events.exists():
            return seen
        lines = events.read_text().splitlines()
        for line in lines[seen:]:
            try:
                self.on_event(json.loads(line))
            except json.JSONDecodeError:
                return seen  # a line being written; read it next time
            seen += 1
        return seen


class SiteNode(ProcessGroup):
    """One site: its worker (state and ML) and its SuperNode (transport to the server)."""

    def __init__(self, workdir: Path, site: Site, server: str, *, root_cert: Path | None = None,
                 auth_key: Path | None = None, extra_env: dict[str, str] | None = None,
                 exit_after_job: bool = False, max_wait_s: float | None = None, task: str | None = None,
                 insecure: bool = False, train_expect: tuple[str, list[str]] | None = None) -> None:
        super().__init__(workdir, extra_env)
        host, _ = split_address(server)
        if root_cert is None and not insecure and not is_loopback(host):
            raise FederationError(f"refusing to connect to {server} without TLS: pass --tls-root CA_FILE (or "
                                  "--insecure)")
        self.site = site
        self.server = server
        self.root_cert = root_cert
        self.auth_key = auth_key
        self.exit_after_job = exit_after_job
        self.task = task
        self.train_expect = train_expect
        self.max_wait_s = max_wait_s
        # Unix socket paths are limited to ~100 bytes: keep them in a short temporary folder
        self._sock_dir = Path(tempfile.mkdtemp(prefix="fednn-"))
        self.socket = self._sock_dir / f"{site.name}.sock"

    def start(self) -> "SiteNode":
        env = self.env(f"site-{self.site.name}")
        worker = [sys.executable, "-m", "fednnunet.site.worker", "--socket", str(self.socket),
                  "--site", self.site.name, "--dataset", self.site.dataset]
        if self.exit_after_job:
            worker.append("--exit-after-job")
        if self.task:
            worker += ["--task", self.task]
        if self.train_expect:
            worker += ["--train-configuration", self.train_expect[0], "--train-folds", *self.train_expect[1]]
        self.worker = self.start_process(f"worker-{self.site.name}", worker, env)
        cmd = supernode_command(self.server, f'site-socket="{self.socket}"', self.root_cert, self.auth_key,
                                self.max_wait_s)
        self.supernode = self.start_process(f"supernode-{self.site.name}", cmd, env)
        return self

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.socket.exists():
            self.check_alive()
            if time.monotonic() > deadline:
                raise FederationError(f"site {self.site.name}: worker not ready after {timeout_s:.0f} s")
            time.sleep(0.2)

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self._sock_dir, ignore_errors=True)


@dataclass
class LocalFederation(StartStop):
    """A server and every site on loopback: ``with LocalFederation(...) as fed: fed.run(job)``."""

    workdir: Path
    sites: Sequence[Site]
    site_env: dict[str, str] = field(default_factory=dict)
    on_event: Callable[[dict], None] = lambda e: None

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        self.server = ServerNode(self.workdir, on_event=self.on_event)
        self.nodes = [SiteNode(self.workdir, s, f"127.0.0.1:{self.server.port}", extra_env=self.site_env)
                      for s in self.sites]
        self.logs = self.server.logs
        self._reported_dead: set[str] = set()

    def start(self) -> "LocalFederation":
        """Start every process at once: the site workers import torch and nnU-Net while the SuperLink and the
        job start (:meth:`run` checks they came up; a message that reaches a worker still starting waits for
        it, see ``client_app``)."""
        for node in self.nodes:
            node.start()
        self.server.start()
        return self

    def check_alive(self) -> None:
        """The server's processes must live; a dead site is the job's business (``--min-sites``), so it is
        only reported here, once."""
        self.server.check_alive()
        for node in self.nodes:
            try:
                node.check_alive()
            except FederationError as err:
                if node.site.name not in self._reported_dead:
                    self._reported_dead.add(node.site.name)
                    self.on_event({"t": time.time(), "kind": "warning",
                                   "message": f"site {node.site.name} stopped: {err}"})

    def stop(self) -> None:
        groups: list[ProcessGroup] = [*self.nodes, self.server]
        with ThreadPoolExecutor(max_workers=len(groups)) as pool:  # each group waits for its own processes
            list(pool.map(lambda group: group.stop(), groups))

    def run(self, job: JobSpec, timeout_s: float | None = None) -> dict:
        """Run ``job`` on these sites; they are stopped with the federation, so the job does not release them."""
        run_id = self.server.submit(replace(job, release_sites=False))
        for node in self.nodes:  # while the job starts; a worker that fails to start is an error at once
            node.wait_ready()
        return self.server.follow(run_id, Path(job.out_dir), timeout_s, self.check_alive)


def _port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def _stop_with_launcher() -> None:
    """Run in a started process before it executes (Linux): it gets SIGTERM when the launcher dies, even by
    SIGKILL, so that a killed ``fednnunet`` never leaves a SuperLink, SuperNode or worker running on its own
    (they run in their own sessions so that a Ctrl-C reaches only the launcher, which stops them in order)."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def terminate_all(popens: Sequence[subprocess.Popen], grace_s: float = 10.0) -> None:
    """Stop processes and everything they started: SIGTERM to all at once, SIGKILL to those still running
    ``grace_s`` later (one shared grace period, not one per process).

    Signals go to each process's session and, separately, to every descendant: Flower's SuperExec starts the
    ServerApp in a session of its own, which a group signal does not reach (it outlived interrupted runs).
    """
    running = [p for p in popens if p.poll() is None]
    strays = [pid for p in running for pid in descendants(p.pid)]
    for popen in running:
        _signal_group(popen, signal.SIGTERM)
    _signal_pids(strays, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for popen in running:
        try:
            popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(popen, signal.SIGKILL)
            popen.wait()
    _signal_pids([pid for pid in strays if is_running(pid)], signal.SIGKILL)


def _proc_stat(pid: int | str) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state, parent pid, ...); None if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` in the process tree (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        if (fields := _proc_stat(entry.name)) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children.get(child, []))
    return found


def is_running(pid: int) -> bool:
    """Running and not a zombie (an orphan's zombie may never be reaped in a container)."""
    fields = _proc_stat(pid)
    return fields is not None and fields[0] != "Z"


def _signal_pids(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _signal_group(popen: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(popen.pid, sig)
    except ProcessLookupError:
        pass


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"

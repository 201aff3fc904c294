"""Starting the federation's real Flower processes: the server side, one site, or both on one machine.

- :class:`ServerNode`: a Flower SuperLink on 127.0.0.1 that executes only the runs this server submits (with
  ``flwr run``; it follows each until its ``result.json`` appears), and for ``fednnunet server`` the gateway
  that serves the sites (TLS, Fleet API only).
- :class:`SiteNode`: one site's worker process and its Flower SuperNode, from which the worker takes its tasks.
- :class:`LocalFederation`: a ServerNode and one SiteNode per dataset on loopback (``fednnunet run``).
Every process gets its own session so that its whole tree is stopped on exit, on failure and on Ctrl-C.
"""

from __future__ import annotations

import atexit
import ipaddress
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from fednnunet.federation.job import JobSpec
from fednnunet.federation.runner import EVENTS_FILE, read_result
from fednnunet.flower.app_bundle import app_dir
from fednnunet.planning.site_planning import write_json_atomic

if TYPE_CHECKING:
    from fednnunet.flower.own_runs import OwnRuns

logger = logging.getLogger(__name__)

#: Seconds between ``flwr ls`` checks for a run that ended without a result, while no thread of this process
#: executes it (see ServerNode.follow).
RUN_STATUS_CHECK_S = 30.0


class FederationError(RuntimeError):
    """The federation job failed; the message carries the site's or server's error."""


#: Failures a job reports in its error line alone: bad or incompatible data and options (ValueError and its
#: kinds: data that cannot be federated, a site reply out of bounds), sites that never came, and (with
#: SiteFailure) sites that failed: their messages name them. Anything else is a fault of this program and is logged with its traceback.
EXPECTED_JOB_ERRORS: tuple[type[Exception], ...] = (ValueError, TimeoutError, FederationError)


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


_private_folders: set[Path] = set()


def private_folder(prefix: str) -> Path:
    """A new folder for secrets and keys, readable by this user only (mode 0700), removed when this process ends.

    Why a registry and not only the owner's ``stop()``: a site worker ends by SIGTERM through the signal's default
    action (see :func:`fednnunet.site.worker.install_sigterm_handling`), which runs no ``finally`` and no atexit;
    it calls :func:`remove_private_folders` first, so no SuperExec secret is left behind in the temp folder.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix))
    _private_folders.add(path)
    return path


def remove_private_folder(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    _private_folders.discard(path)


def remove_private_folders() -> None:
    """Remove every folder :func:`private_folder` made in this process (at exit, and before dying of a signal)."""
    for path in list(_private_folders):
        remove_private_folder(path)


atexit.register(remove_private_folders)


#: Coordinator state that must be this user's only: created with this umask (folders 0700, files 0600) by the
#: coordinator and everything it starts (the SuperLink creates its database with the process umask).
PRIVATE_UMASK = 0o077
#: Beside the SuperLink's database: which node id each registered site key got (``ServerNode.register_sites``).
SITE_NODES_FILE = "site_nodes.json"


def _key_blob(public_key: Path) -> str:
    """The key material of an OpenSSH public key file (its comment and file name aside)."""
    fields = public_key.read_text().split()
    if len(fields) < 2:
        raise FederationError(f"{public_key} is not an OpenSSH public key")
    return fields[1]


def make_private(folder: Path) -> Path:
    """``folder`` (created if needed) readable and writable by this user only (0700)."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    return folder


def write_secret(folder: Path) -> Path:
    """A new random SuperExec auth secret in ``folder`` (made private: mode 0700), readable by this user only."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    path = folder / "superexec.secret"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(32))
    return path


def supernode_command(server: str, root_cert: Path | None = None, auth_key: Path | None = None,
                      max_wait_s: float | None = None, secret_file: Path | None = None,
                      runtime_port: int | None = None) -> list[str]:
    """``flower-supernode`` connecting to the SuperLink at ``server`` (insecure without ``root_cert``).

    With ``secret_file`` the SuperNode runs in ``--isolation process``: it starts no ClientApp and only the holder
    of the secret (the site worker) can take its tasks from its Runtime API on 127.0.0.1:``runtime_port``.
    Without, it is a stock SuperNode that runs each message's ClientApp itself (the bench's Flower floor).
    """
    cmd = [_bin("flower-supernode"), "--superlink", server, "--host", "127.0.0.1",
           "--port", str(runtime_port or free_port())]
    if secret_file is not None:
        cmd += ["--isolation", "process", "--superexec-auth-secret-file", str(secret_file)]
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

    @property
    def sites_folder(self) -> Path:
        return self.folder / "sites"

    def site_public_keys(self) -> dict[str, Path]:
        """Site name -> public key: a site is named by its key's file, ``sites/NAME.pub``."""
        from fednnunet.security.certs import check_site_name

        keys = {}
        for path in sorted(self.sites_folder.glob("*.pub")):
            try:
                keys[check_site_name(path.stem)] = path
            except ValueError as err:
                raise FederationError(f"{path}: {err}") from None
        return keys

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
        env.update(self.extra_env)
        (self.flwr_home / home).mkdir(parents=True, exist_ok=True)
        return env

    def start_process(self, name: str, cmd: list[str], env: dict[str, str]) -> _Proc:
        log = self.logs / f"{name}.log"
        with log.open("ab") as f:
            popen = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                     start_new_session=True,
                                     preexec_fn=die_with_parent if sys.platform == "linux" else None)
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


def wait_listening(group: ProcessGroup, host: str, port: int, what: str, timeout_s: float = 60.0) -> None:
    """Wait until ``host:port`` accepts connections; fail early if a process of ``group`` died."""
    deadline = time.monotonic() + timeout_s
    while not _port_open(host, port):
        group.check_alive()
        if time.monotonic() > deadline:
            raise FederationError(f"{what} not listening on {host}:{port} after {timeout_s:.0f} s")
        time.sleep(0.1)


def _abandon(grid: Any) -> None:  # noqa: ANN401 - Flower's HttpGrid
    """Let a run still being executed fail fast once its SuperLink stops.

    Why: Flower's Grid retries a request without end while the SuperLink is unreachable, in worker threads that
    the interpreter joins at exit, so an interrupted launcher would never exit. Limiting the retries is what
    Flower's own ``flwr-clientapp`` does on exit; closing the client ends the requests in flight.
    """
    invoker = getattr(grid, "_retry_invoker", None)
    if invoker is not None:
        invoker.max_tries = 1
    grid.close()


class ServerNode(ProcessGroup):
    """The coordinating server: a SuperLink on 127.0.0.1 that executes only the runs submitted through this
    object, and, when ``public`` is given, the gateway that serves the sites on that address.

    * ``public=None`` (one machine, ``fednnunet run``): sites connect to the SuperLink's loopback port.
    * ``public=(host, port)`` (``fednnunet server``): the sites reach only the gateway
      (:mod:`fednnunet.security.gateway`): TLS with ``tls``'s server certificate and the Fleet API only. With
      ``tls`` the SuperLink authenticates SuperNodes (the keys of ``tls/sites/`` are registered over loopback) and,
      as Flower requires TLS for that, serves its loopback port with a certificate made for this start.
    * ``flower_executes=True``: a stock SuperLink that runs every submitted ServerApp itself (the bench's floor
      of bare Flower only).
    * ``database``: the SuperLink keeps its state there (Flower's ``--database``), so a server restarted with
      ``--resume`` knows the sites' nodes and their SuperNodes reconnect by themselves.
    """

    def __init__(self, workdir: Path, public: tuple[str, int] | None = None, tls: ServerTLS | None = None,
                 on_event: Callable[[dict], None] = lambda e: None, insecure: bool = False,
                 flower_executes: bool = False, database: Path | None = None) -> None:
        super().__init__(workdir)
        if public is not None and tls is None and not insecure and not is_loopback(public[0]):
            raise FederationError(f"refusing to serve {public[0]} without TLS: pass --tls-dir (or --insecure to "
                                  "accept unencrypted, unauthenticated connections)")
        self.public = public
        self.port = free_port()  # the SuperLink's, on 127.0.0.1
        self.tls = tls
        self.on_event = on_event
        self.flower_executes = flower_executes
        self.database = database
        self.loopback_tls: Path | None = None
        self.own_runs: OwnRuns | None = None
        #: node id -> site name, for the keys this server registered (TLS only; see register_sites)
        self.site_of_node: dict[int, str] = {}
        self._grids: set[Any] = set()  # the Grids of runs being executed here, abandoned when the node stops
        self._executing: set[int] = set()  # ids of the runs whose work a thread of this process does now
        self._executed: dict[int, str] = {}  # run id -> how its work here ended ("" when it completed)
        # the SuperExec secret and the loopback TLS key: a private folder (mode 0700), not the shared work folder
        self.private = private_folder("fednnunet-server-")

    @property
    def site_address(self) -> str:
        """Where sites connect: the gateway's public address, else the SuperLink itself."""
        host, port = self.public or ("127.0.0.1", self.port)
        return f"{host}:{port}"

    def start(self) -> "ServerNode":
        cmd = [_bin("flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
               "--disable-runtime-dependency-installation"]
        make_private(self.workdir)
        if self.database is not None:  # registered site keys keep their node ids when the server restarts
            # it holds the ServerApp's task token and every message in transit: this user's only, whatever the
            # umask (a database of an older version is made private too)
            make_private(self.database.parent)
            for path in self.database.parent.glob(self.database.name + "*"):
                os.chmod(path, 0o600)
            cmd += ["--database", str(self.database)]
        secret = None
        if not self.flower_executes:
            secret = write_secret(self.private)
            cmd += ["--isolation", "process", "--superexec-auth-secret-file", str(secret)]
        if self.tls is None:
            cmd.append("--insecure")
        else:
            from fednnunet.security.certs import make_loopback_tls

            self.tls.check()
            self.loopback_tls = make_loopback_tls(self.private / "loopback-tls")
            cmd += ["--ssl-ca-certfile", str(self.loopback_tls / "ca.crt"),
                    "--ssl-certfile", str(self.loopback_tls / "server.crt"),
                    "--ssl-keyfile", str(self.loopback_tls / "server.key"), "--enable-supernode-auth"]
        self.start_process("superlink", cmd, self.env("superlink"))
        self._write_cli_config()
        wait_listening(self, "127.0.0.1", self.port, "SuperLink")
        if self.tls is not None:
            self.register_sites(self.tls.site_public_keys())
        if secret is not None:
            self._start_own_runs(secret)
        if self.public is not None:
            self._start_gateway()
        return self

    def exposure(self) -> list[str]:
        """What is reachable where, for people (``fednnunet server`` prints it)."""
        lines = [f"exposed: {self.site_address}: "
                 + ("TLS gateway: Flower Fleet API only (SuperNodes), registered site keys only" if self.tls
                    else "gateway WITHOUT TLS: Flower Fleet API only, any SuperNode can join (--insecure)")]
        lines.append(f"loopback only: SuperLink 127.0.0.1:{self.port} (Control API for `flwr` on this machine: "
                     f"FLWR_HOME={self.flwr_home / 'cli'} flwr ls server; Runtime API for this server's ServerApp)")
        return lines

    def _start_gateway(self) -> None:
        host, port = self.public  # type: ignore[misc]
        scheme = "http" if self.tls is None else "https"
        cmd = [sys.executable, "-m", "fednnunet.security.gateway", "--listen", f"{host}:{port}",
               "--upstream", f"{scheme}://127.0.0.1:{self.port}"]
        if self.tls is not None:
            cmd += ["--upstream-ca", str(self.loopback_tls / "ca.crt"),  # type: ignore[operator]
                    "--certfile", str(self.tls.folder / "server.crt"), "--keyfile", str(self.tls.folder / "server.key"),
                    # registered keys only: a request's signature is checked before any of its body is forwarded
                    "--site-keys", str(self.tls.sites_folder)]
        self.start_process("gateway", cmd, self.env("gateway"))
        wait_listening(self, "127.0.0.1" if host in ("0.0.0.0", "::") else host, port, "gateway")

    def _start_own_runs(self, secret: Path) -> None:
        from fednnunet.flower.own_runs import OwnRuns
        from fednnunet.flower.runtime_tasks import RuntimeTasks

        root = None if self.loopback_tls is None else (self.loopback_tls / "ca.crt").read_bytes()
        tasks = RuntimeTasks(f"127.0.0.1:{self.port}", secret.read_bytes(), root)
        self.own_runs = OwnRuns(tasks, self._execute, self._refused)
        self.own_runs.run_in_background()

    def _execute(self, claimed, work: Callable[[Any], None]) -> None:  # noqa: ANN001 - a ClaimedTask
        """Do ``work(grid)`` for our own claimed run, in a thread of this process (no ServerApp process)."""
        self._executing.add(claimed.run_id)
        threading.Thread(target=self._execute_work, args=(claimed, work), name=f"run-{claimed.run_id}",
                         daemon=True).start()

    def _execute_work(self, claimed, work: Callable[[Any], None]) -> None:  # noqa: ANN001 - a ClaimedTask
        from fednnunet.flower.runtime_tasks import SubStatus
        from fednnunet.flower.site_caller import SiteFailure

        status, details = SubStatus.FAILED, "the job failed"
        try:
            with claimed.heartbeats():
                grid = claimed.server_grid()
                self._grids.add(grid)
                try:
                    work(grid)
                    status, details = SubStatus.COMPLETED, ""
                except Exception as err:  # noqa: BLE001 - result.json and the events carry it to the launcher
                    if isinstance(err, (*EXPECTED_JOB_ERRORS, SiteFailure)):  # its message says it all: no traceback before it
                        logger.info("run %d failed: %s", claimed.run_id, err)
                    else:
                        logger.exception("run %d failed", claimed.run_id)
                    details = f"{type(err).__name__}: {err}"
                finally:
                    self._grids.discard(grid)
                    grid.close()
            claimed.finish(status, details)
        finally:
            self._executed[claimed.run_id] = details
            self._executing.discard(claimed.run_id)
            claimed.close()

    def _refused(self, run_id: int, fab_hash: str) -> None:
        self.on_event({"t": time.time(), "kind": "warning",
                       "message": f"refused run {run_id} (FAB sha256 {fab_hash[:12]}): not submitted by this "
                                  "server; nothing of it was run"})

    def stop(self) -> None:
        if self.own_runs is not None:
            self.own_runs.stop()
            self.own_runs = None
        for grid in list(self._grids):
            _abandon(grid)
        super().stop()
        remove_private_folder(self.private)

    def _write_cli_config(self) -> None:
        home = self.flwr_home / "cli"
        home.mkdir(parents=True, exist_ok=True)
        security = ("insecure = true\n" if self.loopback_tls is None
                    else f'root-certificates = "{self.loopback_tls / "ca.crt"}"\n')
        (home / "config.toml").write_text(f'[superlink]\ndefault = "server"\n\n[superlink.server]\n'
                                          f'address = "127.0.0.1:{self.port}"\n{security}')

    def register_sites(self, public_keys: Mapping[str, Path]) -> None:
        """Register site keys (Flower SuperNode authentication) over loopback: only these sites can join, and
        each node is the site its key is named for (:attr:`site_of_node`). Which node id each key got is kept in
        :data:`SITE_NODES_FILE` beside the SuperLink's database, so that a restarted server knows the keys that
        database registered before (Flower answers only "already registered" for them)."""
        if not public_keys:
            raise FederationError(f"no site public keys in {self.tls.sites_folder}; "  # type: ignore[union-attr]
                                  "nothing could join")
        known = self._load_site_nodes()
        for name, key in public_keys.items():
            blob = _key_blob(key)
            res = self.flwr("supernode", "register", str(key), "server", "--name", name, "--format", "json")
            try:
                known[blob] = int(json.loads(res.stdout)["node-id"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                if blob not in known:
                    raise FederationError(f"registering {key.name} failed: {res.stdout}{res.stderr}") from None
            logger.info("registered site key %s as node %d", key.name, known[blob])
        self.site_of_node = {known[_key_blob(key)]: name for name, key in public_keys.items()}
        if self.database is not None:
            write_json_atomic(self.workdir / SITE_NODES_FILE, known)  # mode 0600 (a mkstemp file)

    def _load_site_nodes(self) -> dict[str, int]:
        """Public key (its OpenSSH base64 blob) -> node id, as registered in this server's database."""
        path = self.workdir / SITE_NODES_FILE
        if self.database is None or not path.exists():
            return {}
        return {str(blob): int(node) for blob, node in json.loads(path.read_text()).items()}

    def flwr(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([_bin("flwr"), *args], env=self.env("cli"), capture_output=True, text=True,
                              timeout=120)

    def run(self, job: JobSpec, timeout_s: float | None = None,
            check: Callable[[], None] | None = None) -> dict:
        """Submit ``job`` with ``flwr run``, follow its events and return its result (raise on failure)."""
        run_id = self.submit(job)
        return self.follow(run_id, Path(job.out_dir), timeout_s, check or self.check_alive)

    def submit(self, job: JobSpec) -> str:
        """Submit ``job`` with ``flwr run`` and return its run id (its ServerApp starts at once)."""
        out = Path(job.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for stale in (out / "result.json", out / EVENTS_FILE):
            stale.unlink(missing_ok=True)
        job_file = out / "job.json"
        job.save(job_file)
        from fednnunet.flower.server_app import execute

        return self.submit_app(app_dir(self.workdir), f'job-file="{job_file}"', lambda grid: execute(grid, job))

    def submit_app(self, app: Path, run_config: str, work: Callable[[Any], None] | None = None) -> str:
        """``flwr run`` the Flower App folder ``app`` with ``run_config``; returns the run id. This server then
        does ``work(grid)`` for that run in this process (with Flower's Grid of the run), and executes no other
        run; unless ``flower_executes``, where the SuperLink runs the app's ServerApp itself."""
        with (self.own_runs.submitting() if self.own_runs is not None else nullcontext(lambda run_id, work: None)
              ) as expect:
            submitted = self.flwr("run", str(app), "server", "--format", "json", "--run-config", run_config)
            try:
                run_id = json.loads(submitted.stdout)["run-id"]
            except (json.JSONDecodeError, KeyError) as err:
                raise FederationError(f"flwr run failed: {submitted.stdout}{submitted.stderr}") from err
            expect(run_id, work)
        return run_id

    def follow(self, run_id: str, out: Path, timeout_s: float | None, check: Callable[[], None]) -> dict:
        """Relay the run's events until its result appears; returns the result or raises FederationError.

        ``check`` raises if a local process died. A run that ended without a result is noticed at once while a
        thread of this process executes it (its work ended), and otherwise (not claimed yet; a SuperLink that
        executes ServerApps itself) through ``flwr ls`` every RUN_STATUS_CHECK_S. Not ``flwr ls`` throughout:
        each call starts a Python process that costs 0.5-2 s of CPU, taken from the sites training on the same
        cores of a one-machine federation.
        """
        events = out / EVENTS_FILE
        seen = 0
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        last_status_check = time.monotonic()
        while True:
            seen = self._emit_new_events(events, seen)
            result = read_result(out)
            if result is not None:
                self._emit_new_events(events, seen)
                if not result.get("ok"):
                    raise FederationError(result.get("error", "job failed"))
                return result
            check()
            if int(run_id) in self._executed:
                if read_result(out) is None:
                    raise FederationError(f"run {run_id} ended ({self._executed[int(run_id)] or 'completed'}) "
                                          f"without a result; logs in {self.logs}")
            elif (int(run_id) not in self._executing
                  and time.monotonic() - last_status_check > RUN_STATUS_CHECK_S):
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
    """One site of a one-machine federation: its worker process (state and ML), which starts and owns the site's
    SuperNode (transport to the server; see :mod:`fednnunet.site.supernode`) and takes every task from it."""

    def __init__(self, workdir: Path, site: Site, server: str, extra_env: dict[str, str] | None = None,
                 task: str | None = None) -> None:
        super().__init__(workdir, extra_env)
        self.site = site
        self.server = server
        self.task = task  # the worker refuses jobs of another task (and warms up for training)
        self.runtime_port = free_port()

    def start(self) -> "SiteNode":
        worker = [sys.executable, "-m", "fednnunet.site.worker", "--site", self.site.name, "--dataset",
                  self.site.dataset, "--superlink", self.server, "--runtime-port", str(self.runtime_port),
                  "--logs", str(self.logs), *(["--task", self.task] if self.task else [])]
        self.worker = self.start_process(f"worker-{self.site.name}", worker, self.env(f"site-{self.site.name}"))
        return self

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Until the SuperNode's Runtime API (where the worker takes its tasks) listens; fails if the worker died."""
        wait_listening(self, "127.0.0.1", self.runtime_port, f"site {self.site.name}: SuperNode", timeout_s)


@dataclass
class LocalFederation(StartStop):
    """A server and every site on loopback: ``with LocalFederation(...) as fed: fed.run(job)``."""

    workdir: Path
    sites: Sequence[Site]
    site_env: dict[str, str] = field(default_factory=dict)
    on_event: Callable[[dict], None] = lambda e: None
    task: str | None = None  # the one task its jobs run, if known: the sites refuse others, and warm up for it

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        self.server = ServerNode(self.workdir, on_event=self.on_event)
        self.nodes = [SiteNode(self.workdir, s, self.server.site_address, extra_env=self.site_env, task=self.task)
                      for s in self.sites]
        self.logs = self.server.logs
        self._reported_dead: set[str] = set()

    def start(self) -> "LocalFederation":
        """Start every process at once: the site workers import while the SuperLink and the job start (:meth:`run`
        checks they came up)."""
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


def die_with_parent() -> None:
    """Run in a started process before it executes (Linux): it gets SIGTERM when its parent dies, even by
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

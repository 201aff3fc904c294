"""The coordinator's processes: a Flower SuperLink on 127.0.0.1 that executes only the runs this server submits,
and for ``fednnunet server`` the gateway that serves the sites.

- :class:`ServerNode` starts them, registers the sites' keys (Flower SuperNode authentication), submits a job
  with ``flwr run``, executes that run (and no other) in this process and follows it until its ``result.json``.
- :class:`ServerTLS`: the files of ``fednnunet certs`` that the server uses.
- :class:`FederationError`: a job or the coordinator failed; its message is for a person.

Server side only: a hospital's process never imports it (the tools both share are in :mod:`fednnunet.processes`).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from fednnunet.federation.job import JobSpec
from fednnunet.federation.runner import EVENTS_FILE, read_result
from fednnunet.flower.app_bundle import app_dir
from fednnunet.atomic_files import write_json_atomic
from fednnunet.processes import (ProcessGroup, executable, free_port, is_loopback, make_private, private_folder,
                                 remove_private_folder, wait_listening, write_secret)

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


#: Beside the SuperLink's database: which node id each registered site key got (``ServerNode.register_sites``).
SITE_NODES_FILE = "site_nodes.json"


def _key_blob(public_key: Path) -> str:
    """The key material of an OpenSSH public key file (its comment and file name aside)."""
    fields = public_key.read_text().split()
    if len(fields) < 2:
        raise FederationError(f"{public_key} is not an OpenSSH public key")
    return fields[1]


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


def _registered_node(res: subprocess.CompletedProcess) -> int | None:
    """The node id that ``flwr supernode register --format json`` reports, or None when it registered nothing.

    Decided by the JSON reply alone, never by Flower's wording: a key already registered (by this server before a
    restart) gets an error reply like any other refusal; :meth:`ServerNode.register_sites` tells them apart by the
    node ids this server recorded itself."""
    try:
        return int(json.loads(res.stdout)["node-id"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


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
    * It executes the runs submitted through it, in this process, and no other (:meth:`_execution`); the bench's
      :class:`fednnunet.bench.flower_floor.StockServerNode` instead lets the SuperLink run every ServerApp itself.
    * ``database``: the SuperLink keeps its state there (Flower's ``--database``), so a server restarted with
      ``--resume`` knows the sites' nodes and their SuperNodes reconnect by themselves.
    """

    def __init__(self, workdir: Path, public: tuple[str, int] | None = None, tls: ServerTLS | None = None,
                 on_event: Callable[[dict], None] = lambda e: None, insecure: bool = False,
                 database: Path | None = None) -> None:
        super().__init__(workdir)
        if public is not None and tls is None and not insecure and not is_loopback(public[0]):
            raise FederationError(f"refusing to serve {public[0]} without TLS: pass --tls-dir (or --insecure to "
                                  "accept unencrypted, unauthenticated connections)")
        self.public = public
        self.port = free_port()  # the SuperLink's, on 127.0.0.1
        self.tls = tls
        self.on_event = on_event
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
        cmd = [executable("flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
               "--disable-runtime-dependency-installation"]
        make_private(self.workdir)
        if self.database is not None:  # registered site keys keep their node ids when the server restarts
            # it holds the ServerApp's task token and every message in transit: this user's only, whatever the
            # umask (a database of an older version is made private too)
            make_private(self.database.parent)
            for path in self.database.parent.glob(self.database.name + "*"):
                os.chmod(path, 0o600)
            cmd += ["--database", str(self.database)]
        execution, secret = self._execution()
        cmd += execution
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

    def _execution(self) -> tuple[list[str], Path | None]:
        """The SuperLink's flags for who executes the submitted runs, and the SuperExec secret of the runs this
        object executes itself: ``--isolation process`` with a new secret that only this process holds, so that
        the SuperLink runs no ServerApp and this object claims its own runs (:meth:`_start_own_runs`)."""
        secret = write_secret(self.private)
        return ["--isolation", "process", "--superexec-auth-secret-file", str(secret)], secret

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
        from fednnunet.protocol.caller import SiteFailure

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
            node = _registered_node(res)
            if node is not None:
                known[blob] = node
            elif blob not in known:  # refused, and not a key this server's database registered before
                raise FederationError(f"registering {key.name} failed: {res.stdout}{res.stderr}")
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
        return subprocess.run([executable("flwr"), *args], env=self.env("cli"), capture_output=True, text=True,
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
        run; unless it claims no runs (see :meth:`_execution`), where the SuperLink runs the app's ServerApp
        itself."""
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

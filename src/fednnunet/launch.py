"""One-machine federation with real Flower processes: a SuperLink, and per site a site worker and a SuperNode.

Everything runs on loopback ports chosen free at start. Every process gets its own session so that the whole
tree (ServerApp and ClientApp subprocesses included) is stopped on exit, on failure and on Ctrl-C. The job is
submitted with ``flwr run``; its outcome comes from the job's ``result.json`` and Flower's run status.
"""

from __future__ import annotations

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
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

from fednnunet.federation.job import JobSpec
from fednnunet.federation.runner import EVENTS_FILE, read_result

logger = logging.getLogger(__name__)


class FederationError(RuntimeError):
    """The federation job failed; the message carries the site's or server's error."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bin(name: str) -> str:
    """An executable of this environment (the venv's bin folder first, then PATH)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else (shutil.which(name) or name)


def app_dir(workdir: Path) -> Path:
    """A copy of the packaged Flower App definition that ``flwr run`` can build a FAB from."""
    target = workdir / "flower_app"
    target.mkdir(parents=True, exist_ok=True)
    source = resources.files("fednnunet.flower").joinpath("app/pyproject.toml")
    (target / "pyproject.toml").write_text(source.read_text())
    return target


@dataclass
class Site:
    name: str
    dataset: str


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen
    log: Path


@dataclass
class LocalFederation:
    """Start with ``with LocalFederation(...) as fed: fed.run(job)``; all processes stop on exit."""

    workdir: Path
    sites: Sequence[Site]
    site_env: dict[str, str] = field(default_factory=dict)
    on_event: Callable[[dict], None] = lambda e: None
    _procs: list[_Proc] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        self.logs = self.workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        # Unix socket paths are limited to ~100 bytes: keep them in a short temporary folder
        self.sockets = Path(tempfile.mkdtemp(prefix="fednn-"))
        self.port = free_port()
        self.flwr_home = self.workdir / "flwr_home"

    # --- processes ----------------------------------------------------------------------------------------
    def _start(self, name: str, cmd: list[str], env: dict[str, str]) -> _Proc:
        log = self.logs / f"{name}.log"
        with log.open("ab") as f:
            popen = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        proc = _Proc(name, popen, log)
        self._procs.append(proc)
        logger.debug("started %s (pid %d): %s", name, popen.pid, " ".join(cmd))
        return proc

    def _env(self, home: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        # Flower's processes start helpers (flower-superexec, flwr-serverapp, flwr-clientapp) from PATH
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env["FLWR_HOME"] = str(self.flwr_home / home)
        env.update(extra or {})
        (self.flwr_home / home).mkdir(parents=True, exist_ok=True)
        return env

    def start(self) -> "LocalFederation":
        self._start("superlink", [_bin("flower-superlink"), "--insecure", "--host", "127.0.0.1",
                                  "--port", str(self.port), "--disable-runtime-dependency-installation"],
                    self._env("superlink"))
        for site in self.sites:
            sock = str(self.sockets / f"{site.name}.sock")
            env = self._env(f"site-{site.name}", self.site_env)
            self._start(f"worker-{site.name}", [sys.executable, "-m", "fednnunet.site.worker", "--socket", sock,
                                                "--site", site.name, "--dataset", site.dataset], env)
            self._start(f"supernode-{site.name}", [
                _bin("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                "--port", str(free_port()), "--node-config", f'site-socket="{sock}"'], env)
        self._write_cli_config()
        self._wait_ready()
        return self

    def _write_cli_config(self) -> None:
        home = self.flwr_home / "cli"
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{self.port}"\n'
            "insecure = true\n")

    def _wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        socks = [self.sockets / f"{s.name}.sock" for s in self.sites]
        while time.monotonic() < deadline:
            self._check_alive()
            if all(s.exists() for s in socks) and _port_open(self.port):
                return
            time.sleep(0.2)
        raise FederationError(f"federation processes not ready within {timeout_s:.0f} s; logs in {self.logs}")

    def _check_alive(self) -> None:
        for p in self._procs:
            code = p.popen.poll()
            if code is not None:
                raise FederationError(f"{p.name} exited with code {code}; last log lines:\n{_tail(p.log)}")

    def stop(self) -> None:
        for p in reversed(self._procs):
            _terminate(p.popen)
        self._procs.clear()
        shutil.rmtree(self.sockets, ignore_errors=True)

    def __enter__(self) -> "LocalFederation":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- jobs -----------------------------------------------------------------------------------------------
    def flwr(self, *args: str) -> subprocess.CompletedProcess:
        env = self._env("cli")
        return subprocess.run([_bin("flwr"), *args], env=env, capture_output=True, text=True, timeout=120)

    def run(self, job: JobSpec, timeout_s: float | None = None) -> dict:
        """Submit ``job`` with ``flwr run``, follow its events and return its result (raise on failure)."""
        out = Path(job.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for stale in (out / "result.json", out / EVENTS_FILE):
            stale.unlink(missing_ok=True)
        job_file = out / "job.json"
        job.save(job_file)
        submitted = self.flwr("run", str(app_dir(self.workdir)), "local", "--format", "json",
                              "--run-config", f'job-file="{job_file}"')
        try:
            run_id = json.loads(submitted.stdout)["run-id"]
        except (json.JSONDecodeError, KeyError) as err:
            raise FederationError(f"flwr run failed: {submitted.stdout}{submitted.stderr}") from err
        return self._follow(run_id, out, timeout_s)

    def _follow(self, run_id: str, out: Path, timeout_s: float | None) -> dict:
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
            self._check_alive()
            if time.monotonic() - last_status_check > 5:
                last_status_check = time.monotonic()
                status = self.run_status(run_id)
                if status.get("status", "").startswith("finished") and read_result(out) is None:
                    raise FederationError(f"run {run_id} ended ({status.get('status')}) without a result: "
                                          f"{status.get('status-details')}; logs in {self.logs}")
            if deadline is not None and time.monotonic() > deadline:
                raise FederationError(f"run {run_id} did not finish within {timeout_s:.0f} s")
            time.sleep(0.3)

    def run_status(self, run_id: str) -> dict:
        res = self.flwr("ls", "local", "--run-id", str(run_id), "--format", "json")
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


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _terminate(popen: subprocess.Popen, grace_s: float = 10.0) -> None:
    if popen.poll() is not None:
        return
    try:
        os.killpg(popen.pid, signal.SIGTERM)
        popen.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(popen.pid, signal.SIGKILL)
        popen.wait()
    except ProcessLookupError:
        pass


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"

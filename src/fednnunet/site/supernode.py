"""A site's Flower SuperNode, started and owned by the site worker.

Why the worker owns it: the SuperNode only carries messages; the worker takes every task from it (see
:mod:`fednnunet.site.serve`). A SuperNode that outlived its worker would accept the server's messages that nobody
answers, and the server would wait for them until its round timeout; a worker without its SuperNode cannot reach
the server. So the SuperNode is the worker's child: it is stopped when the worker ends, also when the worker is
killed (the kernel sends it SIGTERM, see :func:`fednnunet.processes.die_with_parent`).

When the SuperNode is lost the worker notices it either way Flower 1.41 ends: the process exits (it could not
join at its start: refused key, TLS failure, server unreachable for ``--max-wait-time``), or it gives up
reconnecting after it had joined (a request failed for ``--max-wait-time``): then Flower logs "Giving up
reconnection", leaves its message loop and never contacts the server again, while the process stays (its Runtime
API thread keeps it alive). :meth:`SuperNodeProcess.lost` tells both apart from a running node;
:mod:`fednnunet.site.serve` decides whether to restart it or to end the worker.

:func:`supernode_command` is the SuperNode's command line, here for the site and for the bench's floor of bare
Flower (a stock SuperNode that runs each message's ClientApp itself).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from fednnunet.processes import (executable, free_port, private_folder, remove_private_folder, start_logged, tail,
                                 terminate_all, tool_env, write_secret)

#: Flower 1.41's SuperNode reports its state only in its log (no API tells whether it joined, gave up or was
#: refused), so these lines of its log are read, and kept here alone; tests/test_rejoin.py and
#: tests/test_identity.py fail if a Flower version words them otherwise. Its activation was refused:
ACTIVATION_REFUSED = "Failed to activate SuperNode"
#: Flower's lines: the node joined (activated at the server); a request gave up after --max-wait-time; a message
#: that could not be received (after which Flower goes on: the only give-up that is not the end of the node)
JOINED = "SuperNode ID:"
GAVE_UP = "Giving up reconnection"
RECEIVE_FAILED = "Failed to receive message"
RESTART_MARK = "--- started again by the site worker ---"
#: (text in the SuperNode's log, what it means for a person)
_REASONS = (
    (ACTIVATION_REFUSED, "the server refused this site: its key is not registered there (or no --auth-key was "
     "given), or the server still counted this site's previous client as connected"),
    ("CERTIFICATE_VERIFY_FAILED", "the server's certificate is not signed by --tls-root"),
    ("SSL", "TLS handshake failed (wrong --tls-root, or the server does not use TLS)"),
    (GAVE_UP, "the server cannot be reached (down, wrong address, or it requires TLS)"),
)


def supernode_command(server: str, root_cert: Path | None = None, auth_key: Path | None = None,
                      max_wait_s: float | None = None, secret_file: Path | None = None,
                      runtime_port: int | None = None) -> list[str]:
    """``flower-supernode`` connecting to the SuperLink at ``server`` (insecure without ``root_cert``).

    With ``secret_file`` the SuperNode runs in ``--isolation process``: it starts no ClientApp and only the holder
    of the secret (the site worker) can take its tasks from its Runtime API on 127.0.0.1:``runtime_port``.
    Without, it is a stock SuperNode that runs each message's ClientApp itself (the bench's Flower floor).
    """
    cmd = [executable("flower-supernode"), "--superlink", server, "--host", "127.0.0.1",
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
class SuperNodeSpec:
    """How this site's SuperNode reaches the server (the flags of ``fednnunet client``)."""

    superlink: str
    root_cert: Path | None = None
    auth_key: Path | None = None
    max_wait_s: float | None = None


class SuperNodeProcess:
    """``flower-supernode --isolation process`` whose tasks only this process can take (SuperExec secret)."""

    def __init__(self, spec: SuperNodeSpec, log: Path, runtime_port: int | None = None) -> None:
        self.spec = spec
        self.log = Path(log)
        self.runtime_port = runtime_port or free_port()
        self.private = private_folder("fednnunet-site-")  # the secret's folder
        self.secret_file = write_secret(self.private)
        self.popen: subprocess.Popen | None = None
        self.joined_once = False  # any start of it activated at the server
        self._log_start = 0  # where the current start's lines begin in the log

    @property
    def runtime_address(self) -> str:
        return f"127.0.0.1:{self.runtime_port}"

    @property
    def secret(self) -> bytes:
        return self.secret_file.read_bytes()

    def start(self) -> "SuperNodeProcess":
        cmd = supernode_command(self.spec.superlink, self.spec.root_cert, self.spec.auth_key, self.spec.max_wait_s,
                                self.secret_file, self.runtime_port)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._log_start = self.log.stat().st_size if self.log.exists() else 0
        self.popen = start_logged(cmd, self.log, tool_env())
        return self

    def exit_code(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def activation_refused(self) -> bool:
        """The server did not let the node in: an unregistered key, or the site's previous SuperNode (a client killed
        moments ago) still counts as online there; Flower lets the key in again after two missed heartbeats."""
        return ACTIVATION_REFUSED in self._since_start(first=False, size=16384)

    def restart(self) -> "SuperNodeProcess":
        """Start it again (same Runtime API port and secret) after it ended (or after :meth:`halt`)."""
        with self.log.open("a") as f:
            f.write(f"\n{RESTART_MARK}\n")
        return self.start()

    def _since_start(self, first: bool, size: int = 65536) -> str:
        """The first (or last) ``size`` bytes that the current start wrote to the log."""
        try:
            with self.log.open("rb") as f:
                end = f.seek(0, os.SEEK_END)
                f.seek(self._log_start if first else max(self._log_start, end - size))
                return f.read(size).decode(errors="replace")
        except OSError:
            return ""

    def joined(self) -> bool:
        """The current start activated at the server (Flower logged its node id)."""
        if JOINED in self._since_start(first=True):
            self.joined_once = True
            return True
        return False

    def gave_up(self) -> bool:
        """The process runs but Flower gave up reaching the server: its last "Giving up reconnection" is not one
        of a single message it could not receive (after which it goes on). Flower writes that line right after the
        give-up: call it twice a second or more apart before acting on it."""
        if self.exit_code() is not None:
            return False
        text = self._since_start(first=False, size=16384)
        at = text.rfind(GAVE_UP)
        return at >= 0 and RECEIVE_FAILED not in text[at:]

    def lost(self) -> str | None:
        """What ended this node for a person (it exited, or gave up reaching the server), or None while it runs."""
        if (code := self.exit_code()) is not None:
            return f"its SuperNode exited (code {code})"
        if self.gave_up():
            return (f"its SuperNode gave up reaching the server {self.spec.superlink} after "
                    f"{self.spec.max_wait_s or 0:.0f} s (--connect-timeout)")
        return None

    def halt(self) -> None:
        """Stop the process, keeping its port and secret for :meth:`restart`."""
        if self.popen is not None:
            terminate_all([self.popen])

    def cause(self) -> str | None:
        """Why the current start ended, for a person (refused key, TLS failure, unreachable server), if known."""
        text = self._since_start(first=False, size=16384)
        return next((reason for needle, reason in _REASONS if needle in text), None)

    def reason(self) -> str:
        """Why it exited, for a person (refused key, TLS failure, unreachable server), with its last lines."""
        cause = self.cause()
        return f"{cause + '; ' if cause else ''}last SuperNode log lines:\n{tail(self.log, 8)}"

    def stop(self) -> None:
        if self.popen is not None:
            terminate_all([self.popen])
        remove_private_folder(self.private)

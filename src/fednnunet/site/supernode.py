"""A site's Flower SuperNode, started and owned by the site worker.

Why the worker owns it: the SuperNode only carries messages; the worker takes every task from it (see
:mod:`fednnunet.site.serve`). A SuperNode that outlived its worker would accept the server's messages that nobody
answers, and the server would wait for them until its round timeout; a worker without its SuperNode cannot reach
the server. So the SuperNode is the worker's child: it is stopped when the worker ends, also when the worker is
killed (the kernel sends it SIGTERM, see :func:`fednnunet.launch.die_with_parent`), and the worker ends, naming
the reason from the SuperNode's log, when the SuperNode exits.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from fednnunet.launch import (die_with_parent, free_port, private_folder, remove_private_folder, supernode_command, tail,
                              terminate_all, write_secret)

ACTIVATION_REFUSED = "Failed to activate SuperNode"
#: (text in the SuperNode's log, what it means for a person)
_REASONS = (
    (ACTIVATION_REFUSED, "the server refused this site: its key is not registered there (or no --auth-key was "
     "given), or the server still counted this site's previous client as connected"),
    ("CERTIFICATE_VERIFY_FAILED", "the server's certificate is not signed by --tls-root"),
    ("SSL", "TLS handshake failed (wrong --tls-root, or the server does not use TLS)"),
    ("Giving up reconnection", "the server cannot be reached (down, wrong address, or it requires TLS)"),
)


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

    @property
    def runtime_address(self) -> str:
        return f"127.0.0.1:{self.runtime_port}"

    @property
    def secret(self) -> bytes:
        return self.secret_file.read_bytes()

    def start(self) -> "SuperNodeProcess":
        cmd = supernode_command(self.spec.superlink, self.spec.root_cert, self.spec.auth_key, self.spec.max_wait_s,
                                self.secret_file, self.runtime_port)
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as f:
            self.popen = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=env, start_new_session=True,
                                          preexec_fn=die_with_parent if sys.platform == "linux" else None)
        return self

    def exit_code(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def activation_refused(self) -> bool:
        """The server did not let the node in: an unregistered key, or the site's previous SuperNode (a client killed
        moments ago) still counts as online there; Flower lets the key in again after two missed heartbeats."""
        return ACTIVATION_REFUSED in tail(self.log, 40)

    def restart(self) -> "SuperNodeProcess":
        """Start it again (same Runtime API port and secret) after it ended."""
        with self.log.open("a") as f:
            f.write("\n--- started again by the site worker ---\n")
        return self.start()

    def reason(self) -> str:
        """Why it exited, for a person (refused key, TLS failure, unreachable server), with its last lines."""
        text = tail(self.log, 40)
        for needle, reason in _REASONS:
            if needle in text:
                return f"{reason}; last SuperNode log lines:\n{tail(self.log, 8)}"
        return f"last SuperNode log lines:\n{tail(self.log, 8)}"

    def stop(self) -> None:
        if self.popen is not None:
            terminate_all([self.popen])
        remove_private_folder(self.private)

"""Network namespaces for tests: one host per namespace, all on a bridge that lives in a namespace of its own.

Nothing is added to the machine's own network: the bridge, the veth pairs and every address (10.213.N.0/24) exist
only inside namespaces this module created, and :meth:`Hosts.remove` deletes them (with everything in them).
Processes run in a host with ``ip netns exec`` and share the file system, so nnU-Net folders need no copying.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here (not root, no iproute2, no permission), or None."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"fnn-probe-{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except subprocess.CalledProcessError as err:
        return f"`ip netns add` failed: {err.stderr.strip()}"
    _ip("netns", "del", probe)
    return None


@dataclass
class Hosts:
    """Named hosts with addresses 10.213.<subnet>.<index + 1>; ``address(name)`` and ``run(name, cmd)``."""

    names: list[str]
    subnet: int = field(default_factory=lambda: os.getpid() % 250 + 1)

    def __post_init__(self) -> None:
        tag = f"fnn{os.getpid() % 100000}"
        self.ns = {name: f"{tag}-{name}" for name in self.names}
        self.switch = f"{tag}-sw"

    def address(self, name: str) -> str:
        return f"10.213.{self.subnet}.{self.names.index(name) + 1}"

    def create(self) -> "Hosts":
        try:
            _ip("netns", "add", self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for i, name in enumerate(self.names):
                ns = self.ns[name]
                _ip("netns", "add", ns)
                _ip("-n", ns, "link", "set", "lo", "up")
                # a veth pair made inside the host's namespace, its far end moved to the switch's
                _ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"p{i}",
                    "netns", self.switch)
                _ip("-n", self.switch, "link", "set", f"p{i}", "master", "br0")
                _ip("-n", self.switch, "link", "set", f"p{i}", "up")
                _ip("-n", ns, "addr", "add", f"{self.address(name)}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
        except BaseException:
            self.remove()
            raise
        return self

    def command(self, name: str, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns[name], *cmd]

    def remove(self) -> None:
        for ns in [*self.ns.values(), self.switch]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def __enter__(self) -> "Hosts":
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.remove()


class HostProcess:
    """A ``fednnunet`` command in a host, its output in a log file, in a session of its own."""

    def __init__(self, hosts: Hosts, host: str, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with log.open("w") as f:
            self.popen = subprocess.Popen(hosts.command(host, [str(Path(sys.executable).parent / "fednnunet"), *args]),
                                          env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout=timeout)

    def kill(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, 9)  # the whole session: SuperLink/gateway or SuperNode with it
            self.popen.wait()

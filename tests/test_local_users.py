"""Another Unix user on the coordinator or a hospital machine reads nothing of a federation (issue 24, item 2).

The SuperLink's database holds the ServerApp's task token in clear and every message in transit; with a umask of
022 it used to be world-readable, so any local user could act as the coordinator. Now ``fednnunet server``,
``run`` and ``client`` create everything with umask 077 (the SuperLink inherits it) and make the server's folder
0700 whatever it was. Checked with real processes and a real second user (``nobody``; needs root, as CI has),
running Debian's own Python so that it uses nothing of the project's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import nnunet_env

BIN = Path(sys.executable).parent
SYSTEM_PYTHON = "/usr/bin/python3"
INTRUDER_UID = 65534  # nobody
#: What the other user runs: walk the given folders and try to read every file found.
SCAN = """
import json, os, sys
found = {"listed": [], "read": []}
for top in sys.argv[1:]:
    for folder, _, files in os.walk(top):
        found["listed"].append(folder)
        for name in files:
            try:
                with open(os.path.join(folder, name), "rb") as f:
                    f.read(1)
                found["read"].append(os.path.join(folder, name))
            except OSError:
                pass
print(json.dumps(found))
"""


def _as_other_user(*folders: Path) -> dict[str, list[str]]:
    res = subprocess.run([SYSTEM_PYTHON, "-c", SCAN, *map(str, folders)], user=INTRUDER_UID, group=INTRUDER_UID,
                         capture_output=True, text=True, timeout=60, cwd="/")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@pytest.mark.skipif(os.geteuid() != 0 or not Path(SYSTEM_PYTHON).exists(),
                    reason="needs root (to act as a second user) and the system's python3")
def test_another_local_user_reads_no_token_key_or_message() -> None:
    from fednnunet.data.synthetic import write_demo_federation
    from fednnunet.processes import free_port

    base = Path(tempfile.mkdtemp(prefix="fednnunet-users-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)  # a shared machine: other users may look around here
        (base / "public.txt").write_text("readable by anyone\n")
        os.chmod(base / "public.txt", 0o644)
        subprocess.run([str(BIN / "fednnunet"), "certs", "--out", str(base / "tls"), "--hosts", "127.0.0.1",
                        "--sites", "1"], check=True, capture_output=True)
        env = nnunet_env(base / "hospital")
        env["nnUNet_def_n_proc"] = "1"
        for folder in (base / "hospital", *(Path(env[v]) for v in ("nnUNet_raw", "nnUNet_preprocessed",
                                                                     "nnUNet_results"))):
            os.chmod(folder, 0o755)
        write_demo_federation(Path(env["nnUNet_raw"]), first_id=901, sites=1, dim=2, seed=1)
        address = f"127.0.0.1:{free_port()}"
        out = base / "out"
        with (base / "server.log").open("w") as log:
            server = subprocess.Popen([str(BIN / "fednnunet"), "server", "extract_fingerprint", "--num-clients", "1",
                                       "--address", address, "--tls-dir", str(base / "tls"), "--out", str(out)],
                                      env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while "waiting for 1 site" not in (base / "server.log").read_text():
                assert server.poll() is None and time.monotonic() < deadline, (base / "server.log").read_text()
                time.sleep(0.5)
            # the run is submitted and claimed: its task token is in the SuperLink's database now
            assert (out / "server" / "superlink.db").exists()
            while_running = _as_other_user(out)
            client = subprocess.run([str(BIN / "fednnunet"), "client", "extract_fingerprint", "901", "--server",
                                     address, "--tls-root", str(base / "tls" / "ca.crt"), "--auth-key",
                                     str(base / "tls" / "sites" / "site1.key"), "--connect-timeout", "60"],
                                    env=env, capture_output=True, text=True, timeout=300)
            assert client.returncode == 0, client.stdout + client.stderr
            assert server.wait(timeout=120) == 0, (base / "server.log").read_text()
        finally:
            if server.poll() is None:
                server.kill()
        after = _as_other_user(out, Path(env["nnUNet_results"]) / "FednnUNet")
        sanity = _as_other_user(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert str(base / "public.txt") in sanity["read"]  # the other user can read what is meant to be readable
    assert while_running == {"listed": [], "read": []}, while_running
    assert after["read"] == [], after
    assert after["listed"] == [], after

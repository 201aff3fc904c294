"""Multi-machine commands refuse an unprotected setup before any connection, and a stopped site leaves no secret
behind (the federation itself, its refusals and the attacks on it run across network namespaces in
test_isolation.py)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import nnunet_env

BIN = Path(sys.executable).parent / "fednnunet"


def test_server_refuses_to_run_without_tls_choice(tmp_path):
    res = subprocess.run([str(BIN), "server", "extract_fingerprint", "--num-clients", "1"], env=nnunet_env(tmp_path),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "--tls-dir" in res.stderr
    # refused before any connection is attempted
    res = subprocess.run([str(BIN), "client", "extract_fingerprint", "901", "--server", "10.1.2.3:9092"],
                         env=nnunet_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "refusing to connect to 10.1.2.3:9092 without TLS" in res.stderr


def test_site_stopped_by_sigterm_removes_its_supernode_secret(tmp_path):
    """A site worker dies of SIGTERM by the signal's default action (no cleanup runs); its SuperNode's SuperExec
    secret must still not stay in the temp folder (it used to: one folder per stopped site)."""
    env = nnunet_env(tmp_path)
    env["TMPDIR"] = str(tmp_path / "tmp")
    (tmp_path / "tmp").mkdir()
    proc = subprocess.Popen([str(BIN), "client", "train", "901", "2d", "0", "--server", "127.0.0.1:9", "--insecure",
                             "--connect-timeout", "120"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.time() + 60
        while not list((tmp_path / "tmp").glob("fednnunet-site-*/superexec.secret")) and time.time() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        assert list((tmp_path / "tmp").glob("fednnunet-site-*/superexec.secret")), "the site never wrote its secret"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == -signal.SIGTERM  # it still dies of the signal, as before
    finally:
        proc.kill()
        proc.communicate()
    assert not list((tmp_path / "tmp").glob("fednnunet-site-*")), "the secret's folder was left behind"

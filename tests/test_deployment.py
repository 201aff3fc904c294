"""Multi-machine commands refuse an unprotected setup before any connection (the federation itself, its refusals
and the attacks on it run across network namespaces in test_isolation.py)."""

from __future__ import annotations

import subprocess
import sys
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

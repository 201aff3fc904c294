"""Multi-machine commands on loopback: `fednnunet certs`, a TLS + authenticated `server`, and `client`s —
registered sites complete the job; an unregistered key, an insecure client and a wrong CA are refused."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from conftest import nnunet_env
from fednnunet.data.synthetic import write_demo_federation
from fednnunet.launch import free_port

BIN = Path(sys.executable).parent / "fednnunet"


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([str(BIN), *args], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def test_tls_authenticated_federation_and_refusals(tmp_path):
    env = nnunet_env(tmp_path)
    write_demo_federation(Path(env["nnUNet_raw"]), first_id=901, sites=2, dim=2, seed=3)
    subprocess.run([str(BIN), "certs", "--out", str(tmp_path / "tls"), "--hosts", "localhost,127.0.0.1",
                    "--sites", "2"], env=env, check=True, capture_output=True)
    subprocess.run([str(BIN), "certs", "--out", str(tmp_path / "other"), "--hosts", "127.0.0.1", "--sites", "1"],
                   env=env, check=True, capture_output=True)
    address = f"127.0.0.1:{free_port()}"
    tls, other = tmp_path / "tls", tmp_path / "other"
    procs = {}
    try:
        procs["server"] = _start(["server", "extract_fingerprint", "--num-clients", "2", "--address", address,
                                  "--tls-dir", str(tls), "--out", str(tmp_path / "out")], env, tmp_path / "server.log")
        time.sleep(8)
        refused = {
            "unregistered": ["--tls-root", str(tls / "ca.crt"), "--auth-key", str(other / "sites" / "site1.key")],
            "insecure": ["--insecure"],
            "wrong_ca": ["--tls-root", str(other / "ca.crt"), "--auth-key", str(tls / "sites" / "site2.key")],
        }
        for name, extra in refused.items():
            procs[name] = _start(["client", "extract_fingerprint", "902", "--server", address, "--site-name", name,
                                  "--connect-timeout", "15", "--no-check", *extra], env, tmp_path / f"{name}.log")
        for i, ds in enumerate(("901", "902"), start=1):
            procs[ds] = _start(["client", "extract_fingerprint", ds, "--server", address, "--tls-root",
                                str(tls / "ca.crt"), "--auth-key", str(tls / "sites" / f"site{i}.key")], env,
                               tmp_path / f"{ds}.log")
        codes = {name: p.wait(timeout=600) for name, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    logs = {name: (tmp_path / f"{name}.log").read_text() for name in procs}
    assert codes["server"] == 0, logs["server"]
    assert codes["901"] == 0 and codes["902"] == 0, logs["901"] + logs["902"]
    assert "(TLS, registered sites only)" in logs["server"]
    for ds in ("Dataset901_SiteA", "Dataset902_SiteB"):
        assert (Path(env["nnUNet_preprocessed"]) / ds / "dataset_fingerprint.json").is_file()
    assert codes["unregistered"] != 0 and "key is not registered" in logs["unregistered"], logs["unregistered"]
    assert codes["insecure"] != 0 and "cannot be reached" in logs["insecure"], logs["insecure"]
    assert codes["wrong_ca"] != 0 and "lost the server" in logs["wrong_ca"], logs["wrong_ca"]


def test_server_refuses_to_run_without_tls_choice(tmp_path):
    res = subprocess.run([str(BIN), "server", "extract_fingerprint", "--num-clients", "1"], env=nnunet_env(tmp_path),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "--tls-dir" in res.stderr
    # refused before any connection is attempted
    res = subprocess.run([str(BIN), "client", "extract_fingerprint", "901", "--server", "10.1.2.3:9092"],
                         env=nnunet_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "refusing to connect to 10.1.2.3:9092 without TLS" in res.stderr

"""A site is its key: the coordinator names every site by the public key it registered, never by the name a client
gives itself (issue 24, item 1). Real processes on loopback: ``fednnunet server`` (SuperLink, gateway, registered
keys over TLS) and ``fednnunet client`` hospitals, each with its own nnU-Net folders.

The gateway's check that a pushed reply's source is the node that signed the request (a site answering as
another node) is in tests/test_gateway*.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import nnunet_env

BIN = Path(sys.executable).parent


def _hospital(root: Path, seed: int) -> dict[str, str]:
    """A hospital's own nnU-Net folders holding one synthetic Dataset901 (every hospital uses the same id)."""
    from fednnunet.data.synthetic import write_demo_federation

    env = nnunet_env(root)
    env["nnUNet_def_n_proc"] = "1"
    write_demo_federation(Path(env["nnUNet_raw"]), first_id=901, sites=1, dim=2, seed=seed)
    return env


def _start(args: list[str], env: dict[str, str], log: Path) -> tuple[subprocess.Popen, Path]:
    f = log.open("w")
    return subprocess.Popen([str(BIN / "fednnunet"), *args], env=env, stdout=f, stderr=subprocess.STDOUT), log


def _finish(proc: tuple[subprocess.Popen, Path], timeout: float = 300) -> tuple[int, str]:
    popen, log = proc
    try:
        code = popen.wait(timeout=timeout)
    finally:
        if popen.poll() is None:
            popen.kill()
    return code, log.read_text(errors="replace")


def test_sites_are_their_keys_not_the_names_they_claim(tmp_path: Path) -> None:
    from fednnunet.processes import free_port

    tls = tmp_path / "tls"
    subprocess.run([str(BIN / "fednnunet"), "certs", "--out", str(tls), "--hosts", "127.0.0.1"], check=True,
                   capture_output=True)
    for name in ("h1", "h2"):  # each hospital makes its own pair; only the public key reaches the coordinator
        keys = tmp_path / f"{name}_keys"
        subprocess.run([str(BIN / "fednnunet"), "keygen", "--name", name, "--out", str(keys)], check=True,
                       capture_output=True)
        (tls / "sites" / f"{name}.pub").write_bytes((keys / f"{name}.pub").read_bytes())
    hospitals = {name: _hospital(tmp_path / name, seed) for name, seed in (("h1", 1), ("h2", 2))}
    server_env = nnunet_env(tmp_path / "coordinator")

    def job(tag: str, claims: dict[str, str]) -> tuple[tuple[int, str], dict[str, tuple[int, str]]]:
        address = f"127.0.0.1:{free_port()}"
        server = _start(["server", "extract_fingerprint", "--num-clients", "2", "--address", address, "--tls-dir",
                         str(tls), "--out", str(tmp_path / tag)], server_env, tmp_path / f"{tag}-server.log")
        clients = {name: _start(["client", "extract_fingerprint", "901", "--server", address, "--tls-root",
                                 str(tls / "ca.crt"), "--auth-key", str(tmp_path / f"{name}_keys" / f"{name}.key"),
                                 "--connect-timeout", "60", "--no-check",
                                 *(["--site-name", claims[name]] if name in claims else [])],
                                hospitals[name], tmp_path / f"{tag}-{name}.log")
                   for name in hospitals}
        return _finish(server), {name: _finish(proc, 120) for name, proc in clients.items()}

    # two hospitals whose datasets share an id are two sites, named by their keys
    (code, out), clients = job("same_ids", {})
    assert code == 0, out
    assert all(c == 0 for c, _ in clients.values()), clients
    result = json.loads((tmp_path / "same_ids" / "result.json").read_text())
    assert sorted(result["sites"]) == ["h1", "h2"], result
    fingerprint = json.loads((tmp_path / "same_ids" / "merged_fingerprint.json").read_text())
    cases = sum(len(list((Path(env["nnUNet_raw"]) / next(Path(env["nnUNet_raw"]).iterdir()).name / "labelsTr")
                         .glob("*.nii.gz"))) for env in hospitals.values())
    assert len(fingerprint["spacings"]) == cases  # both hospitals' cases, none dropped

    # h2's key claiming h1's name is refused at both ends; the coordinator knows it as h2
    (code, out), clients = job("impostor", {"h2": "h1"})
    assert code != 0, out
    assert "h2" in out and "refused" in out, out
    impostor_code, impostor_out = clients["h2"]
    assert impostor_code != 0, impostor_out
    assert "the server knows this site's key as 'h2'" in impostor_out, impostor_out
    assert not (tmp_path / "impostor" / "merged_fingerprint.json").exists()

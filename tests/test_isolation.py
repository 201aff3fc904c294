"""Isolation: no hospital and no one on the network can run code or control runs anywhere.

Real processes throughout (SuperLink, gateway, SuperNodes, site workers, the stock ``flwr`` CLI) and a hostile
Flower app that leaves a marker file wherever any of its code runs (tests/hostile.py).

* On loopback: a hostile app that another local process submits to a running one-machine federation is refused by
  the coordinator, which executes only its own run; a compromised coordinator (a stock SuperLink that runs any
  ServerApp) cannot make a site run anything either: every site refuses the run and logs it.
* Across network namespaces (one server and three hospitals on a bridge; needs root, as CI has): see
  :func:`test_hospital_network`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import nnunet_env
from hostile import flwr_home, markers_found, write_hostile_app
from netns import HostProcess, Hosts, unavailable_reason

BIN = Path(sys.executable).parent


def _flwr(args: list[str], home: Path, env: dict[str, str] | None = None, prefix: list[str] | None = None,
          timeout: float = 120) -> subprocess.CompletedProcess:
    """The stock ``flwr`` CLI with ``home`` as FLWR_HOME (its default connection is the target)."""
    return subprocess.run([*(prefix or []), str(BIN / "flwr"), *args], env={**(env or os.environ),
                          "FLWR_HOME": str(home)}, capture_output=True, text=True, timeout=timeout)


def _wait_for(condition, timeout_s: float, what: str) -> None:  # noqa: ANN001 - a callable returning truth
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.5)


def test_one_machine_federation_refuses_a_run_submitted_by_another_local_process(tmp_path: Path) -> None:
    from fednnunet.data.synthetic import write_demo_federation
    from fednnunet.federation.job import JobSpec
    from fednnunet.federation.local import LocalFederation, Site

    env = nnunet_env(tmp_path)
    write_demo_federation(Path(env["nnUNet_raw"]), first_id=901, sites=2, dim=2, seed=1)
    markers = tmp_path / "markers"
    hostile = write_hostile_app(tmp_path / "hostile", markers)
    events: list[dict] = []
    job = JobSpec(task="extract_fingerprint", num_sites=2, out_dir=str(tmp_path / "out"))
    with LocalFederation(tmp_path / "fed", [Site("901", "901"), Site("902", "902")], site_env=env,
                         on_event=events.append) as fed:
        result: dict = {}
        runner = threading.Thread(target=lambda: result.update(fed.run(job)))
        runner.start()
        # another local user finds the loopback SuperLink (any local port can be scanned) and uses the stock CLI
        home = flwr_home(tmp_path / "intruder", f"127.0.0.1:{fed.server.port}", None)
        submitted = _flwr(["run", str(hostile), "target", "--format", "json"], home)
        run_id = json.loads(submitted.stdout)["run-id"]
        _wait_for(lambda: any(f"refused run {run_id}" in e.get("message", "") for e in events), 60,
                  "the coordinator to refuse the intruder's run")
        runner.join(timeout=600)
        status = _flwr(["ls", "target", "--run-id", str(run_id), "--format", "json"], home)
    assert result.get("ok"), events
    assert json.loads(status.stdout)["runs"][0]["status"] == "finished:failed", status.stdout
    assert "executes only the runs it submitted" in status.stdout
    assert markers_found(markers) == []


def test_sites_refuse_every_app_but_their_installed_one_even_from_a_compromised_coordinator(tmp_path: Path) -> None:
    """A coordinator that runs any ServerApp (a stock SuperLink: compromised, or misconfigured) has the hostile
    ServerApp message every site; each site answers with its refusal, logs it, and runs none of the app's code."""
    from fednnunet.flower.app_bundle import expected_app
    from fednnunet.bench.flower_floor import StockServerNode
    from fednnunet.federation.local import Site, SiteNode

    env = nnunet_env(tmp_path)
    markers = tmp_path / "markers"
    hostile = write_hostile_app(tmp_path / "hostile", markers)
    with StockServerNode(tmp_path / "server") as coordinator:
        sites = [SiteNode(tmp_path / f"site{i}", Site(s, s), coordinator.site_address, env)
                 for i, s in enumerate(("901", "902"))]
        try:
            for node in sites:
                node.start()
                node.wait_ready()
            time.sleep(4)  # both SuperNodes have joined (they ask the SuperLink every 3 s)
            submitted = coordinator.flwr("run", str(hostile), "server", "--format", "json")
            run_id = json.loads(submitted.stdout)["run-id"]
            saw = markers / "serverapp-saw.txt"
            _wait_for(saw.exists, 240, "the hostile ServerApp's replies")
        finally:
            for node in sites:
                node.stop()
    replies = saw.read_text().splitlines()
    assert len(replies) == 2 and all(f"refused run {run_id}" in r for r in replies), replies
    assert all("attacker/hostile 1.0.0" in r and expected_app().describe() in r for r in replies), replies
    for node in sites:
        log = (node.logs / f"worker-{node.site.name}.log").read_text()
        assert f"refused run {run_id}: the run's app is attacker/hostile 1.0.0" in log, log[-2000:]
    assert [m for m in markers_found(markers) if m.startswith("clientapp")] == []


# --- across network namespaces -------------------------------------------------------------------------------------
NETNS_UNAVAILABLE = unavailable_reason()




@pytest.mark.skipif(NETNS_UNAVAILABLE is not None, reason=f"no network namespaces: {NETNS_UNAVAILABLE}")
def test_hospital_network(tmp_path: Path) -> None:
    """One coordinator and three hospitals in their own network namespaces.

    FFE planning through the gateway (TLS, registered keys); clients refused for an unregistered key, a wrong CA
    and plain HTTP, with what a user sees; from a hospital holding ca.crt and a valid key, the stock ``flwr`` can
    neither list, stop, start runs nor register keys, and the SuperLink's own port is unreachable; a hostile app
    submitted on the coordinator itself is refused; no hostile code runs anywhere. Then training: a hospital's
    client killed mid-round and restarted rejoins, the server killed mid-round and restarted with --resume
    continues with the clients that reconnect by themselves, and the run ends with all its rounds.
    """
    from fednnunet.data.synthetic import write_demo_federation

    env = nnunet_env(tmp_path)
    env["nnUNet_def_n_proc"] = "1"
    write_demo_federation(Path(env["nnUNet_raw"]), first_id=901, sites=3, dim=2, seed=3)
    markers = tmp_path / "markers"
    hostile = write_hostile_app(tmp_path / "hostile", markers)
    hospitals = ["h1", "h2", "h3"]
    hosts = Hosts(["srv", *hospitals])
    server_address = f"{hosts.address('srv')}:9092"
    tls, other = tmp_path / "tls", tmp_path / "other"
    for folder, host in ((tls, hosts.address("srv")), (other, hosts.address("srv"))):
        subprocess.run([str(BIN / "fednnunet"), "certs", "--out", str(folder), "--hosts", host, "--sites", "3"],
                       env=env, check=True, capture_output=True)
    procs: list[HostProcess] = []

    def start(host: str, args: list[str], name: str) -> HostProcess:
        procs.append(HostProcess(hosts, host, args, env, tmp_path / f"{name}.log"))
        return procs[-1]

    def client(i: int, task: str, extra: list[str], name: str | None = None) -> HostProcess:
        key = ["--tls-root", str(tls / "ca.crt"), "--auth-key", str(tls / "sites" / f"site{i + 1}.key")]
        return start(hospitals[i], ["client", task, str(901 + i), *extra, "--server", server_address,
                                    *(key if name is None else []), "--connect-timeout", "60" if name is None else "10",
                                    *extra_refused(name)],
                     name or f"{task}-{hospitals[i]}")

    def extra_refused(name: str | None) -> list[str]:
        refused = {"unregistered": ["--tls-root", str(tls / "ca.crt"), "--auth-key",
                                    str(other / "sites" / "site3.key")],
                   "wrong_ca": ["--tls-root", str(other / "ca.crt"), "--auth-key", str(tls / "sites" / "site3.key")],
                   "plain_http": ["--insecure"]}
        return [] if name is None else ["--site-name", name, "--no-check", *refused[name]]

    with hosts:
        try:
            # --- planning through the gateway; refused clients; attacks while the server waits ---------------
            server = start("srv", ["server", "plan_and_preprocess", "--num-clients", "3", "--address",
                                   server_address, "--tls-dir", str(tls), "-c", "2d", "--out", str(tmp_path / "plan")],
                           "server-plan")
            _wait_for(lambda: "exposed:" in server.text(), 120, "the server to start")
            refused = {name: client(2, "plan_and_preprocess", [], name)
                       for name in ("unregistered", "wrong_ca", "plain_http")}
            _attacks_from_a_hospital(hosts, tmp_path, tls, server_address, hostile)
            _hostile_run_on_the_coordinator(hosts, tmp_path, hostile, server)
            for name, proc in refused.items():
                assert proc.wait(timeout=180) != 0, (name, proc.text())
            assert "key is not registered" in refused["unregistered"].text(), refused["unregistered"].text()
            assert "not signed by --tls-root" in refused["wrong_ca"].text(), refused["wrong_ca"].text()
            assert "cannot be reached" in refused["plain_http"].text(), refused["plain_http"].text()
            planners = [client(i, "plan_and_preprocess", []) for i in range(3)]
            assert server.wait(timeout=600) == 0, server.text()
            assert all(p.wait(timeout=60) == 0 for p in planners), [p.text()[-2000:] for p in planners]
            assert "refused run" in server.text()  # the coordinator's own refusal of the hostile run

            # --- training: a client killed and restarted, the server killed and resumed ----------------------
            train = ["2d", "0", "--rounds", "5", "--iterations-per-round", "2", "--val-iterations", "1",
                     "--skip-val", "--da-workers", "0", "--round-timeout", "90", "--min-sites", "2",
                     "--out", str(tmp_path / "train")]
            server = start("srv", ["server", "train", "--num-clients", "3", "--address", server_address,
                                   "--tls-dir", str(tls), *train], "server-train")
            trainers = [client(i, "train", ["2d", "0", "--da-workers", "0"]) for i in range(3)]
            _wait_for(lambda: "round 1/5" in server.text(), 600, "round 1")
            trainers[2].kill()
            trainers[2] = client(2, "train", ["2d", "0", "--da-workers", "0"], None)
            _wait_for(lambda: "rejoins" in server.text(), 600, "the restarted hospital to rejoin")
            _wait_for(lambda: "round 3/5" in server.text(), 600, "round 3")
            first = server.text()
            server.kill()
            server = start("srv", ["server", "train", "--num-clients", "3", "--address", server_address,
                                   "--tls-dir", str(tls), *train, "--resume"], "server-resume")
            assert server.wait(timeout=600) == 0, first + server.text()
            assert all(p.wait(timeout=60) == 0 for p in trainers), [p.text()[-2000:] for p in trainers]
        finally:
            for proc in procs:
                proc.kill()
    resumed = server.text()
    assert "resuming after round" in resumed, resumed
    rounds = [json.loads(line)["round"] for line in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2, 3, 4, 5], rounds
    last = json.loads((tmp_path / "train" / "metrics.jsonl").read_text().splitlines()[-1])
    assert sorted(last["sites"]) == ["site1", "site2", "site3"], last  # named by their keys
    assert markers_found(markers) == []


def _attacks_from_a_hospital(hosts: Hosts, tmp_path: Path, tls: Path, server_address: str, hostile: Path) -> None:
    """What a hospital (ca.crt and a valid site key in hand) can try against the coordinator's port."""
    home = flwr_home(tmp_path / "hospital_flwr", server_address, tls / "ca.crt")
    in_h3 = hosts.command("h3", [])
    attempts = {"ls": ["ls", "target"], "stop": ["stop", "1", "target"],
                "run": ["run", str(hostile), "target"],
                "register": ["supernode", "register", str(tls / "sites" / "site3.pub"), "target"]}
    for what, args in attempts.items():
        res = _flwr(args, home, prefix=in_h3)
        assert res.returncode != 0 and "403 Forbidden" in res.stdout + res.stderr, (what, res.stdout, res.stderr)
    # the SuperLink itself listens on the coordinator's loopback only: nothing answers on its port from outside
    superlink_port = int((tmp_path / "plan" / "server" / "flwr_home" / "cli" / "config.toml").read_text()
                         .split('address = "127.0.0.1:')[1].split('"')[0])
    probe = (f"import socket; s = socket.socket(); s.settimeout(5); "
             f"print(s.connect_ex(('{hosts.address('srv')}', {superlink_port})))")
    res = subprocess.run(hosts.command("h3", [sys.executable, "-c", probe]), capture_output=True, text=True)
    assert res.stdout.strip() not in ("", "0"), res


def _hostile_run_on_the_coordinator(hosts: Hosts, tmp_path: Path, hostile: Path, server: HostProcess) -> None:
    """A local user of the coordinator reaches the loopback Control API; the run is refused, not executed."""
    home = tmp_path / "plan" / "server" / "flwr_home" / "cli"
    res = _flwr(["run", str(hostile), "server", "--format", "json"], home, prefix=hosts.command("srv", []))
    run_id = json.loads(res.stdout)["run-id"]
    _wait_for(lambda: f"refused run {run_id}" in server.text(), 60, "the coordinator's refusal")

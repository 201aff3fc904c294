"""A hospital is never lost silently: its client restarts a SuperNode that gave up, and rejoins, or ends with why.

Real processes across network namespaces (a coordinator and hospitals on a bridge; needs root, as CI has): the
link of one hospital is cut (``ip link set`` on its switch port) for longer than its ``--connect-timeout``, so that
Flower's SuperNode gives up reconnecting (it then stays, never contacting the server again). The client notices,
says so on its terminal, restarts the SuperNode with backoff and rejoins once the link is back; the run goes on with
that site to its last round. With the link kept down past ``--rejoin-for``, the client exits non-zero with the reason.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import nnunet_env
from netns import HostProcess, Hosts, unavailable_reason

BIN = Path(sys.executable).parent
NETNS_UNAVAILABLE = unavailable_reason()
needs_netns = pytest.mark.skipif(NETNS_UNAVAILABLE is not None, reason=f"no network namespaces: {NETNS_UNAVAILABLE}")

#: the hospitals' SuperNodes give up after this (fednnunet client --connect-timeout)
GIVE_UP_S = 15
#: rounds of the run whose hospital is cut off: more than the test waits for (it stops the run itself)
LONG_RUN_ROUNDS = 200
TRAIN = ["--iterations-per-round", "2", "--val-iterations", "1", "--skip-val", "--da-workers", "0",
         "--min-sites", "1"]




def _wait_for(condition, timeout_s: float, what: str, procs: list[HostProcess]) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}:\n" +
                                 "\n".join(f"--- {p.log.name}\n{p.text()[-3000:]}" for p in procs))
        time.sleep(0.5)


def _link(hosts: Hosts, host: str, state: str) -> None:
    """Cut (``down``) or restore (``up``) a host's cable: its port on the switch."""
    port = f"p{hosts.names.index(host)}"
    subprocess.run(["ip", "-n", hosts.switch, "link", "set", port, state], check=True, capture_output=True)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two synthetic 2D sites planned and preprocessed with identical plans (one-machine FFE), and certificates
    for a coordinator at the address its namespace gets."""
    from fednnunet.data.synthetic import write_demo_federation

    root = tmp_path_factory.mktemp("rejoin")
    env = nnunet_env(root)
    env["nnUNet_def_n_proc"] = "1"
    env.pop("nnUNet_n_proc_DA", None)  # the planner calls torch.set_num_threads(nnUNet_n_proc_DA)
    write_demo_federation(Path(env["nnUNet_raw"]), first_id=901, sites=2, dim=2, seed=5)
    subprocess.run([str(BIN / "fednnunet"), "run", "plan_and_preprocess", "901 902", "-c", "2d", "--out",
                    str(root / "plan")], env=env, check=True, capture_output=True, timeout=600)
    srv = Hosts(["srv", "h1", "h2"]).address("srv")  # the addresses are this process's: the same in every test
    subprocess.run([str(BIN / "fednnunet"), "certs", "--out", str(root / "tls"), "--hosts", srv, "--sites", "2"],
                   env=env, check=True, capture_output=True)
    return {"root": root, "env": env, "tls": root / "tls"}


def _start(federation: dict, tmp_path: Path, hosts: Hosts, procs: list[HostProcess], rounds: int, round_timeout: int,
           clients: list[tuple[str, int, list[str]]]) -> tuple[HostProcess, dict[str, HostProcess]]:
    """The coordinator (``fednnunet server train``) and one ``fednnunet client train`` per (host, site, flags)."""
    tls, env = federation["tls"], federation["env"]
    address = f"{hosts.address('srv')}:9092"
    server = HostProcess(hosts, "srv", ["server", "train", "--num-clients", str(len(clients)), "--address", address,
                                  "--tls-dir", str(tls), "2d", "0", "--rounds", str(rounds), "--round-timeout",
                                  str(round_timeout), *TRAIN, "--out", str(tmp_path / "train")],
                   env, tmp_path / "server.log")
    procs.append(server)
    _wait_for(lambda: "exposed:" in server.text(), 120, "the server to start", procs)
    started = {}
    for host, site, extra in clients:
        started[host] = HostProcess(hosts, host, ["client", "train", str(900 + site), "2d", "0", "--da-workers", "0",
                                            "--server", address, "--tls-root", str(tls / "ca.crt"),
                                            "--auth-key", str(tls / "sites" / f"site{site}.key"),
                                            "--connect-timeout", str(GIVE_UP_S), *extra],
                              env, tmp_path / f"client-{host}.log")
        procs.append(started[host])
    return server, started


@needs_netns
def test_a_hospital_cut_off_longer_than_its_give_up_time_rejoins_and_the_run_goes_on(federation: dict,
                                                                                    tmp_path: Path) -> None:
    """The run has more rounds than the test needs: it ends (the processes are stopped) once a round after the
    hospital's rejoin has both sites again, however fast this machine runs the rounds."""
    hosts = Hosts(["srv", "h1", "h2"])
    procs: list[HostProcess] = []
    metrics = tmp_path / "train" / "metrics.jsonl"

    def rounds() -> list[dict]:
        return [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []

    with hosts:
        try:
            # the first round is slow on a small machine (data loaders start): a round timeout that covers it
            server, clients = _start(federation, tmp_path, hosts, procs, rounds=LONG_RUN_ROUNDS, round_timeout=90,
                                     clients=[("h1", 1, []), ("h2", 2, [])])
            _wait_for(lambda: len(rounds()) >= 2, 300, "round 2", procs)
            _link(hosts, "h2", "down")
            cut = time.monotonic()
            _wait_for(lambda: "restarting it" in clients["h2"].text(), GIVE_UP_S + 60,
                      "h2's client to notice that its SuperNode gave up", procs)
            noticed = time.monotonic() - cut
            time.sleep(max(0.0, GIVE_UP_S + 10 - (time.monotonic() - cut)))  # longer than the give-up time
            _link(hosts, "h2", "up")
            _wait_for(lambda: "rejoined the server" in clients["h2"].text(), 240, "h2 to rejoin", procs)
            rejoined_after = len(rounds())
            _wait_for(lambda: any(len(r["sites"]) == 2 for r in rounds()[rejoined_after:]), 300,
                      "a round with both sites after the rejoin", procs)
            assert server.popen.poll() is None, server.text()[-4000:]  # the run went on all along
        finally:
            for proc in procs:
                proc.kill()
    h2 = clients["h2"].text()
    print(f"h2 noticed its SuperNode's give-up {noticed:.0f} s after the cut\n{h2}\n{server.text()}")
    assert "gave up reaching the server" in h2 and "restarting it at" in h2 and "--rejoin-for" in h2, h2
    history = rounds()
    assert [r["round"] for r in history] == list(range(1, len(history) + 1)), history
    print("sites per round:", [sorted(r["sites"]) for r in history])  # h2 may answer the round it was cut in, late
    assert any(len(r["sites"]) == 1 for r in history), history  # h2 was out for a while
    assert len(history[-1]["sites"]) == 2, history[-1]  # the site that was cut off is counted again
    assert "rejoins" in server.text(), server.text()[-4000:]


@needs_netns
@pytest.mark.long  # 1.5 min; the rejoin itself (above) and the policy's bound (below) stay in `make test`
def test_a_hospital_cut_off_past_rejoin_for_exits_with_the_reason(federation: dict, tmp_path: Path) -> None:
    hosts = Hosts(["srv", "h1", "h2"])
    procs: list[HostProcess] = []
    rejoin_for = 20
    with hosts:
        try:
            server, clients = _start(federation, tmp_path, hosts, procs, rounds=50, round_timeout=90,
                                     clients=[("h1", 1, ["--rejoin-for", str(rejoin_for)]), ("h2", 2, [])])
            _wait_for(lambda: "round 1/50" in server.text(), 300, "round 1", procs)
            _link(hosts, "h1", "down")
            cut = time.monotonic()
            code = clients["h1"].wait(timeout=GIVE_UP_S + rejoin_for + 90)
            took = time.monotonic() - cut
        finally:
            for proc in procs:
                proc.kill()
    text = clients["h1"].text()
    print(f"the client ended {took:.0f} s after the cut\n{text}")
    assert code != 0, text
    assert "restarting it at" in text, text
    assert "could not rejoin the server" in text and f"--rejoin-for {rejoin_for}" in text, text


# --- the restart policy alone, with a stand-in for the SuperNode process (no network, runs everywhere) -----------
class _FakeNode:
    """What :class:`fednnunet.site.serve._Rejoin` asks of a SuperNodeProcess."""

    def __init__(self, joined: bool = True) -> None:
        from fednnunet.site.supernode import SuperNodeSpec

        self.spec = SuperNodeSpec("coordinator:9092", max_wait_s=15)
        self.code: int | None = None
        self.gave = False
        self.join = joined
        self.joined_once = False
        self.restarts = self.halts = 0

    def exit_code(self) -> int | None:
        return self.code

    def joined(self) -> bool:
        self.joined_once = self.joined_once or self.join
        return self.join

    def gave_up(self) -> bool:
        return self.gave and self.code is None

    def lost(self) -> str | None:
        return "its SuperNode gave up reaching the server" if self.gave_up() else None

    def halt(self) -> None:
        self.halts += 1
        self.code = -15

    def restart(self) -> None:  # a fresh process that has not joined yet
        self.restarts += 1
        self.code, self.gave, self.join = None, False, False

    def activation_refused(self) -> bool:
        return False

    def cause(self) -> str | None:
        return None

    def reason(self) -> str:
        return "(log lines)"


def _serve_until(keeper, condition, timeout_s: float = 5.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline
        keeper.serving()
        time.sleep(0.01)


def test_rejoin_policy_restarts_a_lost_supernode_until_it_rejoins_or_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    from fednnunet.site import serve
    from fednnunet.site.serve import SuperNodeExited, _Rejoin

    monkeypatch.setattr(serve, "CHECK_S", 0.02)
    monkeypatch.setattr(serve, "REJOIN_FIRST_WAIT_S", 0.05)
    monkeypatch.setattr(serve, "REJOIN_MAX_WAIT_S", 0.1)
    lines: list[str] = []
    node = _FakeNode()
    keeper = _Rejoin("h2", node, 1.0, lines.append)
    assert keeper.serving()
    node.gave = True  # Flower gave up and stays: confirmed on a second look, then halted and restarted
    _serve_until(keeper, lambda: node.restarts == 1)
    assert node.halts == 1 and len(lines) == 1, lines
    assert "gave up reaching the server" in lines[0] and "restarting it at" in lines[0] and "--rejoin-for 1" in lines[0]
    node.join = True
    _serve_until(keeper, lambda: len(lines) == 2)
    assert "rejoined the server" in lines[1] and keeper.lost_at is None
    node.code = 1  # lost again, and every restart fails: the worker ends within the bound, with the reason
    started = time.monotonic()
    with pytest.raises(SuperNodeExited, match="could not rejoin the server coordinator:9092 within --rejoin-for 1"):
        _serve_until(keeper, lambda: (setattr(node, "code", 1) if node.code is None else None) and False)
    assert time.monotonic() - started > 0.5  # it kept trying for the bound (an upper figure would be a timing test)
    assert node.restarts > 2

    # a node that never joined (refused key, TLS, unreachable at the start) ends the worker at once
    never = _FakeNode(joined=False)
    never.code = 1
    with pytest.raises(SuperNodeExited, match="lost the server"):
        _Rejoin("h3", never, 1.0, lines.append).serving()
    assert never.restarts == 0

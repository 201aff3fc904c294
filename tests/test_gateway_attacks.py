"""The coordinator's gateway under the attacks of issue 24, with real processes: a real ``flower-superlink`` (TLS,
``--enable-supernode-auth``, the sites' keys registered over loopback as ``fednnunet server`` does), the gateway
as its own process with ``--site-keys``, a real ``flower-supernode`` and Fleet requests signed as Flower signs them.

Attack source addresses are loopback aliases (127.0.0.2, ...): the gateway keys its caps by source address, and
Linux serves all of 127/8 on ``lo``, so "ten addresses" needs neither root nor namespaces. No test asserts a
timing; bounds are generous deadlines for a 2-core machine.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest

from fednnunet.bench.gateway import (Stack, activate, coordinator, fleet_post, make_tls, peak_rss_mb,
                                     site_requests, slow_head_attack, unauthenticated_bodies, wait_ready)
from fednnunet.processes import free_port
from fednnunet.site.supernode import supernode_command
from netns import Hosts, unavailable_reason

NETNS_UNAVAILABLE = unavailable_reason()

ONE = ["127.0.0.2"]
TEN = [f"127.0.0.{i}" for i in range(2, 12)]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """SuperLink + gateway with --site-keys; the unproven share is lowered to 40 so that ten attacking addresses
    (16 connections each) overflow it and newcomers must take slots from them."""
    work = tmp_path_factory.mktemp("gateway-attacks")
    tls = make_tls(work / "tls", sites=2)
    with coordinator(work, tls, gateway_args=["--head-timeout", "5", "--handshake-timeout", "5",
                                              "--max-unproven", "40"]) as s:
        yield s


@pytest.fixture(scope="module")
def site2_node(stack: Stack) -> int:
    """site2's node, activated the way a SuperNode does it (site1 is left to the real SuperNode of test a)."""
    return activate(stack.base_url, stack.ca, stack.site_key("site2"))


def _env() -> dict[str, str]:
    """The SuperNode starts Flower's helpers (flower-superexec) from PATH: this interpreter's scripts first."""
    return {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}


def _online_nodes(stack: Stack) -> list[dict]:
    res = stack.server.flwr("supernode", "list", "--format", "json", "server")  # type: ignore[attr-defined]
    try:
        nodes = json.loads(res.stdout).get("nodes", [])
    except json.JSONDecodeError:
        return []
    return [n for n in nodes if str(n.get("status", "")).lower() == "online"]


def test_a_registered_supernode_gets_through_100_slow_connections_from_one_address(stack: Stack, site2_node: int,
                                                                                     tmp_path: Path) -> None:
    log = tmp_path / "supernode.log"
    with slow_head_attack("127.0.0.1", stack.port, ONE, 100, log=tmp_path / "attack.log"):
        # signed requests on new connections are not refused once (the shared cap of before refused them all)
        result = site_requests(stack.base_url, stack.ca, stack.site_key("site2"), site2_node, requests=6)
        assert result["succeeded"] == 6 and result["failed_tries"] == 0, result
        # and a stock SuperNode comes online
        with log.open("w") as f:
            node = subprocess.Popen(supernode_command(f"127.0.0.1:{stack.port}", root_cert=stack.ca,
                                                      auth_key=stack.tls / "sites" / "site1.key"),
                                    stdout=f, stderr=subprocess.STDOUT, env=_env())
        try:
            deadline = time.monotonic() + 90
            while not _online_nodes(stack) and time.monotonic() < deadline:
                assert node.poll() is None, log.read_text()
                time.sleep(2)
            assert _online_nodes(stack), f"SuperNode not online under attack:\n{log.read_text()[-3000:]}"
        finally:
            node.terminate()
            node.wait(timeout=30)
    text = stack.gateway_log.read_text()
    # the attacker's address was held to its own caps (open connections, or TLS handshakes in progress)
    assert "refused a connection from 127.0.0.2: " in text, text[-3000:]


def test_a_site_gets_through_slow_connections_from_ten_addresses(stack: Stack, site2_node: int,
                                                                   tmp_path: Path) -> None:
    key = stack.site_key("site2")
    node_id = site2_node
    # the site comes from an address never proven before, so its first connection counts as unproven too
    with slow_head_attack("127.0.0.1", stack.port, TEN, 100, log=tmp_path / "attack.log"):
        result = site_requests(stack.base_url, stack.ca, key, node_id, requests=6, deadline_s=90,
                               source="127.0.0.50")
    assert result["succeeded"] == 6, result
    text = stack.gateway_log.read_text()
    assert "closed the oldest unproven connection from 127.0.0." in text, text[-3000:]


@pytest.mark.skipif(NETNS_UNAVAILABLE is not None, reason=f"network namespaces: {NETNS_UNAVAILABLE}")
def test_a_site_gets_through_slow_connections_from_ten_hosts(tmp_path: Path) -> None:
    """The same with real hosts (network namespaces on one bridge): the coordinator (SuperLink and gateway) on
    one, ten attackers with 10 slow-head connections each, and the site on its own host."""
    names = ["srv", "site", *(f"a{i}" for i in range(10))]
    helper = [sys.executable, "-m", "fednnunet.bench.gateway"]
    procs: list[subprocess.Popen] = []
    with Hosts(names) as hosts:
        srv = hosts.address("srv")
        tls = make_tls(tmp_path / "tls", hosts=(srv,))
        try:
            server = subprocess.Popen(hosts.command("srv", [*helper, "serve", "--work", str(tmp_path), "--tls",
                                                            str(tls), "--gateway-arg=--max-unproven",
                                                            "--gateway-arg=40"]),
                                      stdout=subprocess.PIPE, text=True)
            procs.append(server)
            port = int(wait_ready(server, 120).split()[1])
            for i in range(10):
                procs.append(subprocess.Popen(hosts.command(f"a{i}", [
                    *helper, "slow-heads", "--target", f"{srv}:{port}", "--sources", hosts.address(f"a{i}"),
                    "--count", "10", "--seconds", "600"]), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                    text=True))
            for attacker in procs[1:]:
                wait_ready(attacker, 60)
            site = subprocess.run(hosts.command("site", [*helper, "site", "--url", f"https://{srv}:{port}", "--ca",
                                                         str(tls / "ca.crt"), "--key",
                                                         str(tls / "sites" / "site1.key"), "--requests", "6"]),
                                  capture_output=True, text=True, timeout=180)
            assert site.returncode == 0, site.stderr[-3000:]
            result = json.loads(site.stdout.strip().splitlines()[-1])
            assert result["succeeded"] == 6, result
        finally:
            for proc in reversed(procs):
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    text = next(tmp_path.glob("gateway-*.log")).read_text()
    prefix = srv.rsplit(".", 1)[0]
    assert f"refused a connection from {prefix}." in text or "closed the oldest unproven connection" in text, text


def test_unauthenticated_bodies_never_reach_the_superlink(stack: Stack) -> None:
    # site1's registered key with a fresh timestamp, signed by site2: a valid-looking header set that fails
    site1, site2 = stack.site_key("site1").headers(), stack.site_key("site2").headers()
    forged = (f"flwr-public-key: {site1['flwr-public-key']}\r\nflwr-timestamp: {site2['flwr-timestamp']}\r\n"
              f"flwr-signature: {site2['flwr-signature']}\r\n").encode()
    peak_before = peak_rss_mb(stack.superlink_pid)
    refusals_before = stack.gateway_log.read_text().count("refused POST /v1/fleet/push-object")

    async def both() -> list[str]:
        return [*await unauthenticated_bodies("127.0.0.1", stack.port, 16, 16 << 20),
                *await unauthenticated_bodies("127.0.0.1", stack.port, 16, 16 << 20, headers=forged,
                                              subnet="127.0.4")]

    outcomes = asyncio.run(both())
    # the 401 comes before the body is read; a client still writing may see the close before the status line
    assert set(outcomes) <= {"401", "closed"}, outcomes
    time.sleep(1)
    text = stack.gateway_log.read_text()
    assert text.count("refused POST /v1/fleet/push-object") - refusals_before == 32, text[-3000:]
    assert "no SuperNode authentication headers" in text and "invalid signature" in text
    # 512 MiB were sent; the SuperLink saw none of it (a forwarded 16 MiB body alone would add > 16 MB)
    assert peak_rss_mb(stack.superlink_pid) - peak_before < 16, (peak_before, peak_rss_mb(stack.superlink_pid))


def test_a_site_cannot_push_a_reply_as_another_site(stack: Stack, site2_node: int) -> None:
    from flwr.proto.fleet_pb2 import PushMessagesRequest
    from flwr.proto.message_pb2 import Message, Metadata, ObjectTree
    from flwr.proto.node_pb2 import Node

    a, node_a = stack.site_key("site2"), site2_node
    node_b = next(n for n in _node_ids(stack) if n != node_a)  # site1's node

    def push(src: int) -> bytes:
        message = Message(metadata=Metadata(run_id=1, message_id="0" * 64, src_node_id=src, dst_node_id=0,
                                            reply_to_message_id="1" * 64, message_type="train", ttl=60))
        return PushMessagesRequest(node=Node(node_id=node_a), messages_list=[message],
                                   message_object_trees=[ObjectTree(object_id="0" * 64)]).SerializeToString()

    forged = fleet_post(stack.base_url, stack.ca, "/v1/fleet/push-messages", push(node_b), a)
    assert forged.status_code == 403, forged.text
    assert f"message claims node {node_b}, request is from node {node_a}" in stack.gateway_log.read_text()
    # the same request with its own node id passes the gateway (the SuperLink answers it: no such run here)
    own = fleet_post(stack.base_url, stack.ca, "/v1/fleet/push-messages", push(node_a), a)
    assert own.status_code != 403 and not own.text.startswith("403:"), own.text
    assert fleet_post(stack.base_url, stack.ca, "/v1/fleet/push-messages", push(node_a), None).status_code == 401


def _node_ids(stack: Stack) -> list[int]:
    """Every node the SuperLink knows (the registered sites'), from the stock ``flwr`` CLI over loopback."""
    res = stack.server.flwr("supernode", "list", "--format", "json", "server")  # type: ignore[attr-defined]
    return [int(node["node-id"]) for node in json.loads(res.stdout)["nodes"]]


def test_a_signed_array_chunk_is_forwarded(stack: Stack, site2_node: int) -> None:
    """A signed request with a body the size of Flower's array chunks (5 MiB) passes the checks and reaches the
    SuperLink, which answers it (here: an object it does not expect)."""
    from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE
    from flwr.proto.message_pb2 import PushObjectRequest
    from flwr.proto.node_pb2 import Node

    body = PushObjectRequest(node=Node(node_id=site2_node), run_id=1, object_id="0" * 64,
                             object_content=b"\x01" * int(FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE)).SerializeToString()
    reply = fleet_post(stack.base_url, stack.ca, "/v1/fleet/push-object", body, stack.site_key("site2"))
    assert reply.status_code not in (401, 403, 408, 413, 502), reply.text
    assert reply.headers.get("content-type", "").startswith(("application/json", "application/protobuf")), reply.text


class _Recorder(BaseHTTPRequestHandler):
    seen: list[dict[str, str]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        _Recorder.seen.append({k.lower(): v for k, v in self.headers.items()})
        length = int(self.headers.get("content-length", 0))
        self.rfile.read(length)
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_proxy_headers_are_dropped_and_smuggling_framing_is_refused(tmp_path: Path) -> None:
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    port = free_port()
    log = tmp_path / "gateway.log"
    with log.open("w") as f:
        gateway = subprocess.Popen([sys.executable, "-m", "fednnunet.security.gateway", "--listen",
                                    f"127.0.0.1:{port}", "--upstream", f"http://127.0.0.1:{upstream.server_port}"],
                                   stdout=f, stderr=subprocess.STDOUT)
    try:
        _wait_port(port, gateway)
        reply = fleet_post(f"http://127.0.0.1:{port}", None, "/v1/fleet/pull-messages", b"", None,
                           extra={"X-Forwarded-For": "10.9.8.7", "Forwarded": "for=10.9.8.7", "X-Real-IP": "10.9.8.7",
                                  "X-Forwarded-Host": "evil", "X-Other": "kept"})
        assert reply.status_code == 200, reply.text
        seen = _Recorder.seen[-1]
        assert seen.get("x-other") == "kept", seen
        assert not {"x-forwarded-for", "forwarded", "x-real-ip", "x-forwarded-host"} & set(seen), seen
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /v1/fleet/pull-messages HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
            sock.settimeout(20)
            assert sock.recv(1024).split(b"\r\n")[0].split(b" ")[1] == b"400"
        assert gateway.poll() is None
    finally:
        gateway.terminate()
        gateway.wait(timeout=30)
        upstream.shutdown()
    text = log.read_text()
    assert "both Content-Length and Transfer-Encoding" in text and "Traceback" not in text, text


def _wait_port(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, "gateway exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("gateway not listening")


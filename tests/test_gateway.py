"""The coordinator's gateway in front of a real SuperLink: only the Fleet API passes; Control, Runtime, health and
unknown paths are refused and logged with the peer; oversized and stalled requests and silent connections are cut.
(Its use by real sites over TLS, and the stock `flwr` CLI against it, are in test_isolation.py.)"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from fednnunet.federation.server_node import ServerNode
from fednnunet.processes import free_port, wait_listening
from fednnunet.security.gateway import MAX_REQUEST_BYTES


def test_gateway_forwards_the_fleet_api_only_and_bounds_its_peers(tmp_path: Path) -> None:
    port = free_port()
    with ServerNode(tmp_path / "server") as server:
        log = tmp_path / "gateway.log"
        with log.open("w") as f:
            gateway = subprocess.Popen([sys.executable, "-m", "fednnunet.security.gateway", "--listen",
                                        f"127.0.0.1:{port}", "--upstream", f"http://127.0.0.1:{server.port}",
                                        "--head-timeout", "2", "--body-stall", "2"], stdout=f,
                                       stderr=subprocess.STDOUT)
        try:
            wait_listening(server, "127.0.0.1", port, "gateway")
            base = f"http://127.0.0.1:{port}"
            with httpx.Client(base_url=base, timeout=30) as client:
                for method, path in (("POST", "/v1/control/list-runs"), ("POST", "/v1/control/start-run"),
                                     ("POST", "/v1/control/register-node"), ("POST", "/v1/runtime/acquire-task"),
                                     ("GET", "/health"), ("GET", "/docs"), ("GET", "/v1/fleet/pull-messages"),
                                     ("POST", "/v1/fleet/../control/list-runs"), ("POST", "/anything")):
                    assert client.request(method, path).status_code == 403, (method, path)
                # a Fleet request reaches the SuperLink, which answers it (here: an unparseable protobuf body)
                forwarded = client.post("/v1/fleet/pull-messages", content=b"\x00garbage",
                                        headers={"content-type": "application/protobuf"})
                assert forwarded.status_code not in (403, 413, 502), forwarded.text

                def chunks():  # no content-length: counted while streaming
                    for _ in range(MAX_REQUEST_BYTES // (1 << 20) + 2):
                        yield b"x" * (1 << 20)

                assert client.post("/v1/fleet/push-object", content=chunks()).status_code == 413
            # a declared body above the bound is refused before any of it is read
            assert _raw_status(port, b"POST /v1/fleet/push-object HTTP/1.1\r\nHost: x\r\n"
                               b"Content-Length: %d\r\n\r\n" % (MAX_REQUEST_BYTES + 1)) == b"413"
            # a peer that opens a connection and never completes a request's head is disconnected
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(b"POST /v1/fleet/pull-messages HTTP/1.1\r\nHost: x\r\n")
                sock.settimeout(20)
                started = time.monotonic()
                assert sock.recv(1024) == b"" and time.monotonic() - started < 10
            # a body that stalls halfway is dropped
            assert _raw_status(port, b"POST /v1/fleet/push-object HTTP/1.1\r\nHost: x\r\n"
                               b"Content-Length: 1000\r\n\r\nabc") == b"408"
        finally:
            gateway.terminate()
            gateway.wait(timeout=30)
    text = log.read_text()
    assert "refused POST /v1/control/list-runs from 127.0.0.1:" in text and "refused GET /health" in text, text
    assert "no request within 2 s" in text and "exceeds" in text, text


def _raw_status(port: int, head: bytes) -> bytes:
    """Send ``head`` as is on a new connection (what a misbehaving peer sends) and return the status code."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(head)
        sock.settimeout(20)
        return sock.recv(1024).split(b"\r\n")[0].split(b" ")[1]

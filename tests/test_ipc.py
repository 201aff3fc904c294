"""The frame between a site's ClientApp and its worker: JSON + raw arrays, no pickle; waiting for a starting worker."""

from __future__ import annotations

import socket
import socketserver
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fednnunet.site import ipc


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        body, arrays = ipc.recv_frame(self.request)
        ipc.send_frame(self.request, {"echo": body}, {k: v * 2 for k, v in arrays.items()})


def _serve_later(path: str, delay_s: float) -> dict:
    """Serve the echo handler on ``path`` after ``delay_s`` (as a worker importing nnU-Net would); the server
    object appears in the returned dict under "server"."""
    holder: dict = {}

    def run() -> None:
        time.sleep(delay_s)
        holder["server"] = server = socketserver.UnixStreamServer(path, _Echo)
        server.serve_forever(poll_interval=0.05)

    threading.Thread(target=run, daemon=True).start()
    return holder


@pytest.fixture
def sock_path():
    with tempfile.TemporaryDirectory(prefix="ipc-") as d:  # short: Unix socket paths are limited to ~100 bytes
        yield str(Path(d) / "w.sock")


def test_round_trip_keeps_arrays_exactly(sock_path: str) -> None:
    holder = _serve_later(sock_path, 0.0)
    arrays = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "n": np.array([7], dtype=np.int64)}
    body, out = ipc.request(sock_path, {"op": "x", "v": [1, 2]}, arrays, connect_wait_s=5)
    assert body == {"echo": {"op": "x", "v": [1, 2]}}
    for k, v in arrays.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape
        np.testing.assert_array_equal(out[k], v * 2)
    holder["server"].shutdown()


def test_waits_for_a_worker_that_is_still_starting(sock_path: str) -> None:
    holder = _serve_later(sock_path, 0.6)
    body, _ = ipc.request(sock_path, {"op": "late"}, connect_wait_s=10)
    assert body == {"echo": {"op": "late"}}
    holder["server"].shutdown()


def test_missing_worker_fails_after_the_wait(sock_path: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(FileNotFoundError):
        ipc.request(sock_path, {"op": "x"})
    with pytest.raises(FileNotFoundError):
        ipc.request(sock_path, {"op": "x"}, connect_wait_s=0.3)
    assert time.monotonic() - t0 >= 0.3


def test_object_arrays_are_refused_before_sending() -> None:
    a, b = socket.socketpair()
    with a, b, pytest.raises(ipc.FrameError, match="only numeric"):
        ipc.send_frame(a, {}, {"bad": np.array([object()], dtype=object)})


def test_a_dead_worker_fails_at_once(sock_path: str) -> None:
    """A socket file nobody listens on (a worker killed with SIGKILL leaves it) is refused without waiting."""
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(sock_path)
    dead.close()
    t0 = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        ipc.request(sock_path, {"op": "x"}, connect_wait_s=30)
    assert time.monotonic() - t0 < 5

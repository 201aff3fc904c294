"""Local framing between a site's Flower ClientApp and its long-lived site worker.

Flower starts a fresh ClientApp process for every message, but a site's state (foreground samples, a built
nnU-Net trainer with its data loaders) must live across rounds. The ClientApp therefore relays each message to the
site worker over a Unix socket readable only by the site's user. The frame carries JSON and raw numeric arrays
only: nothing is ever unpickled.

Frame: 8-byte big-endian header length, UTF-8 JSON header ``{"body": {...}, "arrays": [{"name", "dtype",
"shape"}]}``, then each array's C-ordered bytes in header order.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from typing import Any, Mapping

import numpy as np

from fednnunet.array_layout import LayoutError, describe, parse

_LEN = struct.Struct(">Q")
#: Largest header accepted (a JSON fingerprint of thousands of cases fits easily).
MAX_HEADER_BYTES = 64 << 20
#: Largest array payload accepted in one frame.
MAX_PAYLOAD_BYTES = 16 << 30


class FrameError(LayoutError):
    """A frame that is malformed or not allowed (non-numeric dtype, oversized, truncated)."""


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise FrameError(f"connection closed after {got} of {n} bytes")
        got += k
    return bytes(buf)


def send_frame(sock: socket.socket, body: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None) -> None:
    arrays = {k: np.ascontiguousarray(v) for k, v in (arrays or {}).items()}
    try:
        layout = [describe(k, v) for k, v in arrays.items()]
    except LayoutError as err:
        raise FrameError(str(err)) from None
    header = json.dumps({"body": body, "arrays": layout}).encode()
    sock.sendall(_LEN.pack(len(header)) + header)
    for arr in arrays.values():
        sock.sendall(memoryview(arr).cast("B"))


def recv_frame(sock: socket.socket) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    (hlen,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    if hlen > MAX_HEADER_BYTES:
        raise FrameError(f"header of {hlen} bytes exceeds {MAX_HEADER_BYTES}")
    header = json.loads(_recv_exact(sock, hlen))
    try:
        plan = parse(header.get("arrays", []))
    except LayoutError as err:
        raise FrameError(str(err)) from None
    total = sum(nbytes for *_, nbytes in plan)
    if total > MAX_PAYLOAD_BYTES:
        raise FrameError(f"payload of {total} bytes exceeds {MAX_PAYLOAD_BYTES}")
    arrays = {name: np.frombuffer(_recv_exact(sock, nbytes), dtype=dtype).reshape(shape)
              for name, dtype, shape, nbytes in plan}
    return header["body"], arrays


def request(path: str, body: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None,
            timeout: float | None = None, connect_wait_s: float = 0.0) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """One request/reply exchange with the site worker listening on Unix socket ``path``.

    ``connect_wait_s``: keep trying to connect this long while the socket file does not exist yet, i.e. while
    the worker is still starting (importing torch and nnU-Net takes seconds; its SuperNode may be faster). A
    socket file that refuses belongs to a worker that died: that fails at once, so a dead site costs a round
    nothing beyond its own absence.
    """
    deadline = time.monotonic() + connect_wait_s
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            break
        except FileNotFoundError:
            sock.close()
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.1)
    with sock:
        sock.settimeout(timeout)
        send_frame(sock, body, arrays)
        return recv_frame(sock)

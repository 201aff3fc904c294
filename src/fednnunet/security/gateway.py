"""The coordinator's only open port: TLS, and nothing but the Flower Fleet API, forwarded to a loopback SuperLink.

Why: Flower 1.41 serves its Fleet API (what SuperNodes use), its Control API (``flwr run/ls/stop``, ``flwr
supernode register``) and its Runtime API on one port, and the open-source Control API has no authentication.
Whoever reaches that port could start code on the coordinator, stop runs and register keys; the hospitals must
reach the port, so they are exactly who must be kept out of the Control API. ``fednnunet server`` therefore runs
the SuperLink on 127.0.0.1 and this gateway on the public address:

* only ``POST`` to the Fleet API's own routes (read from Flower's Fleet router, so an upgrade's routes follow) is
  forwarded; every other path or method (Control, Runtime, health, docs, anything unknown) is refused with 403
  and logged with the peer's address and the path;
* with ``--site-keys DIR`` (the registered sites' OpenSSH ``*.pub``), a request's Flower SuperNode-auth headers
  are checked *before any body byte is read*: the public key must be a registered one, the timestamp inside
  Flower's window and the signature valid (Flower's own primitives). Why: the SuperLink reads a whole body before
  it checks the signature, so unauthenticated bodies cost it memory it never gives back. A refused request gets
  401 and its connection is closed after at most uvicorn's read-ahead (64 KiB) of its body;
* a PushMessages body (bounded by :data:`PUSH_MESSAGES_MAX_BYTES`) is parsed and refused with 403 unless every
  message's ``metadata.src_node_id`` is the request's ``node.node_id``. Why: Flower checks only ``node`` against
  the signing key, so a site could push a reply as another site. No other Fleet request names a node inside its
  body besides the field Flower checks (``node`` or, for (de)activation/unregistration, ``node_id``; register and
  activate carry ``public_key``, which Flower compares with the signing key);
* any other body is streamed to the SuperLink, never held whole, and bounded by :data:`MAX_REQUEST_BYTES`
  (Flower moves arrays in chunks of ``FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE``, 5 MiB, one chunk per request);
  a request with both Content-Length and Transfer-Encoding (request smuggling) is refused with 400;
* proxy headers a peer sends (``X-Forwarded-For``, ``Forwarded``, ``X-Real-IP``, ...) are dropped, so the
  SuperLink never logs a peer-chosen address;
* connections are admitted per source address (an IPv6 /64 counts as one) so that no peer can starve the
  others (defaults, each a flag): at most :data:`PER_IP_CONNECTIONS` (16) open and :data:`PER_IP_HANDSHAKES` (4)
  in their TLS handshake per address, a handshake must end within :data:`HANDSHAKE_TIMEOUT_S` (10 s), a
  request's head within :data:`HEAD_TIMEOUT_S` (15 s), and a body may pause :data:`BODY_STALL_S` (30 s). At most
  :data:`MAX_CONNECTIONS` (256) connections are open, of which at most :data:`MAX_UNPROVEN` (192) are
  "unproven": from an address that has not sent a request signed by a registered key within
  :data:`PROVEN_TTL_S` (10 min), nor on this connection. The rest is kept for the registered sites. When the
  unproven share is full, a newcomer takes the slot of the oldest unproven connection of the address holding the
  most of them (if that address holds more than the newcomer's), so a crowd of addresses cannot lock a site out
  either. Without ``--site-keys`` nobody is proven: every connection counts as unproven.

TLS is done here, not by uvicorn: asyncio calls a protocol only after the handshake, too late to count
handshakes per address. Connections are accepted as plain TCP by :class:`GatewayConnection`, admitted, upgraded
with ``loop.start_tls`` (with a handshake timeout) and handed to uvicorn's HTTP/1.1 protocol (h11 parses every
byte; uvicorn reads the scheme from the TLS transport). It runs on asyncio's own event loop: with uvloop, some
upgraded connections stalled in tests. Starlette routes and httpx forwards, so no HTTP is parsed here and a
coordinator installs nothing else. Memory per connection is bounded: a head by h11 (16 KiB), an unread body by
uvicorn's flow control (64 KiB), a PushMessages body by :data:`PUSH_MESSAGES_MAX_BYTES` (buffered only after the
signature passed), other bodies are streamed.
"""

from __future__ import annotations

import argparse
import asyncio
import binascii
import datetime
import ipaddress
import logging
import ssl
import time
from base64 import b64decode
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Mapping

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger("fednnunet.gateway")

#: Headers that belong to one connection (RFC 9110 7.6.1) and are never forwarded.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                        "transfer-encoding", "upgrade", "host"})
#: Headers by which proxies tell who the client was: a peer must not choose what the SuperLink logs as its address.
PROXY_HEADERS = frozenset({"x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-forwarded-port",
                           "x-forwarded-prefix", "x-forwarded-server", "x-forwarded-ssl", "x-original-forwarded-for",
                           "forwarded", "x-real-ip", "x-client-ip", "x-cluster-client-ip", "true-client-ip",
                           "cf-connecting-ip", "fastly-client-ip", "x-originating-ip", "client-ip", "via"})
MAX_CONNECTIONS = 256
MAX_UNPROVEN = 192
PER_IP_CONNECTIONS = 16
PER_IP_HANDSHAKES = 4
HANDSHAKE_TIMEOUT_S = 10.0
HEAD_TIMEOUT_S = 15.0
BODY_STALL_S = 30.0
PROVEN_TTL_S = 600.0
#: A PushMessages request carries messages without content (that goes as objects) and their object trees.
PUSH_MESSAGES_MAX_BYTES = 1 << 20
#: An idle connection is kept this long for the SuperNode's next poll (it polls every 3 s when idle).
KEEP_ALIVE_S = 10
#: An idle connection to the SuperLink is reused only this long: its uvicorn closes idle ones after 5 s, and a
#: request sent on a connection being closed fails (a needless 502 and retry at the SuperNode).
UPSTREAM_KEEP_ALIVE_S = 2.0
#: Refusals of one address are logged at most this often (a flood would otherwise flood the log).
REFUSAL_LOG_INTERVAL_S = 10.0


def max_request_bytes() -> int:
    """Two array chunks plus 1 MiB of framing and JSON, and never below 16 MiB (see the module docstring)."""
    from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE

    return max(16 << 20, 2 * int(FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE) + (1 << 20))


MAX_REQUEST_BYTES = max_request_bytes()


def fleet_paths() -> frozenset[str]:
    """The Fleet API's routes, from Flower's own Fleet router."""
    from flwr.superlink.routers.fleet.router import router

    paths = frozenset(route.path for route in router.routes)
    if not paths or not all(p.startswith("/v1/fleet/") for p in paths):
        raise RuntimeError(f"unexpected Flower Fleet routes: {sorted(paths)}")
    return paths


def push_messages_path() -> str:
    """The Fleet route whose request is Flower's ``PushMessagesRequest`` (from the Fleet router's handlers)."""
    import typing

    from flwr.proto.fleet_pb2 import PushMessagesRequest
    from flwr.superlink.routers.fleet.router import router

    for route in router.routes:
        hint = typing.get_type_hints(route.endpoint, include_extras=True).get("request")
        if hint is not None and PushMessagesRequest in (hint, *typing.get_args(hint)):
            return route.path
    raise RuntimeError("Flower's Fleet router has no PushMessages route")


# ---------------------------------------------------------------------------------------------------------------
# SuperNode authentication, checked on the headers before a body is read
# ---------------------------------------------------------------------------------------------------------------

def load_site_keys(folder: Path) -> frozenset[bytes]:
    """The registered sites' public keys (OpenSSH ``*.pub`` in ``folder``) in the byte form Flower's SuperNodes
    send in their auth header (``public_key_to_bytes``)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    keys = set()
    for path in sorted(Path(folder).glob("*.pub")):
        key = serialization.load_ssh_public_key(path.read_bytes())
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise ValueError(f"{path}: not an EC public key (Flower SuperNode authentication needs one)")
        keys.add(public_key_to_bytes(key))
    if not keys:
        raise ValueError(f"no site public keys (*.pub) in {folder}")
    return frozenset(keys)


def node_auth_problem(headers: Mapping[str, str], registered: frozenset[bytes]) -> str | None:
    """Why a request's Flower node-auth headers fail (None when they pass): the same checks, with Flower's own
    constants and primitives, as the SuperLink's ``authenticate_node``, except the node id (it needs the
    SuperLink's state, and the SuperLink checks it after us), and with the key limited to registered ones."""
    from flwr.common.constant import SYSTEM_TIME_TOLERANCE, TIMESTAMP_HEADER, TIMESTAMP_TOLERANCE
    from flwr.supercore.constant import FLEET_HTTP_PUBLIC_KEY_HEADER, FLEET_HTTP_SIGNATURE_HEADER
    from flwr.supercore.date import now
    from flwr.supercore.primitives.asymmetric import bytes_to_public_key, verify_signature

    try:
        public_key = b64decode(headers[FLEET_HTTP_PUBLIC_KEY_HEADER], validate=True)
        signature = b64decode(headers[FLEET_HTTP_SIGNATURE_HEADER], validate=True)
        timestamp = headers[TIMESTAMP_HEADER]
    except KeyError:
        return "no SuperNode authentication headers"
    except (ValueError, binascii.Error):
        return "malformed SuperNode authentication headers"
    if public_key not in registered:
        return "public key not registered"
    try:
        age = (now() - datetime.datetime.fromisoformat(timestamp)).total_seconds()
        if not -SYSTEM_TIME_TOLERANCE < age < TIMESTAMP_TOLERANCE + SYSTEM_TIME_TOLERANCE:
            return "timestamp outside the allowed window"
        if not verify_signature(bytes_to_public_key(public_key), timestamp.encode("ascii"), signature):
            return "invalid signature"
    except (ValueError, TypeError, UnicodeError):
        return "malformed timestamp or signature"
    return None


def push_messages_problem(body: bytes) -> str | None:
    """Why a PushMessages body must not reach the SuperLink (None when it may): every message must come from the
    node named in the request (which the SuperLink ties to the signing key)."""
    from flwr.proto.fleet_pb2 import PushMessagesRequest
    from google.protobuf.message import DecodeError

    request = PushMessagesRequest()
    try:
        request.ParseFromString(body)
    except DecodeError:
        return "not a PushMessagesRequest"
    node_id = request.node.node_id
    for message in request.messages_list:
        if message.metadata.src_node_id != node_id:
            return f"message claims node {message.metadata.src_node_id}, request is from node {node_id}"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Admission: per-address and global connection caps
# ---------------------------------------------------------------------------------------------------------------

def source_of(host: str) -> str:
    """The "address" the caps count by: an IPv4 address (also when IPv4-mapped), or an IPv6 /64, which one
    subscriber usually holds whole (per IPv6 address, one peer could take any number of slots)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


@dataclass
class Limits:
    """Connection caps (see the module docstring)."""

    total: int = MAX_CONNECTIONS
    unproven: int = MAX_UNPROVEN
    per_ip: int = PER_IP_CONNECTIONS
    per_ip_handshakes: int = PER_IP_HANDSHAKES
    handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S
    proven_ttl_s: float = PROVEN_TTL_S


@dataclass(eq=False)
class Connection:
    """One accepted TCP connection as admission sees it."""

    ip: str  # the source the caps count by (:func:`source_of`)
    host: str  # the peer's address, as uvicorn reports it to the app
    port: int
    transport: asyncio.BaseTransport
    trusted: bool  # its address sent a request signed by a registered key (lately), or this connection did
    handshaking: bool = False
    opened: float = field(default_factory=time.monotonic)


class Admission:
    """Which connections are open, per address; decides whether a new one may be served.

    Why: uvicorn's ``limit_concurrency`` is one cap shared by every peer, so 100 slow connections from one
    address kept every site at 503. Here each address has its own cap, and connections from addresses that have
    not proven a registered key share a cap below the total, so the registered sites always find room.
    """

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.by_ip: dict[str, list[Connection]] = {}
        self.by_peer: dict[tuple[str, int], Connection] = {}
        self.proven_until: dict[str, float] = {}
        self._refusal_logged: dict[str, float] = {}
        self.refused = 0
        self.evicted = 0

    @property
    def open(self) -> int:
        return len(self.by_peer)

    def unproven(self) -> list[Connection]:
        return [c for c in self.by_peer.values() if not c.trusted]

    def _ip_proven(self, ip: str) -> bool:
        until = self.proven_until.get(ip)
        if until is not None and until < time.monotonic():
            del self.proven_until[ip]
            return False
        return until is not None

    def admit(self, host: str, port: int, transport: asyncio.BaseTransport,
              handshaking: bool) -> Connection | None:
        """Register a new connection, or refuse it (None; the caller closes it)."""
        limits = self.limits
        ip = source_of(host)
        mine = self.by_ip.get(ip, [])
        if len(mine) >= limits.per_ip:
            return self._refuse(ip, f"{len(mine)} connections open from this address")
        if handshaking and sum(c.handshaking for c in mine) >= limits.per_ip_handshakes:
            return self._refuse(ip, "too many TLS handshakes in progress from this address")
        trusted = self._ip_proven(ip)
        if self.open >= limits.total:
            return self._refuse(ip, f"{self.open} connections open in all")
        if not trusted:
            unproven = self.unproven()
            if len(unproven) >= limits.unproven and not self._evict_for(ip, unproven):
                return self._refuse(ip, f"{len(unproven)} unproven connections open")
        conn = Connection(ip, host, port, transport, trusted, handshaking)
        self.by_ip.setdefault(ip, []).append(conn)
        self.by_peer[(host, port)] = conn
        return conn

    def _evict_for(self, ip: str, unproven: list[Connection]) -> bool:
        """Close the oldest unproven connection of the address holding the most, if it holds more than ``ip``."""
        counts: dict[str, int] = {}
        for c in unproven:
            counts[c.ip] = counts.get(c.ip, 0) + 1
        top = max(counts, key=lambda k: counts[k])
        if counts[top] <= counts.get(ip, 0) + 1:
            return False
        victim = min((c for c in unproven if c.ip == top), key=lambda c: c.opened)
        self.release(victim)
        victim.transport.abort()
        self.evicted += 1
        self.log_limited(f"evict {top}", "closed the oldest unproven connection from %s (it holds %d) to admit "
                         "one from %s", top, counts[top], ip)
        return True

    def _refuse(self, ip: str, why: str) -> None:
        self.refused += 1
        self.log_limited(f"refuse {ip}", "refused a connection from %s: %s (logged at most every %.0f s per "
                         "address)", ip, why, REFUSAL_LOG_INTERVAL_S)
        return None

    def log_limited(self, what: str, message: str, *args: object, level: int = logging.WARNING) -> None:
        """Log ``what`` (an action and an address) at most every :data:`REFUSAL_LOG_INTERVAL_S`: a flood of
        connections would otherwise flood the log."""
        now = time.monotonic()
        if now - self._refusal_logged.get(what, -REFUSAL_LOG_INTERVAL_S) >= REFUSAL_LOG_INTERVAL_S:
            if len(self._refusal_logged) > 10000:  # many addresses: forget the stale ones (bounded memory)
                self._refusal_logged = {k: t for k, t in self._refusal_logged.items()
                                        if now - t < REFUSAL_LOG_INTERVAL_S}
            self._refusal_logged[what] = now
            logger.log(level, message, *args)

    def release(self, conn: Connection) -> None:
        """Forget a closed connection (idempotent)."""
        if self.by_peer.get((conn.host, conn.port)) is conn:
            del self.by_peer[(conn.host, conn.port)]
        mine = self.by_ip.get(conn.ip)
        if mine is not None and conn in mine:
            mine.remove(conn)
            if not mine:
                del self.by_ip[conn.ip]

    def prove(self, host: str, port: int) -> None:
        """The connection ``host:port`` sent a request signed by a registered key: it and its address are
        trusted (addresses of registered sites only, so this stays small)."""
        conn = self.by_peer.get((host, port))
        if conn is not None:
            conn.trusted = True
            self.proven_until[conn.ip] = time.monotonic() + self.limits.proven_ttl_s


# ---------------------------------------------------------------------------------------------------------------
# The HTTP application
# ---------------------------------------------------------------------------------------------------------------

class _RequestTooLarge(Exception):
    pass


class _BodyStalled(Exception):
    pass


async def _bounded(stream: AsyncIterator[bytes], limit: int, stall_s: float) -> AsyncIterator[bytes]:
    """The request body as it arrives, failing when it exceeds ``limit`` bytes or stalls for ``stall_s``."""
    total = 0
    iterator = stream.__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(iterator.__anext__(), stall_s)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise _BodyStalled from None
        total += len(chunk)
        if total > limit:
            raise _RequestTooLarge
        yield chunk


def _activation_refused(problem: str) -> Response:
    """Flower's own error reply to a SuperNode whose activation fails (its catalog entry and payload), so that a
    refused SuperNode logs and exits as it does when the SuperLink refuses it ("Failed to activate SuperNode"),
    which is what ``fednnunet client`` reads to tell its user the key is not registered. Connection closed."""
    from fastapi.responses import JSONResponse
    from flwr.supercore.error.base import ApiErrorCode, FlowerError
    from flwr.supercore.error.catalog import API_ERROR_MAP

    spec = API_ERROR_MAP[ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED]
    error = FlowerError(ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED, problem)
    return JSONResponse(error.to_json(spec.public_message), spec.http_status_code,
                        headers={**(spec.http_headers or {}), "connection": "close"})


def _refusal(status: int, text: str) -> Response:
    """A short refusal that also closes the connection (its body, if any, is not read)."""
    return PlainTextResponse(f"{status}: {text}\n", status, headers={"connection": "close"})


def create_app(upstream: str, upstream_ca: Path | None = None, body_stall_s: float = BODY_STALL_S,
               site_keys: frozenset[bytes] | None = None, admission: Admission | None = None) -> Starlette:
    """The gateway's ASGI app forwarding the Fleet API to ``upstream`` (``https://127.0.0.1:PORT``); with
    ``site_keys``, only requests signed by one of them are forwarded."""
    allowed = fleet_paths()
    push_path = push_messages_path()
    activation_paths = {p for p in allowed if p.endswith(("/register-node", "/activate-node"))}
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(upstream_ca)) if upstream_ca else True
    client = httpx.AsyncClient(base_url=upstream, verify=verify, timeout=httpx.Timeout(600.0, connect=10.0),
                               limits=httpx.Limits(max_connections=MAX_CONNECTIONS,
                                                   keepalive_expiry=UPSTREAM_KEEP_ALIVE_S))

    async def forward(request: Request) -> Response:
        peer = f"{request.client.host}:{request.client.port}" if request.client else "?"
        path = request.url.path
        if request.method != "POST" or path not in allowed:
            logger.warning("refused %s %s from %s: only the Flower Fleet API is served here", request.method,
                           path, peer)
            return _refusal(403, "only the Flower Fleet API (SuperNode traffic) is served here")
        length = request.headers.get("content-length")
        if length is not None and "transfer-encoding" in request.headers:
            logger.warning("refused POST %s from %s: both Content-Length and Transfer-Encoding", path, peer)
            return _refusal(400, "both Content-Length and Transfer-Encoding")
        limit = PUSH_MESSAGES_MAX_BYTES if path == push_path else MAX_REQUEST_BYTES
        if length is not None and (not length.isdigit() or int(length) > limit):
            logger.warning("refused POST %s from %s: body of %s bytes exceeds %d", path, peer, length, limit)
            return _refusal(413, f"request body larger than {limit} bytes")
        if site_keys is not None:
            problem = node_auth_problem(request.headers, site_keys)
            if problem is not None:
                logger.warning("refused POST %s from %s: %s", path, peer, problem)
                if path in activation_paths:  # answered as the SuperLink would: the SuperNode says why it stops
                    return _activation_refused(problem)
                return _refusal(401, "SuperNode authentication failed")
            if admission is not None and request.client:
                admission.prove(request.client.host, request.client.port)
        headers = [(k, v) for k, v in request.headers.raw
                   if k.decode("latin-1").lower() not in HOP_BY_HOP | PROXY_HEADERS]
        body = _bounded(request.stream(), limit, body_stall_s)
        try:
            if path == push_path:
                content: bytes | AsyncIterator[bytes] = b"".join([chunk async for chunk in body])
                problem = push_messages_problem(content)
                if problem is not None:
                    logger.warning("refused POST %s from %s: %s", path, peer, problem)
                    return _refusal(403, "a pushed message must come from the node that sends it")
            else:
                content = body
            reply = await client.send(client.build_request("POST", path, headers=headers, content=content),
                                      stream=True)
        except _RequestTooLarge:
            logger.warning("refused POST %s from %s: body exceeds %d bytes", path, peer, limit)
            return _refusal(413, f"request body larger than {limit} bytes")
        except (_BodyStalled, ClientDisconnect):
            logger.warning("dropped POST %s from %s: the body stalled or the peer left", path, peer)
            return _refusal(408, "request body not received in time")
        except httpx.HTTPError as err:
            logger.error("SuperLink unreachable for POST %s from %s: %s", path, peer, err)
            return PlainTextResponse("502: the federation's SuperLink is not reachable\n", 502)
        reply_headers = {k: v for k, v in reply.headers.items() if k.lower() not in HOP_BY_HOP}
        return StreamingResponse(reply.aiter_raw(), status_code=reply.status_code, headers=reply_headers,
                                 background=BackgroundTask(reply.aclose))

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)], lifespan=lifespan)


# ---------------------------------------------------------------------------------------------------------------
# Connections: admission, TLS, then uvicorn's HTTP/1.1
# ---------------------------------------------------------------------------------------------------------------

class BoundedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline for each request's head (uvicorn has none: a peer could hold
    a connection open forever by sending its headers one byte at a time), which tells admission when its
    connection closes."""

    head_timeout_s = HEAD_TIMEOUT_S
    admission: Admission | None = None
    admitted: Connection | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.admission is not None and self.admitted is not None:
            self.admission.release(self.admitted)
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_deadline()

    def _arm_head_deadline(self) -> None:
        self.loop.call_later(self.head_timeout_s, self._head_deadline, self.cycle)

    def _head_deadline(self, cycle_when_armed: object) -> None:
        if self.cycle is cycle_when_armed and not self.transport.is_closing():
            ip, port = self.client or ("?", 0)
            if self.admission is not None:
                self.admission.log_limited(f"head {ip}", "closed a connection from %s:%s: no request within %.0f s",
                                           ip, port, self.head_timeout_s)
            else:
                logger.warning("closed a connection from %s:%s: no request within %.0f s", ip, port,
                               self.head_timeout_s)
            self.transport.close()


class _Holding(asyncio.Protocol):
    """Holds what arrives between the end of a TLS handshake and the hand-over to HTTP (pausing past 64 KiB)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.lost: tuple[Exception | None] | None = None
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data
        if len(self.data) > 65536 and self.transport is not None:
            self.transport.pause_reading()  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = (exc,)


class GatewayConnection(asyncio.Protocol):
    """What uvicorn creates for each accepted TCP connection (passed as its ``http`` class): admits it (or
    closes it at once), does the TLS handshake with a deadline, then hands the connection to
    :class:`BoundedH11Protocol`. Class attributes are set by :func:`serve`."""

    admission: Admission
    ssl_context: ssl.SSLContext | None = None
    http_class: type[BoundedH11Protocol] = BoundedH11Protocol

    def __init__(self, config: uvicorn.Config, server_state: Any, app_state: dict[str, Any],  # noqa: ANN401
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._kwargs = {"config": config, "server_state": server_state, "app_state": app_state, "_loop": _loop}
        self.loop = _loop or asyncio.get_event_loop()
        self.conn: Connection | None = None
        self.task: asyncio.Task | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        peer = transport.get_extra_info("peername") or ("?", 0)
        self.conn = self.admission.admit(str(peer[0]), int(peer[1]), transport, self.ssl_context is not None)
        if self.conn is None:
            transport.abort()
            return
        if self.ssl_context is None:
            self._hand_over(transport, b"", None)
            return
        # start_tls resumes reading: the ClientHello stays in the socket until then
        transport.pause_reading()  # type: ignore[attr-defined]
        self.task = self.loop.create_task(self._upgrade(transport))

    def data_received(self, data: bytes) -> None:  # reading is paused until start_tls takes the transport
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn is not None:
            self.admission.release(self.conn)
        if self.task is not None:
            self.task.cancel()

    async def _upgrade(self, transport: asyncio.BaseTransport) -> None:
        conn = self.conn
        assert conn is not None and self.ssl_context is not None
        holding = _Holding()
        try:
            tls = await self.loop.start_tls(
                transport, holding, self.ssl_context, server_side=True,  # type: ignore[arg-type]
                ssl_handshake_timeout=self.admission.limits.handshake_timeout_s)
        except asyncio.CancelledError:
            transport.abort()
            self.admission.release(conn)
            raise
        except Exception as err:  # noqa: BLE001 - any failed handshake (timeout, reset, bad TLS) ends the same way
            self.admission.log_limited(f"handshake {conn.ip}", "TLS handshake with %s:%d failed: %s", conn.host,
                                       conn.port, type(err).__name__, level=logging.INFO)
            transport.abort()
            self.admission.release(conn)
            return
        self.task = None
        conn.handshaking = False
        if tls is None:
            self.admission.release(conn)
            return
        holding.transport = tls
        self._hand_over(tls, bytes(holding.data), holding.lost)  # type: ignore[arg-type]

    def _hand_over(self, transport: asyncio.Transport, data: bytes, lost: tuple[Exception | None] | None) -> None:
        assert self.conn is not None
        http = self.http_class(**self._kwargs)
        http.admission = self.admission
        http.admitted = self.conn
        self.conn = None  # from now on the HTTP protocol releases it
        transport.set_protocol(http)
        http.connection_made(transport)
        if data:
            http.data_received(data)
        if lost is not None:
            http.connection_lost(lost[0])
        elif transport.is_reading() is False and not transport.is_closing():
            transport.resume_reading()


def server_ssl_context(certfile: Path, keyfile: Path) -> ssl.SSLContext:
    """TLS 1.2+ with the coordinator's certificate."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(certfile), str(keyfile))
    return context


def serve(listen_host: str, listen_port: int, upstream: str, upstream_ca: Path | None,
          certfile: Path | None, keyfile: Path | None, head_timeout_s: float = HEAD_TIMEOUT_S,
          body_stall_s: float = BODY_STALL_S, site_keys_dir: Path | None = None,
          limits: Limits | None = None) -> None:
    """Serve until terminated (uvicorn handles SIGTERM/SIGINT)."""
    limits = limits or Limits()
    admission = Admission(limits)
    site_keys = load_site_keys(site_keys_dir) if site_keys_dir is not None else None
    http = type("GatewayH11Protocol", (BoundedH11Protocol,), {"head_timeout_s": head_timeout_s})
    context = server_ssl_context(certfile, keyfile) if certfile else None
    accept = type("GatewayAccept", (GatewayConnection,), {"admission": admission, "ssl_context": context,
                                                          "http_class": http})
    config = uvicorn.Config(create_app(upstream, upstream_ca, body_stall_s, site_keys, admission),
                            host=listen_host, port=listen_port, http=accept,  # type: ignore[arg-type]
                            timeout_keep_alive=KEEP_ALIVE_S, access_log=False, loop="asyncio", lifespan="on",
                            log_level="warning")
    logger.warning("gateway on %s:%d (%s) forwards the Flower Fleet API only to %s; requests up to %d bytes; %s; "
                   "connections: %d per address (%d in TLS handshake, %.0f s), %d unproven, %d in all",
                   listen_host, listen_port, "TLS" if certfile else "no TLS", upstream, MAX_REQUEST_BYTES,
                   f"{len(site_keys)} registered site keys" if site_keys else "no SuperNode auth check here",
                   limits.per_ip, limits.per_ip_handshakes, limits.handshake_timeout_s, limits.unproven,
                   limits.total)
    uvicorn.Server(config).run()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="FednnU-Net coordinator gateway (started by `fednnunet server`)")
    parser.add_argument("--listen", required=True, help="HOST:PORT served to the sites")
    parser.add_argument("--upstream", required=True, help="the SuperLink's loopback URL, e.g. https://127.0.0.1:P")
    parser.add_argument("--upstream-ca", default=None, help="CA certificate of the SuperLink's loopback TLS")
    parser.add_argument("--certfile", default=None, help="server certificate served to the sites (TLS)")
    parser.add_argument("--keyfile", default=None)
    parser.add_argument("--site-keys", default=None, metavar="DIR",
                        help="folder of the registered sites' OpenSSH *.pub keys: only requests signed by one of "
                             "them are forwarded (checked before the body is read)")
    parser.add_argument("--head-timeout", type=float, default=HEAD_TIMEOUT_S,
                        help="seconds a connection may take to send a request's head")
    parser.add_argument("--body-stall", type=float, default=BODY_STALL_S,
                        help="seconds a request body may pause")
    parser.add_argument("--handshake-timeout", type=float, default=HANDSHAKE_TIMEOUT_S,
                        help="seconds a TLS handshake may take")
    parser.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS, help="open connections in all")
    parser.add_argument("--max-unproven", type=int, default=MAX_UNPROVEN,
                        help="open connections from addresses not (lately) proven by a registered key")
    parser.add_argument("--per-ip", type=int, default=PER_IP_CONNECTIONS, help="open connections per address")
    parser.add_argument("--per-ip-handshakes", type=int, default=PER_IP_HANDSHAKES,
                        help="connections per address in their TLS handshake")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per forwarded request
    host, _, port = args.listen.rpartition(":")
    limits = Limits(total=args.max_connections, unproven=min(args.max_unproven, args.max_connections),
                    per_ip=args.per_ip, per_ip_handshakes=args.per_ip_handshakes,
                    handshake_timeout_s=args.handshake_timeout)
    serve(host.strip("[]"), int(port), args.upstream, Path(args.upstream_ca) if args.upstream_ca else None,
          Path(args.certfile) if args.certfile else None, Path(args.keyfile) if args.keyfile else None,
          args.head_timeout, args.body_stall, Path(args.site_keys) if args.site_keys else None, limits)


if __name__ == "__main__":
    main()

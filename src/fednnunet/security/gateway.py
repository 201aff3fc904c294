"""The coordinator's only open port: TLS, and nothing but the Flower Fleet API, forwarded to a loopback SuperLink.

Why: Flower 1.41 serves its Fleet API (what SuperNodes use), its Control API (``flwr run/ls/stop``, ``flwr
supernode register``) and its Runtime API on one port, and the open-source Control API has no authentication.
Whoever reaches that port could start code on the coordinator, stop runs and register keys; the hospitals must
reach the port, so they are exactly who must be kept out of the Control API. ``fednnunet server`` therefore runs
the SuperLink on 127.0.0.1 and this gateway on the public address:

* only ``POST`` to the Fleet API's own routes (read from Flower's Fleet router, so an upgrade's routes follow) is
  forwarded; every other path or method (Control, Runtime, health, docs, anything unknown) is refused with 403
  and logged with the peer's address and the path;
* a request body is streamed to the SuperLink, never held whole, and bounded by :data:`MAX_REQUEST_BYTES`
  (Flower moves arrays in chunks of ``FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE``, 5 MiB, one chunk per request; the
  largest other request is a message's JSON body, a fingerprint of thousands of cases, well below 1 MiB);
* a peer that does not send a request's head within :data:`HEAD_TIMEOUT_S`, or stalls in its body for
  :data:`BODY_STALL_S`, is disconnected; at most :data:`MAX_CONNECTIONS` connections are served at once.

It is built on the HTTP stack Flower itself runs on: uvicorn's HTTP/1.1 server (h11 parses every byte) with TLS,
starlette for the routing and httpx for the upstream, so no HTTP is parsed here and a coordinator installs nothing
else. SuperNode authentication passes through untouched (the SuperLink checks every request's signature).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import ssl
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

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
MAX_CONNECTIONS = 64
HEAD_TIMEOUT_S = 15.0
BODY_STALL_S = 30.0
#: An idle connection is kept this long for the SuperNode's next poll (it polls every 3 s when idle).
KEEP_ALIVE_S = 10
#: An idle connection to the SuperLink is reused only this long: its uvicorn closes idle ones after 5 s, and a
#: request sent on a connection being closed fails (a needless 502 and retry at the SuperNode).
UPSTREAM_KEEP_ALIVE_S = 2.0


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


def create_app(upstream: str, upstream_ca: Path | None = None, body_stall_s: float = BODY_STALL_S) -> Starlette:
    """The gateway's ASGI app forwarding the Fleet API to ``upstream`` (``https://127.0.0.1:PORT``)."""
    allowed = fleet_paths()
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
            return PlainTextResponse("403: only the Flower Fleet API (SuperNode traffic) is served here\n", 403)
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_REQUEST_BYTES):
            logger.warning("refused POST %s from %s: body of %s bytes exceeds %d", path, peer, length,
                           MAX_REQUEST_BYTES)
            return PlainTextResponse(f"413: request body larger than {MAX_REQUEST_BYTES} bytes\n", 413)
        headers = [(k, v) for k, v in request.headers.raw if k.decode("latin-1").lower() not in HOP_BY_HOP]
        outgoing = client.build_request("POST", path, headers=headers,
                                        content=_bounded(request.stream(), MAX_REQUEST_BYTES, body_stall_s))
        try:
            reply = await client.send(outgoing, stream=True)
        except _RequestTooLarge:
            logger.warning("refused POST %s from %s: body exceeds %d bytes", path, peer, MAX_REQUEST_BYTES)
            return PlainTextResponse(f"413: request body larger than {MAX_REQUEST_BYTES} bytes\n", 413)
        except (_BodyStalled, ClientDisconnect):
            logger.warning("dropped POST %s from %s: the body stalled or the peer left", path, peer)
            return PlainTextResponse("408: request body not received in time\n", 408)
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


class BoundedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline for each request's head (uvicorn has none: a peer could hold
    a connection open forever by sending its headers one byte at a time). Passed as uvicorn's ``http`` class."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_deadline()

    head_timeout_s = HEAD_TIMEOUT_S

    def _arm_head_deadline(self) -> None:
        self.loop.call_later(self.head_timeout_s, self._head_deadline, self.cycle)

    def _head_deadline(self, cycle_when_armed: object) -> None:
        if self.cycle is cycle_when_armed and not self.transport.is_closing():
            logger.warning("closed a connection from %s: no request within %.0f s",
                           "%s:%s" % self.client if self.client else "?", self.head_timeout_s)
            self.transport.close()


def serve(listen_host: str, listen_port: int, upstream: str, upstream_ca: Path | None,
          certfile: Path | None, keyfile: Path | None, head_timeout_s: float = HEAD_TIMEOUT_S,
          body_stall_s: float = BODY_STALL_S) -> None:
    """Serve until terminated (uvicorn handles SIGTERM/SIGINT)."""
    protocol = type("GatewayH11Protocol", (BoundedH11Protocol,), {"head_timeout_s": head_timeout_s})
    config = uvicorn.Config(create_app(upstream, upstream_ca, body_stall_s), host=listen_host, port=listen_port,
                            http=protocol, ssl_certfile=str(certfile) if certfile else None,
                            ssl_keyfile=str(keyfile) if keyfile else None, limit_concurrency=MAX_CONNECTIONS,
                            timeout_keep_alive=KEEP_ALIVE_S, access_log=False, lifespan="on", log_level="warning")
    logger.warning("gateway on %s:%d (%s) forwards the Flower Fleet API only to %s; requests up to %d bytes",
                   listen_host, listen_port, "TLS" if certfile else "no TLS", upstream, MAX_REQUEST_BYTES)
    uvicorn.Server(config).run()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="FednnU-Net coordinator gateway (started by `fednnunet server`)")
    parser.add_argument("--listen", required=True, help="HOST:PORT served to the sites")
    parser.add_argument("--upstream", required=True, help="the SuperLink's loopback URL, e.g. https://127.0.0.1:P")
    parser.add_argument("--upstream-ca", default=None, help="CA certificate of the SuperLink's loopback TLS")
    parser.add_argument("--certfile", default=None, help="server certificate served to the sites (TLS)")
    parser.add_argument("--keyfile", default=None)
    parser.add_argument("--head-timeout", type=float, default=HEAD_TIMEOUT_S,
                        help="seconds a connection may take to send a request's head")
    parser.add_argument("--body-stall", type=float, default=BODY_STALL_S,
                        help="seconds a request body may pause")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host, _, port = args.listen.rpartition(":")
    serve(host.strip("[]"), int(port), args.upstream, Path(args.upstream_ca) if args.upstream_ca else None,
          Path(args.certfile) if args.certfile else None, Path(args.keyfile) if args.keyfile else None,
          args.head_timeout, args.body_stall)


if __name__ == "__main__":
    main()

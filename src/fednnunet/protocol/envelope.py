"""The JSON body of every message between coordinator and site, built and read only here.

Request: ``{"op": OP, "config": <request fields>}`` plus ``"site"``: the name the coordinator knows the receiving
node's key by (registered keys only; the site refuses a name that is not its own). Reply: ``{"ok": true,
"result": <reply fields>}``, or ``{"ok": false, "error": MESSAGE, "kind": ErrorKind}``. Arrays travel beside the
body (:mod:`fednnunet.flower.messages`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

from fednnunet.protocol.codec import WireError, decode, encode
from fednnunet.protocol.errors import ErrorKind, SiteError
from fednnunet.protocol.messages import REQUESTS, Op, Reply, Request


def request_body(request: Request, site: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"op": request.OP.value, "config": encode(request)}
    if site is not None:
        body["site"] = site
    return body


def read_request(body: Mapping[str, Any]) -> tuple[Request, str | None]:
    """The request a body holds and the site name the coordinator addressed it to (None: not said).

    Raises :class:`WireError` for an unknown operation or a request without its operation's shape."""
    op, site = body.get("op"), body.get("site")
    try:
        cls = REQUESTS[Op(op)]
    except ValueError:
        raise WireError(f"unknown operation {op!r}") from None
    if site is not None and not isinstance(site, str):
        raise WireError(f"{op} request: the site name is not a string")
    return decode(cls, body.get("config", {}), f"{op} request"), site


def ok_body(reply: Reply) -> dict[str, Any]:
    return {"ok": True, "result": encode(reply)}


def error_body(kind: ErrorKind, message: str) -> dict[str, Any]:
    return {"ok": False, "error": message, "kind": kind.value}


def read_reply(request_cls: type[Request], body: Any, site: str) -> Reply | SiteError:
    """The typed reply of ``site`` to a request of ``request_cls``, or its error (kind and message).

    A body that is not one of the two shapes is a :data:`ErrorKind.MALFORMED_REPLY` error; so is an error kind this
    version does not know (kept as FAILED would hide a fault)."""
    op = request_cls.OP.value
    if not isinstance(body, Mapping) or not isinstance(body.get("ok"), bool):
        return SiteError(f"malformed reply to {op}: no ok field", ErrorKind.MALFORMED_REPLY)
    if not body["ok"]:
        message = body.get("error")
        try:
            kind = ErrorKind(body.get("kind"))
        except ValueError:
            return SiteError(f"{op}: {str(message)[:2000]} (malformed error kind {body.get('kind')!r})",
                             ErrorKind.MALFORMED_REPLY)
        return SiteError(str(message)[:20000] if message is not None else "unknown error", kind)
    try:
        reply = decode(request_cls.REPLY, body.get("result"), f"site {site}: {op} reply")
    except WireError as err:
        return SiteError(f"malformed reply: {err}", ErrorKind.MALFORMED_REPLY)
    return reply if reply.site else replace(reply, site=site)

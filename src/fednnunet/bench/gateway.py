"""``fednnunet bench gateway``: the coordinator's gateway under the attacks of issue 24 (slow connections,
unauthenticated bodies), with a real SuperLink (TLS, SuperNode authentication) behind it.

What is measured, all on this machine over loopback:

* the time a registered site needs for a fixed series of signed Fleet requests (ActivateNode, then PullMessages,
  each on a new TLS connection as a reconnecting SuperNode makes them; a refused try is retried after 0.2 s), with
  no attack, with 100 slow-head connections from one address, and with 100 from ten addresses. Attack addresses
  are loopback aliases (127.0.0.2 ...): the gateway keys its caps by source address and Linux serves all of
  127/8 on ``lo`` without setup, so no root is needed;
* the SuperLink's peak RSS (``VmHWM``) while 32 connections each send a 16 MiB body without valid SuperNode
  authentication, through a gateway without ``--site-keys`` (before) and with it (after).
* a whole federated job through ``fednnunet server`` and two ``fednnunet client`` hospitals (TLS, their keys;
  federated fingerprint extraction of two tiny synthetic sites: SuperNodes joining, four round trips, release):
  its wall time from the clients' start to the server's exit, with no attack and under the two slow-head attacks.

The attack and request helpers here are also what ``tests/test_gateway_attacks.py`` uses, so the benchmark and
the tests exercise one implementation. ``python -m fednnunet.bench.gateway slow-heads ...`` runs the slow-head
attacker as its own process (so its connections do not compete with the measured client's event loop).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from base64 import b64encode
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import httpx

logger = logging.getLogger(__name__)

SLOW_HEAD = b"POST /v1/fleet/pull-messages HTTP/1.1\r\nHost: coordinator\r\nX-Pad: "


# ---------------------------------------------------------------------------------------------------------------
# A registered site's requests, signed as Flower's SuperNode signs them
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class SiteKey:
    """A site's OpenSSH private key (``fednnunet certs``), signing requests like Flower's
    ``NodeAuthHttpInterceptor``."""

    path: Path

    def __post_init__(self) -> None:
        from cryptography.hazmat.primitives import serialization
        from flwr.supercore.primitives.asymmetric import public_key_to_bytes

        self.private = serialization.load_ssh_private_key(self.path.read_bytes(), password=None)
        self.public_bytes = public_key_to_bytes(self.private.public_key())  # type: ignore[arg-type]

    def headers(self) -> dict[str, str]:
        from flwr.common.constant import TIMESTAMP_HEADER
        from flwr.supercore.constant import FLEET_HTTP_PUBLIC_KEY_HEADER, FLEET_HTTP_SIGNATURE_HEADER
        from flwr.supercore.date import now
        from flwr.supercore.primitives.asymmetric import sign_message

        timestamp = now().isoformat()
        signature = sign_message(self.private, timestamp.encode("ascii"))  # type: ignore[arg-type]
        return {FLEET_HTTP_PUBLIC_KEY_HEADER: b64encode(self.public_bytes).decode("ascii"),
                TIMESTAMP_HEADER: timestamp, FLEET_HTTP_SIGNATURE_HEADER: b64encode(signature).decode("ascii")}


def fleet_post(base_url: str, ca: Path | None, path: str, body: bytes, key: SiteKey | None,
               timeout_s: float = 30.0, extra: dict[str, str] | None = None,
               source: str | None = None) -> httpx.Response:
    """One Fleet request on a new connection (protobuf body, from address ``source`` when given), signed with
    ``key`` when given."""
    headers = {"content-type": "application/protobuf", "accept": "application/protobuf"}
    if key is not None:
        headers.update(key.headers())
    headers.update(extra or {})
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(ca)) if ca else False
    transport = httpx.HTTPTransport(verify=verify, local_address=source)
    with httpx.Client(base_url=base_url, transport=transport, timeout=timeout_s) as client:
        return client.post(path, content=body, headers=headers)


def activate(base_url: str, ca: Path | None, key: SiteKey) -> int:
    """Activate the site's node (Flower's ActivateNode, as a SuperNode starts) and return its node id."""
    from flwr.proto.fleet_pb2 import ActivateNodeRequest, ActivateNodeResponse

    reply = fleet_post(base_url, ca, "/v1/fleet/activate-node",
                       ActivateNodeRequest(public_key=key.public_bytes, heartbeat_interval=60.0)
                       .SerializeToString(), key)
    reply.raise_for_status()
    response = ActivateNodeResponse()
    response.ParseFromString(reply.content)
    return response.node_id


def site_requests(base_url: str, ca: Path, key: SiteKey, node_id: int, requests: int = 10,
                  deadline_s: float = 60.0, source: str | None = None) -> dict:
    """Time a registered site's ``requests`` Fleet requests (SendNodeHeartbeat and PullMessages in turn, as an
    idle SuperNode sends them), each on a new connection and retried until it succeeds; ``failed_tries`` counts
    refusals and errors on the way."""
    from flwr.proto.fleet_pb2 import PullMessagesRequest
    from flwr.proto.heartbeat_pb2 import SendNodeHeartbeatRequest
    from flwr.proto.node_pb2 import Node

    started = time.monotonic()
    failed = 0
    done = 0
    while done < requests and time.monotonic() - started < deadline_s:
        node = Node(node_id=node_id)
        path, body = (("/v1/fleet/send-node-heartbeat", SendNodeHeartbeatRequest(node=node, heartbeat_interval=60.0))
                      if done % 2 == 0 else ("/v1/fleet/pull-messages", PullMessagesRequest(node=node)))
        try:
            fleet_post(base_url, ca, path, body.SerializeToString(), key, timeout_s=10.0,
                       source=source).raise_for_status()
            done += 1
        except (httpx.HTTPError, OSError):
            failed += 1
            time.sleep(0.2)
    return {"requests": requests, "succeeded": done, "failed_tries": failed,
            "seconds": round(time.monotonic() - started, 3)}


# ---------------------------------------------------------------------------------------------------------------
# Attackers
# ---------------------------------------------------------------------------------------------------------------

def _client_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def _slow_head_loop(host: str, port: int, source: str, tls: bool, interval_s: float, until: float,
                          stats: dict[str, int], tried: asyncio.Event) -> None:
    """One attacker slot: connect from ``source``, send a request head one byte per ``interval_s``, and reconnect
    at once whenever the gateway closes the connection (``tried`` is set once the first try is decided)."""
    while time.monotonic() < until:
        writer = None
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(
                host, port, ssl=_client_context() if tls else None, local_addr=(source, 0),
                server_hostname="" if tls else None), 15)
            stats["connected"] += 1
            writer.write(SLOW_HEAD)
            await writer.drain()
            tried.set()
            while time.monotonic() < until:
                await asyncio.sleep(interval_s)
                writer.write(b"a")
                await writer.drain()
                if writer.is_closing():
                    break
        except (OSError, asyncio.TimeoutError, ssl.SSLError, ConnectionError):
            stats["cut"] += 1
            tried.set()
            await asyncio.sleep(0.05)
        finally:
            if writer is not None:
                writer.transport.abort()


async def slow_heads(host: str, port: int, sources: list[str], count: int, seconds: float, tls: bool = True,
                     interval_s: float = 1.0) -> dict[str, int]:
    """``count`` slow-head connections spread over ``sources``, kept up for ``seconds``."""
    stats = {"connected": 0, "cut": 0}
    until = time.monotonic() + seconds
    tried = [asyncio.Event() for _ in range(count)]

    async def ready() -> None:  # every slot has tried once: the attack is at full strength
        for event in tried:
            await event.wait()
        print(f"ready {stats}", flush=True)

    await asyncio.gather(ready(), *(_slow_head_loop(host, port, sources[i % len(sources)], tls, interval_s, until,
                                                    stats, tried[i]) for i in range(count)))
    return stats


@contextmanager
def slow_head_attack(host: str, port: int, sources: list[str], count: int = 100, seconds: float = 600.0,
                     tls: bool = True, log: Path | None = None, settle_s: float = 1.0) -> Iterator[None]:
    """The slow-head attack as its own process while the ``with`` block runs, entered once every connection
    has been tried (at most 60 s) and ``settle_s`` more."""
    cmd = [sys.executable, "-m", "fednnunet.bench.gateway", "slow-heads", "--target", f"{host}:{port}",
           "--sources", ",".join(sources), "--count", str(count), "--seconds", str(seconds)]
    if not tls:
        cmd.append("--plain")
    out = log.open("w") if log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=out, text=True)
    try:
        wait_ready(proc, 60.0)
        time.sleep(settle_s)
        yield
    finally:
        _stop(proc, 15)
        if log:
            out.close()  # type: ignore[union-attr]


def _stop(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM, then SIGKILL if ``proc`` is still running ``grace_s`` later."""
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_ready(proc: subprocess.Popen, timeout_s: float) -> str:
    """Until a helper process of :func:`main` prints its ``ready`` line (returned); it fails otherwise."""
    import selectors

    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)  # type: ignore[arg-type]
        if not selector.select(timeout_s):
            raise RuntimeError(f"the helper was not ready within {timeout_s:.0f} s")
    line = proc.stdout.readline()  # type: ignore[union-attr]
    if not line.startswith("ready"):
        raise RuntimeError(f"the helper failed: {line!r}")
    return line.strip()


async def _one_body(host: str, port: int, path: str, size: int, headers: bytes, source: str | None) -> str:
    """Send a request with a ``size``-byte body; the status line's code, or how the connection ended."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            host, port, ssl=_client_context(), server_hostname="", local_addr=(source, 0) if source else None), 30)
    except (OSError, asyncio.TimeoutError, ssl.SSLError) as err:
        return f"no connection ({type(err).__name__})"
    try:
        writer.write(b"POST %s HTTP/1.1\r\nHost: coordinator\r\nContent-Type: application/protobuf\r\n%s"
                     b"Content-Length: %d\r\n\r\n" % (path.encode(), headers, size))
        piece = b"\x00" * (256 << 10)
        sent = 0
        while sent < size:
            writer.write(piece[:size - sent])
            sent += len(piece[:size - sent])
            await asyncio.wait_for(writer.drain(), 60)
        line = await asyncio.wait_for(reader.readline(), 120)
    except (OSError, asyncio.TimeoutError, ssl.SSLError, ConnectionError):
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
        except (OSError, asyncio.TimeoutError, ssl.SSLError, ConnectionError):
            line = b""
    finally:
        writer.transport.abort()
    parts = line.split(b" ")
    return parts[1].decode() if len(parts) > 1 else "closed"


async def unauthenticated_bodies(host: str, port: int, count: int = 32, size: int = 16 << 20,
                                 path: str = "/v1/fleet/push-object", headers: bytes = b"",
                                 subnet: str | None = "127.0.3") -> list[str]:
    """``count`` concurrent requests with ``size``-byte bodies and no valid SuperNode authentication
    (``headers`` may add forged ones); their outcomes. Each comes from its own address ``subnet.N`` (so the
    per-address connection caps do not stop them before the authentication check does)."""
    return list(await asyncio.gather(*(_one_body(host, port, path, size, headers,
                                                 f"{subnet}.{i + 1}" if subnet else None) for i in range(count))))


def peak_rss_mb(pid: int) -> float:
    """A process's peak resident memory so far (Linux ``VmHWM``), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


# ---------------------------------------------------------------------------------------------------------------
# A SuperLink with SuperNode authentication and this gateway in front of it
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Stack:
    """What :func:`coordinator` started: the gateway's address and files, and the SuperLink."""

    server: object  # fednnunet.federation.server_node.ServerNode
    port: int
    tls: Path
    gateway: subprocess.Popen
    gateway_log: Path

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca(self) -> Path:
        return self.tls / "ca.crt"

    def site_key(self, name: str = "site1") -> SiteKey:
        return SiteKey(self.tls / "sites" / f"{name}.key")

    @property
    def superlink_pid(self) -> int:
        return next(p.popen.pid for p in self.server._procs if p.name == "superlink")  # type: ignore[attr-defined]


def make_tls(folder: Path, sites: int = 2, hosts: tuple[str, ...] = ()) -> Path:
    """``fednnunet certs`` files for a coordinator on 127.0.0.1 (and ``hosts``)."""
    from fednnunet.security.certs import make_certificates

    return make_certificates(folder, ["127.0.0.1", "localhost", *hosts], sites).folder


@contextmanager
def coordinator(work: Path, tls: Path, site_keys: bool = True, gateway_args: list[str] | None = None,
                listen: str = "127.0.0.1", gateway_file: Path | None = None) -> Iterator[Stack]:
    """A SuperLink (TLS, SuperNode authentication, ``tls``'s site keys registered) on loopback and the gateway
    as its own process on ``listen``, the way ``fednnunet server`` runs them (``gateway_file``: another version of
    the gateway module, run as a script, e.g. an earlier one from ``git show``)."""
    from fednnunet.federation.server_node import ServerNode, ServerTLS
    from fednnunet.processes import free_port, wait_listening

    with ServerNode(work / "server", tls=ServerTLS(tls)) as server:
        port = free_port()
        module = [str(gateway_file)] if gateway_file else ["-m", "fednnunet.security.gateway"]
        cmd = [sys.executable, *module, "--listen", f"{listen}:{port}",
               "--upstream", f"https://127.0.0.1:{server.port}",
               "--upstream-ca", str(server.loopback_tls / "ca.crt"),
               "--certfile", str(tls / "server.crt"), "--keyfile", str(tls / "server.key"), *(gateway_args or [])]
        if site_keys:
            cmd += ["--site-keys", str(tls / "sites")]
        log = work / f"gateway-{port}.log"
        with log.open("w") as f:
            gateway = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        try:
            wait_listening(server, "127.0.0.1", port, "gateway")
            yield Stack(server, port, tls, gateway, log)
        finally:
            _stop(gateway, 30)


# ---------------------------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------------------------

def bench_gateway(work: Path | None = None, requests: int = 10, attackers: int = 100, bodies: int = 32,
                  body_mb: int = 16, compare_with: Path | None = None, deadline_s: float = 60.0) -> dict:
    """See the module docstring; returns the numbers as a dict. ``compare_with``: a gateway module file (an
    earlier version) measured under the same slow-head attacks, without ``--site-keys`` (it may not know it)."""
    work = Path(work) if work else Path(tempfile.mkdtemp(prefix="fednnunet-bench-gateway-"))
    work.mkdir(parents=True, exist_ok=True)
    tls = make_tls(work / "tls")
    result: dict = {"requests": requests, "attackers": attackers, "bodies": bodies, "body_mb": body_mb,
                    "deadline_s": deadline_s}
    one = ["127.0.0.2"]
    ten = [f"127.0.0.{i}" for i in range(2, 12)]
    with coordinator(work / "after", tls) as stack:
        key = stack.site_key()
        node_id = activate(stack.base_url, stack.ca, key)
        result["site_requests"] = {"no attack": site_requests(stack.base_url, stack.ca, key, node_id, requests,
                                                              deadline_s)}
        for label, sources in (("100 slow heads, 1 address", one), ("100 slow heads, 10 addresses", ten)):
            with slow_head_attack("127.0.0.1", stack.port, sources, attackers,
                                  log=work / f"attack-{len(sources)}.log"):
                result["site_requests"][label] = site_requests(stack.base_url, stack.ca, key, node_id, requests,
                                                               deadline_s)
        result["rss_after"] = _body_attack(stack, bodies, body_mb)
    if compare_with is not None:
        with coordinator(work / "compare", tls, site_keys=False, gateway_file=compare_with) as stack:
            key = stack.site_key()
            node_id = activate(stack.base_url, stack.ca, key)
            result["compared_gateway"] = str(compare_with)
            result["site_requests_compared"] = {
                "no attack": site_requests(stack.base_url, stack.ca, key, node_id, requests, deadline_s)}
            for label, sources in (("100 slow heads, 1 address", one), ("100 slow heads, 10 addresses", ten)):
                with slow_head_attack("127.0.0.1", stack.port, sources, attackers,
                                      log=work / f"attack-compare-{len(sources)}.log"):
                    result["site_requests_compared"][label] = site_requests(stack.base_url, stack.ca, key, node_id,
                                                                            requests, deadline_s)
    with coordinator(work / "before", tls, site_keys=False) as stack:
        result["rss_before"] = _body_attack(stack, bodies, body_mb)
    result["job_seconds"] = {"no attack": federation_job(work / "job", tls, "none")}
    for label, sources in (("100 slow heads, 1 address", one), ("100 slow heads, 10 addresses", ten)):
        # the attack needs the gateway's port before the job starts: it aims at the next job's server
        result["job_seconds"][label] = _job_under_attack(work, tls, sources, attackers, label)
    result["work"] = str(work)
    return result


def federation_job(work: Path, tls: Path, tag: str, port: int | None = None,
                   wait_for: Callable[[], bool] | None = None) -> float:
    """Wall seconds of a federated fingerprint extraction of two synthetic sites through ``fednnunet server`` and
    two ``fednnunet client`` processes (site1, site2 of ``tls``), from the clients' start to the server's exit.
    ``work/nnUNet_raw`` holds the sites (written on first use). ``port``: the gateway's; ``wait_for``: the clients
    start once it is true (an attack in place)."""
    from fednnunet.processes import free_port

    env = dict(os.environ, nnUNet_def_n_proc="1")
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[var] = str(work / var)
        (work / var).mkdir(parents=True, exist_ok=True)
    if not any((work / "nnUNet_raw").iterdir()):
        from fednnunet.data.synthetic import write_demo_federation

        write_demo_federation(work / "nnUNet_raw", first_id=901, sites=2, dim=2, seed=0)
    fednnunet = str(Path(sys.executable).parent / "fednnunet")
    address = f"127.0.0.1:{port or free_port()}"
    log = work / f"job-{tag}-server.log"
    with log.open("w") as f:
        server = subprocess.Popen([fednnunet, "server", "extract_fingerprint", "--num-clients", "2", "--address",
                                   address, "--tls-dir", str(tls), "--out", str(work / f"job-{tag}")],
                                  env=env, stdout=f, stderr=subprocess.STDOUT)
    clients: list[subprocess.Popen] = []
    try:
        deadline = time.monotonic() + 120
        while "waiting for 2 site" not in log.read_text():
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.2)
        while wait_for is not None and not wait_for():
            if time.monotonic() > deadline:
                raise RuntimeError("the attack did not start")
            time.sleep(0.2)
        started = time.monotonic()
        for i in (1, 2):
            with (work / f"job-{tag}-site{i}.log").open("w") as f:
                clients.append(subprocess.Popen(
                    [fednnunet, "client", "extract_fingerprint", str(900 + i), "--server", address, "--tls-root",
                     str(tls / "ca.crt"), "--auth-key", str(tls / "sites" / f"site{i}.key"), "--no-check",
                     "--connect-timeout", "120"], env=env, stdout=f, stderr=subprocess.STDOUT))
        if server.wait(timeout=600) != 0:
            raise RuntimeError(f"the job failed:\n{log.read_text()[-2000:]}")
        return round(time.monotonic() - started, 2)
    finally:
        for proc in (server, *clients):
            if proc.poll() is None:
                _stop(proc, 30)


def _body_attack(stack: Stack, bodies: int, body_mb: int) -> dict:
    pid = stack.superlink_pid
    before = rss_mb(pid)
    started = time.monotonic()
    outcomes = asyncio.run(unauthenticated_bodies("127.0.0.1", stack.port, bodies, body_mb << 20))
    seconds = time.monotonic() - started
    time.sleep(2)
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o] = counts.get(o, 0) + 1
    return {"superlink_rss_mb_before": round(before, 1), "superlink_peak_rss_mb": round(peak_rss_mb(pid), 1),
            "superlink_rss_mb_after": round(rss_mb(pid), 1), "outcomes": counts, "seconds": round(seconds, 2)}


def _job_under_attack(work: Path, tls: Path, sources: list[str], attackers: int, label: str) -> float:
    """:func:`federation_job` while ``attackers`` slow-head connections from ``sources`` hold its gateway's port
    (chosen here; the attack starts once the gateway listens, the clients once the attack is in place)."""
    import threading

    from fednnunet.processes import free_port

    port = free_port()
    holder: dict = {}
    tag = f"attack{len(sources)}"

    def listening() -> bool:
        with socket.socket() as probe:
            probe.settimeout(0.2)
            return probe.connect_ex(("127.0.0.1", port)) == 0

    def attack() -> None:  # starts as soon as the job's gateway listens, ends with the job
        while not listening() and "done" not in holder:
            time.sleep(0.1)
        if "done" not in holder:
            with slow_head_attack("127.0.0.1", port, sources, attackers, seconds=600.0,
                                  log=work / f"job-{tag}-attack.log", settle_s=0.0):
                holder["attacking"] = True
                while "done" not in holder:
                    time.sleep(0.2)

    thread = threading.Thread(target=attack, daemon=True)
    thread.start()
    try:
        return federation_job(work / "job", tls, tag, port=port, wait_for=lambda: holder.get("attacking", False))
    finally:
        holder["done"] = True
        thread.join(timeout=60)
        logger.info("job under attack (%s) done", label)


def format_gateway(result: dict) -> str:
    lines = [f"A registered site's {result['requests']} signed Fleet requests (new TLS connection each, retried "
             "until they succeed):",
             f"  {'condition':32s} {'seconds':>8s} {'succeeded':>9s} {'failed tries':>12s}"]
    for label, r in result["site_requests"].items():
        lines.append(f"  {label:32s} {r['seconds']:8.2f} {r['succeeded']:9d} {r['failed_tries']:12d}")
    if "site_requests_compared" in result:
        lines.append(f"  the same through {result['compared_gateway']} (giving up after {result['deadline_s']:.0f} s):")
        for label, r in result["site_requests_compared"].items():
            lines.append(f"  {label:32s} {r['seconds']:8.2f} {r['succeeded']:9d} {r['failed_tries']:12d}")
    if "job_seconds" in result:
        lines.append("A federated job through `fednnunet server` and two `fednnunet client` hospitals (fingerprint "
                     "extraction of two synthetic sites), wall seconds from the clients' start:")
        for label, seconds in result["job_seconds"].items():
            lines.append(f"  {label:32s} {seconds:8.2f}")
    lines.append(f"SuperLink RSS under {result['bodies']} concurrent {result['body_mb']} MiB unauthenticated bodies:")
    for label, key in (("before (no --site-keys)", "rss_before"), ("after (--site-keys)", "rss_after")):
        r = result[key]
        lines.append(f"  {label:24s} RSS {r['superlink_rss_mb_before']:.0f} MB -> peak "
                     f"{r['superlink_peak_rss_mb']:.0f} MB, {r['superlink_rss_mb_after']:.0f} MB after; "
                     f"outcomes {r['outcomes']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``python -m fednnunet.bench.gateway slow-heads|serve|site``: the slow-head attacker, a coordinator (SuperLink
    and gateway; prints ``ready PORT``, stops on SIGTERM) and a site's timed requests (prints JSON), each as its own
    process (tests run them inside network namespaces)."""
    parser = argparse.ArgumentParser(description="gateway attack helpers")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("serve")
    p.add_argument("--work", required=True)
    p.add_argument("--tls", required=True)
    p.add_argument("--listen", default="0.0.0.0")
    p.add_argument("--gateway-arg", action="append", default=[], help="passed on to the gateway (repeatable)")
    p = sub.add_parser("site")
    p.add_argument("--url", required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--requests", type=int, default=6)
    p.add_argument("--deadline", type=float, default=90.0)
    p = sub.add_parser("slow-heads")
    p.add_argument("--target", required=True, help="HOST:PORT")
    p.add_argument("--sources", required=True, help="comma-separated source addresses")
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--seconds", type=float, default=600.0)
    p.add_argument("--plain", action="store_true", help="no TLS")
    args = parser.parse_args(argv)
    if args.cmd == "serve":
        import signal

        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        with coordinator(Path(args.work), Path(args.tls), gateway_args=args.gateway_arg, listen=args.listen) as stack:
            print(f"ready {stack.port}", flush=True)
            while stack.gateway.poll() is None:
                time.sleep(1)
        return
    if args.cmd == "site":
        import json

        key = SiteKey(Path(args.key))
        node_id = activate(args.url, Path(args.ca), key)
        print(json.dumps(site_requests(args.url, Path(args.ca), key, node_id, args.requests, args.deadline)),
              flush=True)
        return
    host, _, port = args.target.rpartition(":")
    stats = asyncio.run(slow_heads(host, int(port), args.sources.split(","), args.count, args.seconds,
                                   tls=not args.plain))
    print(f"slow-heads: {stats}", flush=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()


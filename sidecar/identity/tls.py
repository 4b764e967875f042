"""mTLS between sidecars: ``ssl.SSLContext``s from the workload credentials, outbound connect,
inbound accept (STRICT / PERMISSIVE / DISABLE), all on stdlib ``ssl`` + ``trio.SSLStream``.

* Contexts: TLS 1.3 only, ``CERT_REQUIRED`` both ways, the trust bundle as CA, ALPN
  ``ALPN_PROTOCOLS``. ``check_hostname`` is off because SPIFFE certificates carry no DNS name:
  the peer's SPIFFE ID is checked right after the handshake, before any byte is forwarded.
  ``TlsContexts.update`` builds new contexts and swaps one reference: connections opened before
  keep the context they were made with (linkerd/Envoy SDS behaviour on rotation).
* ``https_compatible=True`` on both ends (trio's advice for HTTP): no close_notify is sent or
  required, so a close does not wait on the peer; HTTP framing detects truncated messages.
* Errors are mapped here, once: a refused certificate (ours or the peer's) or a wrong identity
  -> ``IdentityError`` (``reason`` code, see ``certs``); other handshake failures, a stall
  longer than ``HANDSHAKE_TIMEOUT`` or an early EOF -> ``trio.BrokenResourceError``.
  The stream is closed before either is raised.

TLS 1.3 caveat: a client finishes its handshake before the server has checked the client's
certificate, so a client refused by the server learns it on its first read, as an EOF (trio
closes a broken SSLStream without flushing the alert). The server's handler never runs and
nothing is forwarded; the outbound pool sees "closed before a response head" (UC).
"""

from __future__ import annotations

import os
import socket
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from meshd.errors import IdentityError
from sidecar.http.client import Connect
from sidecar.identity.certs import Credentials, fail, key_pem, spiffe_id_of

ALPN_H2 = "h2"  # RFC 9113 §3.2: HTTP/2 over TLS
ALPN_HTTP1 = "http/1.1"
# What the inbound (server side) accepts, in its order of preference (OpenSSL picks the server's
# first match). Other protocols append here (e.g. a TCP tunnel id). A client offers only the
# protocol it will speak (``TlsContexts.client_for``), so the server's order never switches an
# HTTP/1.1 pool to HTTP/2.
ALPN_TCP = "meshd-tcp"  # opaque TCP between sidecars: the inbound pumps bytes to the app
ALPN_PROTOCOLS: tuple[str, ...] = (ALPN_H2, ALPN_HTTP1, ALPN_TCP)
CLIENT_ALPN: tuple[str, ...] = (ALPN_HTTP1,)  # offered by ``TlsContexts.client`` (the HTTP/1.1 pool)
# Go's http.DefaultTransport TLSHandshakeTimeout is 10 s; hypercorn's 60 s serves internet
# clients. Peers here are sidecars one LAN RTT away (1-RTT TLS 1.3 + two ECDSA signatures, a few
# ms), so 10 s only ever fires on a stalled peer, and frees its socket 6x sooner than 60 s.
HANDSHAKE_TIMEOUT = 10.0
MODES = frozenset({"STRICT", "PERMISSIVE", "DISABLE"})
ANY_IDENTITY = "*"          # identity_of() answer: any SPIFFE ID the trust bundle vouches for
_TLS_HANDSHAKE = 0x16       # first byte of a TLS record carrying a ClientHello
_VERIFY_REASONS = {9: "not-yet-valid", 10: "expired", 2: "wrong-ca", 7: "wrong-ca",
                   18: "wrong-ca", 19: "wrong-ca", 20: "wrong-ca", 21: "wrong-ca"}


@dataclass(frozen=True, slots=True)
class TlsStatistics:
    """Counters since start: ``handshakes`` completed, ``handshake_failures`` (any cause), and
    ``identity_failures`` — certificates or SPIFFE IDs refused, in or right after a handshake."""

    spiffe_id: str
    serial: str
    swaps: int
    handshakes: int
    handshake_failures: int
    identity_failures: int
    plaintext_refused: int
    plaintext_accepted: int


class TlsContexts:
    """The current client and server contexts (``None`` until the first ``update``)."""

    def __init__(self, creds: Credentials | None = None) -> None:
        self._pair: tuple[ssl.SSLContext, ssl.SSLContext] | None = None
        self._clients: dict[tuple[str, ...], ssl.SSLContext] = {}  # per ALPN offer (client_for)
        self.creds: Credentials | None = None
        self.swaps = self.handshakes = self.handshake_failures = self.identity_failures = 0
        self.plaintext_refused = self.plaintext_accepted = 0
        if creds is not None:
            self.update(creds)

    @property
    def client(self) -> ssl.SSLContext | None:
        return self._pair[0] if self._pair else None

    @property
    def server(self) -> ssl.SSLContext | None:
        return self._pair[1] if self._pair else None

    def client_for(self, alpn: tuple[str, ...]) -> ssl.SSLContext | None:
        """A client context of the current credentials offering exactly ``alpn`` (e.g.
        ``("h2",)``), built once per credentials; None before the first ``update``."""
        if self._pair is None or self.creds is None:
            return None
        if alpn == CLIENT_ALPN:
            return self._pair[0]
        ctx = self._clients.get(alpn)
        if ctx is None:
            ctx = self._clients[alpn] = build_contexts(self.creds, alpn)[0]
        return ctx

    def update(self, creds: Credentials) -> None:
        """Build new contexts from ``creds``, then swap them in; raises IdentityError (and keeps
        the old contexts) if OpenSSL refuses the key/certificate/bundle."""
        pair = build_contexts(creds)
        self._pair, self.creds, self._clients = pair, creds, {}
        self.swaps += 1

    def statistics(self) -> TlsStatistics:
        c = self.creds
        return TlsStatistics(c.spiffe_id if c else "", f"{c.serial:x}" if c else "", self.swaps,
                             self.handshakes, self.handshake_failures, self.identity_failures,
                             self.plaintext_refused, self.plaintext_accepted)


def build_contexts(creds: Credentials, client_alpn: tuple[str, ...] = CLIENT_ALPN,
                   ) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """``(client, server)`` contexts for ``creds``, the client offering ``client_alpn``, the
    server accepting ``ALPN_PROTOCOLS``; raises IdentityError (``key-mismatch``, ``malformed``)
    when OpenSSL refuses them."""
    pair = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    for ctx, alpn in zip(pair, (client_alpn, ALPN_PROTOCOLS), strict=True):
        ctx.check_hostname = False  # identity is the SPIFFE URI SAN, checked after the handshake
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        # a TCP FIN under TLS reads as EOF, not as a broken stream: a TCP tunnel half-closes
        # that way and keeps sending the other direction (trio.SSLStream has no send_eof)
        ctx.options |= ssl.OP_IGNORE_UNEXPECTED_EOF
        ctx.set_alpn_protocols(list(alpn))
        try:
            ctx.load_verify_locations(cadata="\n".join(creds.bundle))
        except (ssl.SSLError, ValueError) as exc:
            raise fail("malformed", f"trust bundle: {exc}") from None
    pair[1].num_tickets = 0  # trio.SSLStream cannot resume sessions: tickets would be wasted work
    _load_identity(pair, creds)
    return pair


def _load_identity(pair: tuple[ssl.SSLContext, ...], creds: Credentials) -> None:
    """``load_cert_chain`` reads files only: write leaf+chain and the key, encrypted with a
    one-time password, into a private (0700) temporary directory that is removed at once."""
    password = os.urandom(32)
    with tempfile.TemporaryDirectory(prefix="mesh-tls-") as tmp:
        cert_file, key_file = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
        cert_file.write_text("\n".join((creds.cert, *creds.chain)), encoding="ascii")
        key_file.write_bytes(key_pem(creds.key, password))
        for ctx in pair:
            try:
                ctx.load_cert_chain(cert_file, key_file, password=password)
            except ssl.SSLError as exc:
                code = "key-mismatch" if exc.reason == "KEY_VALUES_MISMATCH" else "malformed"
                raise fail(code, f"certificate {creds.serial:x}: OpenSSL refused it: {exc}") from None


def _peer(stream: trio.abc.Stream) -> str:
    sock = getattr(stream, "socket", None)
    try:
        host, port = sock.getpeername()[:2] if sock is not None else ("?", 0)
    except OSError:
        return "?"
    return f"{host}:{port}"


def _map_ssl(exc: trio.BrokenResourceError, peer: str) -> Exception:
    """One mapping of a failed handshake to IdentityError or BrokenResourceError."""
    cause = exc.__cause__
    if isinstance(cause, ssl.SSLCertVerificationError):
        reason = _VERIFY_REASONS.get(cause.verify_code, "untrusted")
        return fail(reason, f"certificate of {peer} refused: {cause.verify_message}")
    if isinstance(cause, ssl.SSLError) and cause.reason and (
            "CERTIFICATE" in cause.reason or "UNKNOWN_CA" in cause.reason):
        return fail("refused-by-peer", f"{peer} refused our certificate: {cause.reason}")
    detail = getattr(cause, "reason", None) or cause or exc
    return trio.BrokenResourceError(f"TLS handshake with {peer} failed: {detail}")


async def _handshake(tls: trio.SSLStream[trio.abc.Stream], ctxs: TlsContexts, peer: str,
                     timeout: float) -> str:  # noqa: ASYNC109
    """Handshake within ``timeout`` s and return the peer's SPIFFE ID; counts the outcome."""
    try:
        with trio.fail_after(timeout):
            await tls.do_handshake()
        principal = spiffe_id_of(tls.getpeercert(binary_form=True) or b"")
    except trio.TooSlowError:
        ctxs.handshake_failures += 1
        raise trio.BrokenResourceError(f"TLS handshake with {peer}: no progress in {timeout} s") from None
    except trio.BrokenResourceError as exc:
        ctxs.handshake_failures += 1
        mapped = _map_ssl(exc, peer)
        ctxs.identity_failures += isinstance(mapped, IdentityError)
        raise mapped from exc
    except IdentityError:
        ctxs.handshake_failures += 1
        ctxs.identity_failures += 1
        raise
    ctxs.handshakes += 1
    return principal


async def connect_mtls(ctxs: TlsContexts, host: str, port: int, expected_id: str | None,
                       connect_timeout: float = HANDSHAKE_TIMEOUT,
                       alpn: tuple[str, ...] | None = None) -> trio.SSLStream[trio.abc.Stream]:
    """TCP connect + TLS handshake to ``host:port`` within ``connect_timeout`` s, then require
    the peer's SPIFFE ID to be ``expected_id`` (``None``/``ANY_IDENTITY``: any mesh identity).
    ``alpn``: the protocols to offer (default ``CLIENT_ALPN``); the caller reads the choice with
    ``selected_alpn_protocol()`` (None when the server chose none).

    Nothing is sent before the identity check. Raises OSError (refused/unreachable),
    trio.TooSlowError (timeout), IdentityError (no certificate yet, peer certificate refused,
    wrong identity), trio.BrokenResourceError (other handshake failures)."""
    ctx = ctxs.client if alpn is None else ctxs.client_for(alpn)
    if ctx is None:
        raise fail("no-certificate", "no workload certificate yet: cannot open mTLS connections")
    with trio.fail_after(connect_timeout):
        tcp = await trio.open_tcp_stream(host, port)
        tls = trio.SSLStream(tcp, ctx, https_compatible=True)
        try:
            principal = await _handshake(tls, ctxs, f"{host}:{port}", connect_timeout)
            if expected_id not in (None, ANY_IDENTITY) and principal != expected_id:
                ctxs.identity_failures += 1
                raise fail("wrong-san", f"{host}:{port} is {principal}, expected {expected_id}")
        except BaseException:
            await trio.aclose_forcefully(tcp)
            raise
    return tls


def connector(ctxs: TlsContexts, identity_of: Callable[[str, int], str | None], *,
              connect_timeout: float = HANDSHAKE_TIMEOUT, alpn: tuple[str, ...] | None = None,
              ) -> Connect:
    """The ``UpstreamPool(connect=…)`` seam: ``identity_of(host, port)`` gives the SPIFFE ID the
    endpoint must present (``ANY_IDENTITY`` for any), or ``None`` to connect in plain text.
    ``alpn``: protocols offered on mTLS connections (``connect_mtls``)."""

    async def connect(host: str, port: int) -> trio.abc.Stream:
        want = identity_of(host, port)
        if want is None:
            return await trio.open_tcp_stream(host, port)
        return await connect_mtls(ctxs, host, port, want, connect_timeout, alpn)

    return connect


class PrefixedStream(trio.abc.HalfCloseableStream):
    """``transport_stream`` whose first bytes (``prefix``, already read from it) are delivered
    again by ``receive_some`` — the peek for streams without ``MSG_PEEK`` (e.g. in-memory)."""

    def __init__(self, transport_stream: trio.abc.Stream, prefix: bytes) -> None:
        self.transport_stream = transport_stream
        self._prefix = bytes(prefix)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if not self._prefix:
            return await self.transport_stream.receive_some(max_bytes)
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        await trio.lowlevel.checkpoint()
        n = len(self._prefix) if max_bytes is None else max_bytes
        out, self._prefix = self._prefix[:n], self._prefix[n:]
        return out

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.transport_stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.transport_stream.send_eof()  # type: ignore[attr-defined]

    async def aclose(self) -> None:
        self._prefix = b""
        await self.transport_stream.aclose()


async def _peek(stream: trio.abc.Stream, timeout: float) -> tuple[trio.abc.Stream, int]:  # noqa: ASYNC109
    """The first byte the peer sends, leaving it unread (``MSG_PEEK`` on sockets, else a
    ``PrefixedStream``). Raises BrokenResourceError on EOF, reset or ``timeout`` s of silence."""
    sock = getattr(stream, "socket", None)
    try:
        with trio.fail_after(timeout):
            if sock is not None:
                data = await sock.recv(1, socket.MSG_PEEK)
            else:
                data = await stream.receive_some()
                stream = PrefixedStream(stream, data)
    except trio.TooSlowError:
        raise trio.BrokenResourceError(f"{_peer(stream)} sent nothing in {timeout} s") from None
    except OSError as exc:
        raise trio.BrokenResourceError(f"{_peer(stream)}: {exc}") from exc
    if not data:
        raise trio.BrokenResourceError(f"{_peer(stream)} closed before sending a byte")
    return stream, data[0]


async def accept(stream: trio.abc.Stream, ctxs: TlsContexts, mode: str, *,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT) -> tuple[trio.abc.Stream, str | None]:
    """Terminate inbound mesh TLS on ``stream``: returns ``(stream to serve, peer SPIFFE ID)``,
    the ID being ``None`` for plain text.

    ``mode``: ``STRICT`` (TLS required; plain text refused and counted), ``PERMISSIVE`` (the
    first byte decides: 0x16 -> TLS, else plain text; for migrations) or ``DISABLE`` (plain text,
    no peek). On failure ``stream`` is closed and IdentityError or BrokenResourceError raised;
    ValueError for an unknown mode."""
    if mode not in MODES:
        raise ValueError(f"mTLS mode must be one of {sorted(MODES)}, got {mode!r}")
    if mode == "DISABLE":
        return stream, None
    peer = _peer(stream)
    try:
        stream, first = await _peek(stream, handshake_timeout)
        if first != _TLS_HANDSHAKE:
            if mode == "STRICT":
                ctxs.plaintext_refused += 1
                raise fail("plaintext-refused", f"{peer} spoke plain text to a STRICT mTLS inbound")
            ctxs.plaintext_accepted += 1
            return stream, None
        if ctxs.server is None:
            raise fail("no-certificate", f"TLS from {peer} refused: no workload certificate yet")
        tls = trio.SSLStream(stream, ctxs.server, server_side=True, https_compatible=True)
        return tls, await _handshake(tls, ctxs, peer, handshake_timeout)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise

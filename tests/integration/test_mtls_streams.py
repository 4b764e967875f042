"""mTLS between sidecars on real loopback sockets: ``connect_mtls`` against ``accept`` behind
``trio.serve_tcp``, with SPIFFE certificates from a test CA built with ``cryptography``.

Every refused case asserts what the server's handler received: 0 bytes, no principal.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from functools import partial

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshd.errors import IdentityError
from sidecar.http.client import UpstreamPool
from sidecar.http.messages import Body, ConnInfo, RequestHead, Response, ResponseHead
from sidecar.http.server import serve_http1
from sidecar.identity import certs
from sidecar.identity.tls import TlsContexts, accept, connect_mtls, connector

TD = "mesh.local"
SVCA, SVCB = f"spiffe://{TD}/ns/default/sa/svca", f"spiffe://{TD}/ns/default/sa/svcb"
_KU = dict(content_commitment=False, key_encipherment=False, data_encipherment=False,
           key_agreement=False, encipher_only=False, decipher_only=False)


def _utc(t: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(t, dt.UTC)


class CA:
    """Self-signed test root with the meshd profile; ``creds`` issues SPIFFE leaves."""

    def __init__(self, cn: str = "test root") -> None:
        self.key = certs.new_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        self.name, now = name, time.time()
        self.pem = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                    .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                    .not_valid_before(_utc(now - 86400)).not_valid_after(_utc(now + 86400 * 3650))
                    .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                    .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                                 crl_sign=True, **_KU), critical=True)
                    .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()),
                                   critical=False)
                    .sign(self.key, hashes.SHA256())).public_bytes(serialization.Encoding.PEM).decode()

    def creds(self, spiffe_id: str, *, nb: float = -60, na: float = 3600, bundle: str | None = None,
              cert_key: certs.PrivateKey | None = None) -> certs.Credentials:
        """Credentials valid from now+nb to now+na seconds, trusting ``bundle`` (default: us);
        ``cert_key``: certify that key instead of the one returned (a key mismatch)."""
        key, now = certs.new_key(), time.time()
        leaf = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(self.name)
                .public_key((cert_key or key).public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(_utc(now + nb)).not_valid_after(_utc(now + na))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False,
                                             crl_sign=False, **_KU), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
                               critical=True)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self.key.public_key()), critical=False)
                .sign(self.key, hashes.SHA256()))
        return certs.Credentials(key, leaf.public_bytes(serialization.Encoding.PEM).decode(), (),
                                 (bundle or self.pem,), spiffe_id, now + nb, now + na,
                                 leaf.serial_number)


@pytest.fixture(scope="module")
def ca() -> CA:
    return CA()


class EchoServer:
    """``accept`` then echo; records principals, refusals and the bytes its handler received."""

    def __init__(self, ctxs: TlsContexts, mode: str, handshake_timeout: float = 5.0) -> None:
        self.ctxs, self.mode, self.timeout = ctxs, mode, handshake_timeout
        self.principals: list[str | None] = []
        self.refused: list[Exception] = []
        self.received = 0
        self.port = 0
        self._changed = trio.Event()

    def _note(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def start(self, nursery: trio.Nursery) -> EchoServer:
        listeners = await nursery.start(partial(trio.serve_tcp, self.handle, 0, host="127.0.0.1"))
        self.port = listeners[0].socket.getsockname()[1]
        return self

    async def handle(self, tcp: trio.SocketStream) -> None:
        try:
            stream, principal = await accept(tcp, self.ctxs, self.mode, handshake_timeout=self.timeout)
        except (IdentityError, trio.BrokenResourceError) as exc:
            self.refused.append(exc)
            self._note()
            return
        self.principals.append(principal)
        self._note()
        async with stream:
            try:
                async for chunk in stream:
                    self.received += len(chunk)
                    self._note()
                    await stream.send_all(chunk)
            except trio.BrokenResourceError:
                pass

    async def settled(self, done: Callable[[EchoServer], bool]) -> None:
        with trio.fail_after(5):
            while not done(self):
                await self._changed.wait()


async def _echo(stream: trio.abc.Stream, data: bytes = b"ping") -> bytes:
    await stream.send_all(data)
    return await stream.receive_some()


def _serial(stream: trio.SSLStream[trio.abc.Stream]) -> int:
    der = stream.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def _reason(exc: BaseException) -> str:
    return getattr(exc, "reason", "")


async def test_mtls_both_ways_with_identity_check(ca: CA, nursery: trio.Nursery) -> None:
    server_creds = ca.creds(SVCB)
    server = await EchoServer(TlsContexts(server_creds), "STRICT").start(nursery)
    client = TlsContexts(ca.creds(SVCA))
    tls = await connect_mtls(client, "127.0.0.1", server.port, SVCB)
    async with tls:
        assert await _echo(tls) == b"ping"
        assert tls.version() == "TLSv1.3" and tls.selected_alpn_protocol() == "http/1.1"
        assert _serial(tls) == server_creds.serial
    await server.settled(lambda s: s.principals == [SVCA])
    assert client.statistics().handshakes == 1 and server.ctxs.statistics().handshakes == 1


@pytest.mark.parametrize("kind", ["expired", "not-yet-valid", "wrong-ca"])
async def test_client_refuses_a_bad_server_certificate(ca: CA, nursery: trio.Nursery, kind: str) -> None:
    bad = {"expired": lambda: ca.creds(SVCB, nb=-7200, na=-3600),
           "not-yet-valid": lambda: ca.creds(SVCB, nb=3600, na=7200),
           "wrong-ca": lambda: CA("rogue").creds(SVCB, bundle=ca.pem)}[kind]()
    server = await EchoServer(TlsContexts(bad), "STRICT").start(nursery)
    client = TlsContexts(ca.creds(SVCA))
    with pytest.raises(IdentityError) as err:
        await connect_mtls(client, "127.0.0.1", server.port, SVCB)
    assert _reason(err.value) == kind
    await server.settled(lambda s: len(s.refused) == 1)
    assert (server.received, server.principals) == (0, [])
    assert client.statistics().identity_failures == 1


@pytest.mark.parametrize("kind", ["expired", "not-yet-valid", "wrong-ca"])
async def test_server_refuses_a_bad_client_certificate(ca: CA, nursery: trio.Nursery, kind: str) -> None:
    bad = {"expired": lambda: ca.creds(SVCA, nb=-7200, na=-3600),
           "not-yet-valid": lambda: ca.creds(SVCA, nb=3600, na=7200),
           "wrong-ca": lambda: CA("rogue").creds(SVCA, bundle=ca.pem)}[kind]()
    server = await EchoServer(TlsContexts(ca.creds(SVCB)), "STRICT").start(nursery)
    # TLS 1.3: the client finishes its handshake before the server checks its certificate, so
    # the refusal arrives on the first read — as EOF, since trio drops the pending alert.
    try:
        tls = await connect_mtls(TlsContexts(bad), "127.0.0.1", server.port, SVCB)
        assert await _echo(tls) == b""
    except (IdentityError, trio.BrokenResourceError):
        pass
    await server.settled(lambda s: len(s.refused) == 1)
    assert _reason(server.refused[0]) == kind
    assert (server.received, server.principals) == (0, [])
    assert server.ctxs.statistics().identity_failures == 1


async def test_wrong_san_is_refused_before_any_byte_is_sent(ca: CA, nursery: trio.Nursery) -> None:
    server = await EchoServer(TlsContexts(ca.creds(SVCB)), "STRICT").start(nursery)
    with pytest.raises(IdentityError, match=r"expected spiffe://mesh\.local/ns/default/sa/svcc") as err:
        await connect_mtls(TlsContexts(ca.creds(SVCA)), "127.0.0.1", server.port,
                           f"spiffe://{TD}/ns/default/sa/svcc")
    assert _reason(err.value) == "wrong-san"
    await server.settled(lambda s: bool(s.principals))
    await trio.sleep(0.05)
    assert server.received == 0


def test_key_mismatched_certificate_is_refused_by_the_tls_library(ca: CA) -> None:
    good = ca.creds(SVCB)
    ctxs = TlsContexts(good)
    before = ctxs.client, ctxs.server
    mismatched = ca.creds(SVCB, cert_key=certs.new_key())
    with pytest.raises(IdentityError) as err:
        ctxs.update(mismatched)
    assert _reason(err.value) == "key-mismatch"
    assert (ctxs.client, ctxs.server) == before and ctxs.creds is good and ctxs.swaps == 1


async def test_plaintext_client_is_refused_by_strict(ca: CA, nursery: trio.Nursery) -> None:
    server = await EchoServer(TlsContexts(ca.creds(SVCB)), "STRICT").start(nursery)
    tcp = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with tcp:
        await tcp.send_all(b"GET / HTTP/1.1\r\nhost: svcb\r\n\r\n")
        try:
            assert await tcp.receive_some() == b""
        except trio.BrokenResourceError:
            pass  # reset: also a refusal
    await server.settled(lambda s: len(s.refused) == 1)
    assert _reason(server.refused[0]) == "plaintext-refused"
    assert (server.received, server.principals) == (0, [])
    assert server.ctxs.statistics().plaintext_refused == 1


async def test_permissive_accepts_plaintext_and_tls(ca: CA, nursery: trio.Nursery) -> None:
    server = await EchoServer(TlsContexts(ca.creds(SVCB)), "PERMISSIVE").start(nursery)
    async with await trio.open_tcp_stream("127.0.0.1", server.port) as tcp:
        assert await _echo(tcp, b"GET / HTTP/1.1\r\n\r\n") == b"GET / HTTP/1.1\r\n\r\n"
    async with await connect_mtls(TlsContexts(ca.creds(SVCA)), "127.0.0.1", server.port, SVCB) as tls:
        assert await _echo(tls) == b"ping"
    await server.settled(lambda s: len(s.principals) == 2)
    assert server.principals == [None, SVCA]
    stats = server.ctxs.statistics()
    assert (stats.plaintext_accepted, stats.handshakes) == (1, 1)


async def test_disable_serves_plaintext_without_a_certificate(nursery: trio.Nursery) -> None:
    server = await EchoServer(TlsContexts(), "DISABLE").start(nursery)
    async with await trio.open_tcp_stream("127.0.0.1", server.port) as tcp:
        assert await _echo(tcp, b"\x16 looks like TLS") == b"\x16 looks like TLS"
    assert server.principals == [None]


async def test_silent_and_stalled_peers_time_out(ca: CA, nursery: trio.Nursery) -> None:
    server = await EchoServer(TlsContexts(ca.creds(SVCB)), "PERMISSIVE", 0.2).start(nursery)
    async with await trio.open_tcp_stream("127.0.0.1", server.port), \
            await trio.open_tcp_stream("127.0.0.1", server.port) as stalled:  # one says nothing
        await stalled.send_all(b"\x16\x03\x01")  # a ClientHello that never completes
        await server.settled(lambda s: len(s.refused) == 2)
    assert all(isinstance(e, trio.BrokenResourceError) for e in server.refused)
    assert server.received == 0


async def test_swap_keeps_old_connections_and_new_ones_get_the_new_cert(
        ca: CA, nursery: trio.Nursery) -> None:
    first, second = ca.creds(SVCB), ca.creds(SVCB)
    server = await EchoServer(TlsContexts(first), "STRICT").start(nursery)
    client = TlsContexts(ca.creds(SVCA))
    old = await connect_mtls(client, "127.0.0.1", server.port, SVCB)
    assert await _echo(old) == b"ping"
    server.ctxs.update(second)
    client.update(ca.creds(SVCA))
    new = await connect_mtls(client, "127.0.0.1", server.port, SVCB)
    async with old, new:
        assert await _echo(old, b"still") == b"still"
        assert await _echo(new, b"fresh") == b"fresh"
        assert (_serial(old), _serial(new)) == (first.serial, second.serial)


async def test_upstream_pool_over_the_connect_seam(ca: CA, nursery: trio.Nursery) -> None:
    """The pool's ``connect`` seam: HTTP/1.1 over mTLS, the handler sees the caller's identity."""
    ctxs = TlsContexts(ca.creds(SVCB))

    async def handler(head: RequestHead, body: Body, info: ConnInfo) -> Response:
        return Response(ResponseHead(200, (("content-length", str(len(principal))),)),
                        principal.encode())

    async def serve(tcp: trio.SocketStream) -> None:
        nonlocal principal
        try:
            stream, who = await accept(tcp, ctxs, "STRICT")
        except (IdentityError, trio.BrokenResourceError):
            return
        principal = who or ""
        await serve_http1(stream, handler, ConnInfo(None, None))

    principal = ""
    listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    pool = UpstreamPool(connect=connector(TlsContexts(ca.creds(SVCA)), lambda host, p: SVCB))
    for _ in range(3):
        resp = await pool.request("127.0.0.1", port, RequestHead("GET", "/", (("host", "svcb"),)))
        body = resp.body if isinstance(resp.body, bytes) else b"".join([c async for c in resp.body])
        assert (resp.head.status, body) == (200, SVCA.encode())
    assert (pool.statistics().opened, pool.statistics().reused) == (1, 2)
    await pool.aclose()

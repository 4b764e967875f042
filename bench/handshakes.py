"""mTLS handshakes per second between two sidecar identities, beside plain TCP connects.

Uses the real code paths: meshd's CA (``meshd.identity.ca``) signs two workload CSRs made by
``sidecar.identity.certs``; the server side runs ``sidecar.identity.tls.accept`` (STRICT), the
client ``connect_mtls`` with the SPIFFE ID check. One trio process, loopback only, bounded by
``--seconds``. Prints connections per second for plain TCP and for mTLS, and the ratio.

    .venv/bin/python bench/handshakes.py [--seconds 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import trio

from meshd.identity.ca import CertificateAuthority
from sidecar.identity import certs
from sidecar.identity.tls import TlsContexts, accept, connect_mtls

TRUST_DOMAIN = "cluster.local"


def credentials(ca: CertificateAuthority, service: str) -> certs.Credentials:
    key = certs.new_key()
    spiffe = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/{service}"
    issued = ca.sign_csr(certs.make_csr(key, spiffe), spiffe, 3600)
    leaf = certs.load_cert(issued.cert_pem)
    return certs.Credentials(key=key, cert=issued.cert_pem, chain=tuple(issued.chain_pems),
                             bundle=tuple(ca.trust_bundle()), spiffe_id=spiffe,
                             not_before=leaf.not_valid_before_utc.timestamp(),
                             not_after=issued.not_after, serial=leaf.serial_number)


async def _server(ctxs: TlsContexts | None, task_status: trio.TaskStatus[int]) -> None:
    async def handle(stream: trio.SocketStream) -> None:
        try:
            if ctxs is not None:
                tls, _ = await accept(stream, ctxs, "STRICT")
                await tls.send_all(b"k")
                await tls.aclose()
            else:
                await stream.send_all(b"k")
                await stream.aclose()
        except (trio.BrokenResourceError, OSError):
            pass

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


async def _rate(server: TlsContexts | None, client: TlsContexts | None, seconds: float,
                peer_id: str) -> float:
    """Connections per second: plain TCP when ``client`` is None, else mTLS."""
    async with trio.open_nursery() as nursery:
        port = await nursery.start(_server, server)
        done, deadline = 0, time.monotonic() + seconds
        while time.monotonic() < deadline:
            if client is None:
                stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", port)
            else:
                stream = await connect_mtls(client, "127.0.0.1", port, peer_id)
            await stream.receive_some(1)
            await stream.aclose()
            done += 1
        nursery.cancel_scope.cancel()
    return done / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ca = CertificateAuthority(tmp, TRUST_DOMAIN)
        server_ctx = TlsContexts(credentials(ca, "svcb"))
        client_ctx = TlsContexts(credentials(ca, "svca"))
    peer = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/svcb"

    async def both() -> tuple[float, float]:
        plain = await _rate(None, None, args.seconds, peer)
        return plain, await _rate(server_ctx, client_ctx, args.seconds, peer)

    plain, mtls = trio.run(both)
    print(f"plain TCP connects/s : {plain:8.0f}")
    print(f"mTLS handshakes/s    : {mtls:8.0f}  (client and server in one process, TLS 1.3, "
          f"EC P-256, SPIFFE check)")
    print(f"ratio mTLS / plain   : {mtls / plain:8.3f}")


if __name__ == "__main__":
    main()

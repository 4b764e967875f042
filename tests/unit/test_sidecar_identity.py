"""Sidecar identity: certificate checks, renewal timing, the identity agent against a fake meshd
(httpx.MockTransport implementing the ``/v1/identity`` contract with a real test CA), and the
PERMISSIVE peek wrapper on in-memory streams."""

from __future__ import annotations

import datetime as dt
import json
import math
import stat
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given
from hypothesis import strategies as st

from meshd.errors import IdentityError
from sidecar.bootstrap import Bootstrap
from sidecar.identity import certs
from sidecar.identity.agent import IdentityAgent
from sidecar.identity.tls import PrefixedStream, TlsContexts, accept

TD = "mesh.local"
SVCB = f"spiffe://{TD}/ns/default/sa/svcb"
PEM = serialization.Encoding.PEM
_KU = dict(content_commitment=False, key_encipherment=False, data_encipherment=False,
           key_agreement=False, encipher_only=False, decipher_only=False)


def _utc(t: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(t, dt.UTC)


class CA:
    """A test CA with the meshd profile (ecosystem-conventions §8); ``parent`` for intermediates."""

    def __init__(self, cn: str = "test root", parent: CA | None = None) -> None:
        self.key = certs.new_key()
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        signer = parent or self
        now = time.time()
        builder = (x509.CertificateBuilder().subject_name(self.name)
                   .issuer_name(parent.name if parent else self.name)
                   .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(_utc(now - 86400)).not_valid_after(_utc(now + 86400 * 3650))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                                crl_sign=True, **_KU), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()),
                                  critical=False))
        self.cert = builder.sign(signer.key, hashes.SHA256())
        self.pem = self.cert.public_bytes(PEM).decode()

    def issue(self, public_key: ec.EllipticCurvePublicKey, uris: list[str], not_before: float,
              not_after: float) -> str:
        leaf = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(self.name)
                .public_key(public_key).serial_number(x509.random_serial_number())
                .not_valid_before(_utc(not_before)).not_valid_after(_utc(not_after))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False,
                                             crl_sign=False, **_KU), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .add_extension(x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(u) for u in uris]), critical=True)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self.key.public_key()), critical=False)
                .sign(self.key, hashes.SHA256()))
        return leaf.public_bytes(PEM).decode()


@pytest.fixture(scope="module")
def ca() -> CA:
    return CA()


# -- certs ------------------------------------------------------------------------------------


def test_key_and_csr_request_the_spiffe_id() -> None:
    key = certs.new_key()
    assert key.curve.name == "secp256r1"
    csr = x509.load_pem_x509_csr(certs.make_csr(key, SVCB).encode())
    assert csr.is_signature_valid
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [SVCB]
    assert certs.load_key(certs.key_pem(key)).private_numbers() == key.private_numbers()


@pytest.mark.parametrize("uris", [[], ["https://svcb"], [SVCB, f"spiffe://{TD}/ns/default/sa/x"]])
def test_spiffe_id_needs_exactly_one_spiffe_uri(ca: CA, uris: list[str]) -> None:
    now = time.time()
    pem = ca.issue(certs.new_key().public_key(), uris, now - 60, now + 60) if uris else None
    cert = certs.load_cert(pem) if pem else ca.cert  # the root has no SAN at all
    with pytest.raises(IdentityError) as err:
        certs.spiffe_id_of(cert)
    assert err.value.reason == "no-spiffe-id"  # type: ignore[attr-defined]


def test_check_issued_accepts_a_good_certificate_and_intermediates(ca: CA) -> None:
    key, now = certs.new_key(), time.time()
    pem = ca.issue(key.public_key(), [SVCB], now - 60, now + 3600)
    certs.check_issued(pem, [], [ca.pem], key, SVCB, now)
    assert certs.spiffe_id_of(x509.load_pem_x509_certificate(pem.encode()).public_bytes(
        serialization.Encoding.DER)) == SVCB
    mid = CA("intermediate", parent=ca)
    pem2 = mid.issue(key.public_key(), [SVCB], now - 60, now + 3600)
    certs.check_issued(pem2, [mid.pem], [ca.pem], key, SVCB, now)
    with pytest.raises(IdentityError, match="wrong-ca"):
        certs.check_issued(pem2, [], [ca.pem], key, SVCB, now)  # intermediate missing


def _bad_issue(kind: str, ca: CA, key: certs.PrivateKey, now: float) -> tuple[str, str]:
    """(certificate PEM, bundle root PEM) for one kind of bad certificate."""
    pub, uris, nb, na, signer = key.public_key(), [SVCB], now - 60, now + 3600, ca
    if kind == "expired":
        nb, na = now - 7200, now - 3600
    elif kind == "not-yet-valid":
        nb, na = now + 3600, now + 7200
    elif kind == "wrong-ca":
        signer = CA("rogue")
    elif kind == "wrong-san":
        uris = [f"spiffe://{TD}/ns/default/sa/mallory"]
    elif kind == "key-mismatch":
        pub = certs.new_key().public_key()
    return signer.issue(pub, uris, nb, na), ca.pem


BAD_KINDS = ["expired", "not-yet-valid", "wrong-ca", "wrong-san", "key-mismatch"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_check_issued_refuses_with_a_precise_reason(ca: CA, kind: str) -> None:
    key, now = certs.new_key(), time.time()
    pem, root = _bad_issue(kind, ca, key, now)
    with pytest.raises(IdentityError, match=f"^{kind}: ") as err:
        certs.check_issued(pem, [], [root], key, SVCB, now)
    assert err.value.reason == kind  # type: ignore[attr-defined]


def test_proof_round_trip() -> None:
    key, other = certs.new_key(), certs.new_key()
    csr = certs.make_csr(certs.new_key(), SVCB)
    p = certs.proof(key, csr)
    assert certs.verify_proof(key.public_key(), csr, p)
    assert not certs.verify_proof(other.public_key(), csr, p)
    assert not certs.verify_proof(key.public_key(), certs.make_csr(certs.new_key(), SVCB), p)
    assert not certs.verify_proof(key.public_key(), csr, "not base64!")


@given(nb=st.floats(0, 2e9), lifetime=st.floats(1, 1e8), u=st.floats(-1, 2))
def test_renew_at_is_within_45_to_55_percent(nb: float, lifetime: float, u: float) -> None:
    at = certs.renew_at(nb, nb + lifetime, lambda lo, hi: lo + u * (hi - lo))
    tol = 4 * math.ulp(nb + lifetime)  # float rounding of absolute unix times
    assert 0.45 * lifetime - tol <= at - nb <= 0.55 * lifetime + tol


def test_renew_at_never_in_the_past_and_rejects_empty_lifetimes() -> None:
    assert certs.renew_at(0, 100, now=90) == 90
    assert 45 <= certs.renew_at(0, 100, now=10) <= 55
    with pytest.raises(ValueError):
        certs.renew_at(100, 100)


# -- the agent against a fake meshd -----------------------------------------------------------


class FakeMeshd:
    """``/v1/identity`` per the contract; ``bad`` makes it issue one kind of bad certificate,
    ``down`` answers 503; ``log`` records (kind, body) of each CSR request."""

    def __init__(self, ca: CA, wall: Callable[[], float], lifetime: float = 86400.0) -> None:
        self.ca, self.wall, self.lifetime = ca, wall, lifetime
        self.token = "join-svcb"
        self.bad: str | None = None
        self.down = False
        self.log: list[tuple[str, dict[str, str]]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            return httpx.Response(503)
        if request.url.path == "/v1/identity/bundle":
            return httpx.Response(200, json={"trust_bundle": [self.ca.pem], "trust_domain": TD})
        body = json.loads(request.content)
        csr = x509.load_pem_x509_csr(body["csr"].encode())
        uri = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
            .get_values_for_type(x509.UniformResourceIdentifier)[0]
        if "token" in body:
            kind, ok = "token", body["token"] == self.token
        else:
            old = x509.load_pem_x509_certificate(body["cert"].encode())
            kind = "proof"
            ok = (certs.verify_proof(old.public_key(), body["csr"], body["proof"])  # type: ignore[arg-type]
                  and self.wall() < old.not_valid_after_utc.timestamp())
        self.log.append((kind, body))
        if not ok:
            return httpx.Response(401, json={"error": f"bad {kind}"})
        if uri != SVCB:
            return httpx.Response(403, json={"error": "identity mismatch"})
        return httpx.Response(200, json=self._issue(csr.public_key()))  # type: ignore[arg-type]

    def _issue(self, pub: ec.EllipticCurvePublicKey) -> dict[str, object]:
        now = self.wall()
        if self.bad:
            pem, _ = _bad_issue(self.bad, self.ca, _KeyShim(pub), now)  # type: ignore[arg-type]
        else:
            pem = self.ca.issue(pub, [SVCB], now - 1, now + self.lifetime)
        na = x509.load_pem_x509_certificate(pem.encode()).not_valid_after_utc.timestamp()
        return {"cert": pem, "chain": [], "trust_bundle": [self.ca.pem], "not_after": na,
                "session_token": f"sess-{len(self.log)}", "spiffe_id": SVCB}


class _KeyShim:
    def __init__(self, pub: ec.EllipticCurvePublicKey) -> None:
        self._pub = pub

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._pub


def _boot(tmp_path: Path, token: str = "join-svcb") -> Bootstrap:
    return Bootstrap(service="svcb", app_port=8080, token=token, data_dir=str(tmp_path),
                     meshd_addr="http://meshd")


def _agent(tmp_path: Path, fake: Callable[[httpx.Request], httpx.Response],
           wall: Callable[[], float] = time.time, token: str = "join-svcb") -> IdentityAgent:
    client = httpx.AsyncClient(transport=httpx.MockTransport(fake))
    return IdentityAgent(_boot(tmp_path, token), client, wall=wall)


def _spki(key: certs.PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


async def test_first_certificate_by_token_then_renewal_by_proof(ca: CA, tmp_path: Path) -> None:
    fake = FakeMeshd(ca, time.time)
    agent = _agent(tmp_path, fake)
    seen: list[certs.Credentials] = []
    agent.on_change(seen.append)
    first = await agent.obtain()
    assert fake.log[0][0] == "token" and first.spiffe_id == SVCB and first.session_token == "sess-1"
    assert agent.ready.is_set()
    second = await agent.obtain()
    assert fake.log[1][0] == "proof"  # the fake verified the proof with the old certificate's key
    assert _spki(second.key) != _spki(first.key) and second.serial != first.serial
    assert [c.serial for c in seen] == [first.serial, second.serial]
    stats = agent.statistics()
    assert (stats.renewals, stats.failures, stats.rejected) == (2, 0, 0)
    assert stats.serial == f"{second.serial:x}"


@pytest.mark.parametrize("kind", BAD_KINDS)
async def test_bad_certificate_from_meshd_is_rejected_before_the_swap(
        ca: CA, tmp_path: Path, kind: str) -> None:
    fake = FakeMeshd(ca, time.time)
    agent = _agent(tmp_path, fake)
    ctxs = TlsContexts()
    agent.on_change(ctxs.update)
    good = await agent.obtain()
    fake.bad = kind
    with pytest.raises(IdentityError, match=kind):
        await agent.obtain()
    assert agent.current is good and ctxs.creds is good and ctxs.swaps == 1
    assert agent.statistics().rejected == 1
    cached = json.loads((tmp_path / "identity" / "credentials.json").read_text())
    assert cached["cert"] == good.cert


async def test_disk_cache_survives_a_restart_with_meshd_down(ca: CA, tmp_path: Path) -> None:
    fake = FakeMeshd(ca, time.time)
    creds = await _agent(tmp_path, fake).obtain()
    path = tmp_path / "identity" / "credentials.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    fake.down = True
    restarted = _agent(tmp_path, fake)
    assert restarted.load_cached()
    cur = restarted.current
    assert cur is not None and (cur.serial, cur.spiffe_id) == (creds.serial, SVCB)
    assert _spki(cur.key) == _spki(creds.key)
    late = _agent(tmp_path, fake, wall=lambda: time.time() + 2 * 86400)
    assert not late.load_cached() and late.current is None  # expired on disk: not served
    other = IdentityAgent(Bootstrap(service="svca", app_port=1, data_dir=str(tmp_path)),
                          httpx.AsyncClient(transport=httpx.MockTransport(fake)))
    assert not other.load_cached()  # someone else's identity


async def test_expired_cache_falls_back_to_the_join_token(ca: CA, tmp_path: Path) -> None:
    offset = [0.0]
    fake = FakeMeshd(ca, lambda: time.time() + offset[0], lifetime=3600)
    agent = _agent(tmp_path, fake, wall=lambda: time.time() + offset[0])
    await agent.obtain()
    offset[0] = 7200.0  # the certificate expired while the VM was off
    await agent.obtain()
    assert [k for k, _ in fake.log] == ["token", "token"]


async def test_refusals_raise_identity_errors(ca: CA, tmp_path: Path) -> None:
    fake = FakeMeshd(ca, time.time)
    fake.token = "another"
    with pytest.raises(IdentityError, match="401"):
        await _agent(tmp_path, fake).obtain()
    with pytest.raises(IdentityError, match="no join token"):
        await _agent(tmp_path, fake, token="").obtain()
    assert not (tmp_path / "identity").exists()


async def test_run_renews_around_half_life_and_survives_an_outage(
        ca: CA, tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    base = time.time()

    def wall() -> float:
        return base + trio.current_time()

    fake = FakeMeshd(ca, wall, lifetime=100.0)
    agent = _agent(tmp_path, fake, wall=wall)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent.run)
        await agent.ready.wait()
        await trio.sleep(1000)
        assert 17 <= agent.statistics().renewals <= 23  # one per ~50 s
        fake.down = True
        held = agent.current
        assert held is not None
        await trio.sleep(held.not_after - wall() - 5)
        assert agent.current is held and agent.statistics().failures >= 3  # kept while valid
        fake.down = False
        await trio.sleep(5)
        cur = agent.current
        assert cur is not None and cur is not held and wall() < cur.not_after
        nursery.cancel_scope.cancel()
    kinds = [k for k, _ in fake.log]
    assert kinds[0] == "token" and set(kinds[1:]) == {"proof"}


# -- the PERMISSIVE peek wrapper on in-memory streams -----------------------------------------


async def test_prefixed_stream_behaves_as_a_stream() -> None:
    async def maker() -> tuple[PrefixedStream, PrefixedStream]:
        a, b = trio.testing.memory_stream_pair()
        return PrefixedStream(a, b""), PrefixedStream(b, b"")

    async def clogged() -> tuple[PrefixedStream, PrefixedStream]:
        a, b = trio.testing.lockstep_stream_pair()
        return PrefixedStream(a, b""), PrefixedStream(b, b"")

    await trio.testing.check_two_way_stream(maker, clogged)
    await trio.testing.check_half_closeable_stream(maker, None)  # lockstep pairs cannot half-close


async def test_prefixed_stream_redelivers_the_peeked_bytes() -> None:
    a, b = trio.testing.memory_stream_pair()
    await b.send_all(b"rest")
    s = PrefixedStream(a, b"GET ")
    assert await s.receive_some(2) == b"GE"
    assert await s.receive_some() == b"T "
    assert await s.receive_some() == b"rest"
    with pytest.raises(ValueError):
        await PrefixedStream(a, b"x").receive_some(0)
    await s.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await s.receive_some()


async def test_accept_permissive_on_memory_streams(ca: CA) -> None:
    """No socket: the peek falls back to PrefixedStream; plain text and TLS both pass."""
    def creds(sa: str) -> certs.Credentials:
        key, now = certs.new_key(), time.time()
        pem = ca.issue(key.public_key(), [f"spiffe://{TD}/ns/default/sa/{sa}"], now - 60, now + 3600)
        leaf = certs.load_cert(pem)
        return certs.Credentials(key, pem, (), (ca.pem,), f"spiffe://{TD}/ns/default/sa/{sa}",
                                 now - 60, now + 3600, leaf.serial_number)

    server, client = TlsContexts(creds("svcb")), TlsContexts(creds("svca"))
    a, b = trio.testing.memory_stream_pair()
    await b.send_all(b"GET / HTTP/1.1\r\n\r\n")
    stream, principal = await accept(a, server, "PERMISSIVE")
    assert principal is None and await stream.receive_some() == b"GET / HTTP/1.1\r\n\r\n"

    a, b = trio.testing.memory_stream_pair()
    tls_client = trio.SSLStream(b, client.client, https_compatible=True)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tls_client.do_handshake)
        stream, principal = await accept(a, server, "PERMISSIVE")
    assert principal == f"spiffe://{TD}/ns/default/sa/svca"
    await tls_client.send_all(b"hi")
    assert await stream.receive_some() == b"hi"
    assert (server.plaintext_accepted, server.handshakes) == (1, 1)
    with pytest.raises(ValueError):
        await accept(a, server, "OPTIONAL")



async def test_a_callback_veto_keeps_the_old_certificate(ca: CA, tmp_path: Path) -> None:
    agent = _agent(tmp_path, FakeMeshd(ca, time.time))
    good = await agent.obtain()
    changed = agent.changed

    def refuse(creds: certs.Credentials) -> None:
        if creds is not good:
            raise certs.fail("key-mismatch", "OpenSSL refused it")

    agent.on_change(refuse)
    with pytest.raises(IdentityError, match="key-mismatch"):
        await agent.obtain()
    assert agent.current is good and not changed.is_set()
    assert agent.statistics().rejected == 1


async def test_root_rotation_through_set_bundle(ca: CA, tmp_path: Path) -> None:
    agent = _agent(tmp_path, FakeMeshd(ca, time.time))
    ctxs = TlsContexts()
    agent.on_change(ctxs.update)
    await agent.obtain()
    new_root = CA("new root")
    assert agent.set_bundle([ca.pem, new_root.pem])  # 1. publish the new root beside the old
    assert ctxs.swaps == 2 and agent.current is not None and len(agent.current.bundle) == 2
    assert not agent.set_bundle([ca.pem, new_root.pem])
    assert agent._renew_at > time.time()
    assert agent.set_bundle([new_root.pem])  # 3. old root gone, our leaf is still old: renew now
    assert agent._renew_at == 0.0
    with pytest.raises(IdentityError, match="malformed"):
        agent.set_bundle(["not a certificate"])
    assert agent.current.bundle == (new_root.pem,) and agent.statistics().rejected == 1
    cached = json.loads((tmp_path / "identity" / "credentials.json").read_text())
    assert cached["trust_bundle"] == [new_root.pem]

"""meshd's CA and tokens with real crypto: X509-SVID profile, strict verifiers, plugged-in
intermediate, root rotation, join/session tokens, the schema-3 store migration."""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
import ssl
import stat
from pathlib import Path

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from meshd.errors import ConfigError
from meshd.identity import Refusal, make_root, to_pem
from meshd.identity.ca import CertificateAuthority, RotationError
from meshd.identity.tokens import TokenIssuer, load_secret
from meshd.store.sqlite import SqliteStore

T0 = 1_800_000_000.0
WEB = "spiffe://cluster.local/ns/default/sa/web"


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_csr(key: object = None, uris: tuple[str, ...] = (), subject: str = "") -> tuple[bytes, object]:
    """A PEM CSR (optionally with a subject CN and URI SANs) and its private key."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)] if subject else [])
    b = x509.CertificateSigningRequestBuilder().subject_name(name)
    if uris:
        names = [x509.UniformResourceIdentifier(u) for u in uris] + [x509.DNSName("evil.example")]
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM), key  # type: ignore[arg-type]


def load(pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode())


def verify(leaf: x509.Certificate, roots: list[x509.Certificate], at: float,
           chain: list[x509.Certificate] | None = None) -> list[str]:
    when = dt.datetime.fromtimestamp(at, dt.UTC)
    res = PolicyBuilder().store(Store(roots)).time(when).build_client_verifier().verify(leaf, chain or [])
    return [str(s.value) for s in res.subjects or []]


def ext(cert: x509.Certificate, cls: type) -> x509.Extension:  # type: ignore[type-arg]
    return cert.extensions.get_extension_for_class(cls)


def test_root_created_private_and_reloaded(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "ca", "mesh.test", clock=Clock())
    root = ca.trust_certs()[0]
    assert stat.S_IMODE(os.stat(tmp_path / "ca").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "ca" / "root.key").st_mode) == 0o600
    assert root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "meshd root CA mesh.test"
    bc, ku = ext(root, x509.BasicConstraints), ext(root, x509.KeyUsage)
    assert bc.critical and bc.value.ca and ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert ext(root, x509.SubjectKeyIdentifier).value.digest
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)
    life = root.not_valid_after_utc - root.not_valid_before_utc
    assert abs(life.total_seconds() - (3650 * 86400 + 60)) < 2
    again = CertificateAuthority(tmp_path / "ca", "mesh.test", clock=Clock())
    assert again.trust_bundle() == ca.trust_bundle()
    assert (tmp_path / "ca" / "bundle.pem").read_text() == ca.trust_bundle()[0]


def test_leaf_is_an_x509_svid(tmp_path: Path) -> None:
    clock = Clock()
    ca = CertificateAuthority(tmp_path / "ca", "cluster.local", clock=clock)
    csr, key = make_csr(uris=("spiffe://cluster.local/ns/default/sa/admin",), subject="admin")
    issued = ca.sign_csr(csr, WEB, 3600)
    leaf, root = load(issued.cert_pem), ca.trust_certs()[0]
    assert leaf.subject == x509.Name([]) and issued.chain_pems == [] and issued.not_after == T0 + 3600
    san = ext(leaf, x509.SubjectAlternativeName)
    assert san.critical and list(san.value) == [x509.UniformResourceIdentifier(WEB)]
    bc, ku = ext(leaf, x509.BasicConstraints), ext(leaf, x509.KeyUsage)
    assert bc.critical and not bc.value.ca
    assert ku.critical and ku.value.digital_signature and ku.value.key_encipherment
    assert not ku.value.key_cert_sign
    assert list(ext(leaf, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH,
                                                            ExtendedKeyUsageOID.CLIENT_AUTH]
    assert ext(leaf, x509.SubjectKeyIdentifier).value == \
        x509.SubjectKeyIdentifier.from_public_key(key.public_key())  # type: ignore[attr-defined]
    assert ext(leaf, x509.AuthorityKeyIdentifier).value.key_identifier == \
        ext(root, x509.SubjectKeyIdentifier).value.digest
    assert leaf.not_valid_before_utc.timestamp() == T0 - 60
    assert leaf.not_valid_after_utc.timestamp() == T0 + 3600
    assert 0 < leaf.serial_number < 2**128 and f"{leaf.serial_number:x}" == issued.serial
    assert verify(leaf, [root], T0) == [WEB]
    assert ca.verify_workload(leaf) == WEB
    with pytest.raises(VerificationError):
        verify(leaf, [root], T0 + 3601)


def test_leaf_passes_openssl_strict_mtls(tmp_path: Path) -> None:
    """A TLS 1.3 mutual handshake in memory with VERIFY_X509_STRICT on both ends."""
    ca = CertificateAuthority(tmp_path / "ca", "cluster.local")
    files = {}
    for name in ("client", "server"):
        csr, key = make_csr()
        (tmp_path / f"{name}.pem").write_text(ca.sign_csr(csr, WEB.replace("web", name), 600).cert_pem)
        (tmp_path / f"{name}.key").write_bytes(key.private_bytes(  # type: ignore[attr-defined]
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        files[name] = (str(tmp_path / f"{name}.pem"), str(tmp_path / f"{name}.key"))
    ctxs = []
    for name, purpose in (("client", ssl.Purpose.SERVER_AUTH), ("server", ssl.Purpose.CLIENT_AUTH)):
        ctx = ssl.create_default_context(purpose, cadata="".join(ca.trust_bundle()))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_REQUIRED
        ctx.load_cert_chain(*files[name])
        ctxs.append(ctx)
    bios = [ssl.MemoryBIO() for _ in range(4)]
    client = ctxs[0].wrap_bio(bios[0], bios[1], server_side=False)
    server = ctxs[1].wrap_bio(bios[2], bios[3], server_side=True)
    done = set()
    for _ in range(10):
        for name, conn in (("client", client), ("server", server)):
            try:
                conn.do_handshake()
                done.add(name)
            except ssl.SSLWantReadError:
                pass
        bios[2].write(bios[1].read())
        bios[0].write(bios[3].read())
    assert done == {"client", "server"} and server.version() == "TLSv1.3"
    peer = x509.load_der_x509_certificate(server.getpeercert(binary_form=True))
    assert ext(peer, x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier) == [WEB.replace("web", "client")]


def test_rsa_accepted_weak_or_broken_csr_refused(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "ca", "cluster.local")
    rsa_csr, _ = make_csr(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    assert verify(load(ca.sign_csr(rsa_csr, WEB, 60).cert_pem), ca.trust_certs(), _now()) == [WEB]
    weak = [make_csr(rsa.generate_private_key(public_exponent=65537, key_size=1024))[0],
            make_csr(ec.generate_private_key(ec.SECP384R1()))[0], b"not a csr"]
    good = x509.load_pem_x509_csr(make_csr()[0]).public_bytes(serialization.Encoding.DER)
    tampered = bytearray(good)
    tampered[-5] ^= 0xFF  # inside the signature
    weak.append(x509.load_der_x509_csr(bytes(tampered)).public_bytes(serialization.Encoding.PEM))
    for csr in weak:
        with pytest.raises(Refusal) as err:
            ca.sign_csr(csr, WEB, 60)
        assert err.value.reason == "bad_csr" and err.value.status == 400


def _now() -> float:
    return dt.datetime.now(dt.UTC).timestamp()


def _intermediate(tmp_path: Path) -> tuple[x509.Certificate, x509.Certificate]:
    """An operator's root and an intermediate it signed; files in tmp_path/op."""
    root, root_key = make_root("corp.example", _now(), 86400 * 365)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "corp mesh intermediate")])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    inter = (x509.CertificateBuilder().subject_name(name).issuer_name(root.subject)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(root.not_valid_before_utc).not_valid_after(root.not_valid_after_utc)
             .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
             .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                            critical=True)
             .add_extension(ski, critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                 ext(root, x509.SubjectKeyIdentifier).value), critical=False)
             .sign(root_key, hashes.SHA256()))
    op = tmp_path / "op"
    op.mkdir()
    (op / "int.pem").write_text(to_pem(inter))
    (op / "int.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                   serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    (op / "root.pem").write_text(to_pem(root))
    (op / "other.key").write_bytes(root_key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    return root, inter


def test_plugged_in_intermediate_chains(tmp_path: Path) -> None:
    root, inter = _intermediate(tmp_path)
    op = tmp_path / "op"
    ca = CertificateAuthority(tmp_path / "ca", "cluster.local", ca_cert=str(op / "int.pem"),
                              ca_key=str(op / "int.key"), ca_bundle=str(op / "root.pem"))
    issued = ca.sign_csr(make_csr()[0], WEB, 600)
    assert issued.chain_pems == [to_pem(inter)] and ca.trust_bundle() == [to_pem(root)]
    leaf = load(issued.cert_pem)
    assert verify(leaf, [root], _now(), [inter]) == [WEB] and ca.verify_workload(leaf) == WEB
    assert ext(leaf, x509.AuthorityKeyIdentifier).value.key_identifier == \
        ext(inter, x509.SubjectKeyIdentifier).value.digest
    with pytest.raises(VerificationError):
        verify(leaf, [root], _now())  # the intermediate is needed
    bare = CertificateAuthority(tmp_path / "ca2", "cluster.local", ca_cert=str(op / "int.pem"),
                                ca_key=str(op / "int.key"))
    assert bare.trust_bundle() == [to_pem(inter)]
    assert verify(load(bare.sign_csr(make_csr()[0], WEB, 600).cert_pem), [inter], _now()) == [WEB]
    with pytest.raises(RotationError):
        bare.rotate_root()
    with pytest.raises(ConfigError, match="does not belong"):
        CertificateAuthority(tmp_path / "ca3", "cluster.local", ca_cert=str(op / "int.pem"),
                             ca_key=str(op / "other.key"))
    with pytest.raises(ConfigError, match="cannot read certificates"):
        CertificateAuthority(tmp_path / "ca4", "cluster.local", ca_cert=str(op / "int.key"),
                             ca_key=str(op / "int.key"))


def test_root_rotation_sequence(tmp_path: Path) -> None:
    clock = Clock(_now())
    ca = CertificateAuthority(tmp_path / "ca", "cluster.local", leaf_ttl=3600, clock=clock)
    old = ca.trust_certs()[0]
    leaf_a = load(ca.sign_csr(make_csr()[0], WEB, 3600).cert_pem)
    with pytest.raises(RotationError):
        ca.activate_new_root()
    with pytest.raises(RotationError):
        ca.retire_old_root(force=True)
    assert ca.rotate_root() == "root-2"
    new = ca.trust_certs()[0]
    assert ca.trust_certs() == [new, old] and new != old and ca.status()["rotation"] == "published"
    with pytest.raises(RotationError):
        ca.rotate_root()
    leaf_b = load(ca.sign_csr(make_csr()[0], WEB, 3600).cert_pem)
    assert leaf_b.issuer == old.subject  # old root still signs until activation
    assert verify(leaf_b, [old], clock.t) == [WEB]
    assert ca.activate_new_root() == "root-2"
    leaf_c = load(ca.sign_csr(make_csr()[0], WEB, 3600).cert_pem)
    assert verify(leaf_c, [new], clock.t) == [WEB]
    for leaf in (leaf_a, leaf_b, leaf_c):  # the overlap: every leaf verifies against the bundle
        assert ca.verify_workload(leaf) == WEB
    with pytest.raises(RotationError, match="stay valid until"):
        ca.retire_old_root()
    clock.t += 3601
    assert ca.retire_old_root() == ["root"] and ca.trust_certs() == [new]
    assert not (tmp_path / "ca" / "root.key").exists()
    assert (tmp_path / "ca" / "retired" / "root.pem").exists()
    reopened = CertificateAuthority(tmp_path / "ca", "cluster.local", clock=clock)
    assert reopened.trust_certs() == [new] and reopened.status()["roots"][0]["signing"]
    assert load(reopened.sign_csr(make_csr()[0], WEB, 60).cert_pem).issuer == new.subject


# -- tokens ------------------------------------------------------------------------------------

@pytest.fixture
def issuer(tmp_path: Path) -> TokenIssuer:
    return TokenIssuer(load_secret(tmp_path / "ca"), SqliteStore(tmp_path), "cluster.local", Clock())


def _reason(issuer: TokenIssuer, token: str, typ: str | None = None) -> str:
    with pytest.raises(Refusal) as err:
        issuer.verify(token, typ)
    assert err.value.status == 401
    return f"{err.value.reason}: {err.value}"


def test_token_valid_and_claims(issuer: TokenIssuer, tmp_path: Path) -> None:
    token, claims = issuer.create("web", "shop", 3600)
    got = issuer.verify(token, "join")
    assert got == claims and got.sub == "spiffe://cluster.local/ns/shop/sa/web" and got.typ == "join"
    assert (got.iss, got.svc, got.ns, got.exp - got.iat) == ("meshd", "web", "shop", 3600)
    assert stat.S_IMODE(os.stat(tmp_path / "ca" / "token.key").st_mode) == 0o600
    assert [r.jti for r in issuer.records()] == [claims.jti]


def test_token_expired_revoked_forged_wrong_type(issuer: TokenIssuer) -> None:
    token, claims = issuer.create("web", "default", 60)
    session = issuer.session("web", "default", claims.jti, T0 + 30)
    assert issuer.verify(session).typ == "session"
    assert _reason(issuer, session, "join") == "token_wrong_type: wrong token type"
    forged = jwt.encode({**jwt.decode(token, options={"verify_signature": False})}, "x" * 32,
                        algorithm="HS256")
    assert _reason(issuer, forged) == "bad_token: bad token signature"
    assert _reason(issuer, "not.a.jwt").startswith("bad_token: malformed token")
    other = TokenIssuer(os.urandom(32), issuer.store, "cluster.local", issuer.clock)
    assert _reason(other, token) == "bad_token: bad token signature"
    issuer.clock.t += 60  # type: ignore[attr-defined]
    assert _reason(issuer, token) == "token_expired: token expired"
    token2, claims2 = issuer.create("web", "default", 600)
    session2 = issuer.session("web", "default", claims2.jti, T0 + 600)
    assert issuer.revoke(claims2.jti) and not issuer.revoke("nope")
    assert _reason(issuer, token2) == "token_revoked: token revoked"
    assert _reason(issuer, session2) == "token_revoked: token revoked"  # the lineage goes too
    assert issuer.store.get_token(claims2.jti).revoked == T0 + 60  # type: ignore[union-attr]


def test_store_schema_2_migrates_to_3(tmp_path: Path) -> None:
    SqliteStore(tmp_path).close()
    db = sqlite3.connect(tmp_path / "meshd.db")
    db.executescript("DROP TABLE tokens; DROP TABLE certs; UPDATE meta SET value = '2' WHERE key = 'schema';")
    db.commit()
    db.close()
    store = SqliteStore(tmp_path)
    assert store._meta("schema") == "3"
    store.put_cert("ab", "j1", WEB, T0, T0 - 1)
    assert store.cert_jti("ab") == "j1" and store.get_token("j1") is None
    store.put_cert("cd", "j2", WEB, T0 + 10, T0 + 1)  # "ab" expired: forgotten
    assert store.cert_jti("ab") is None and store.cert_jti("cd") == "j2"

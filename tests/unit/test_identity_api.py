"""Identity API in-process (httpx ASGITransport): first certificate, renewal with proof, refusals
with their counters, operator-only routes, sidecar routes bound to the token's service."""

from __future__ import annotations

import base64
import datetime as dt
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.verification import PolicyBuilder, Store

from meshd.identity.service import IdentityConfig, IdentityService
from meshd.server.api import build_app
from meshd.server.control import ControlPlane
from meshd.store.sqlite import SqliteStore

OP = "operator-secret"
WEB = "spiffe://cluster.local/ns/default/sa/web"
INST = {"service": "web", "instance_id": "web-1", "address": "127.0.0.1", "port": 15006, "ttl": 5}


class Clock:
    def __init__(self) -> None:
        self.t = dt.datetime.now(dt.UTC).timestamp()

    def __call__(self) -> float:
        return self.t


class Mesh:
    """A control plane with an identity service and a fake wall clock."""

    def __init__(self, tmp_path: Path, operator: str = OP) -> None:
        store = SqliteStore(tmp_path)
        self.cp = ControlPlane(store)
        self.cp.start()
        self.clock = Clock()
        self.identity = IdentityService.open(tmp_path, IdentityConfig(cert_ttl=3600), store, self.clock)
        self.app = build_app(self.cp, operator, self.identity)

    def client(self, bearer: str = "") -> httpx.AsyncClient:
        headers = {"authorization": f"Bearer {bearer}"} if bearer else {}
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://meshd",
                                 headers=headers)

    async def join_token(self, service: str = "web") -> str:
        async with self.client(OP) as c:
            r = await c.post("/v1/tokens", json={"service": service, "ttl": "1h"})
        assert r.status_code == 200, r.text
        return str(r.json()["token"])


@pytest.fixture
async def mesh(tmp_path: Path) -> Mesh:
    return Mesh(tmp_path)


def csr_for(key: PrivateKeyTypes, uri: str = "") -> str:
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if uri:
        san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)])
        b = b.add_extension(san, critical=False)
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()  # type: ignore[arg-type]


def proof(key: PrivateKeyTypes, csr_pem: str) -> str:
    der = x509.load_pem_x509_csr(csr_pem.encode()).public_bytes(serialization.Encoding.DER)
    if isinstance(key, rsa.RSAPrivateKey):
        return base64.b64encode(key.sign(der, padding.PKCS1v15(), hashes.SHA256())).decode()
    return base64.b64encode(key.sign(der, ec.ECDSA(hashes.SHA256()))).decode()  # type: ignore[union-attr]


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


async def first_cert(mesh: Mesh, key: PrivateKeyTypes, **extra: Any) -> httpx.Response:
    token = await mesh.join_token()
    async with mesh.client() as c:
        return await c.post("/v1/identity/csr", json={"csr": csr_for(key, WEB), "token": token, **extra})


async def test_first_certificate_with_join_token(mesh: Mesh) -> None:
    r = await first_cert(mesh, new_key(), service="web", namespace="default")
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"cert", "chain", "trust_bundle", "not_after", "session_token", "spiffe_id"}
    assert body["spiffe_id"] == WEB and body["chain"] == []
    assert body["not_after"] == float(int(mesh.clock.t + 3600))
    leaf = x509.load_pem_x509_certificate(body["cert"].encode())
    roots = [x509.load_pem_x509_certificate(p.encode()) for p in body["trust_bundle"]]
    when = dt.datetime.fromtimestamp(mesh.clock.t, dt.UTC)
    res = PolicyBuilder().store(Store(roots)).time(when).build_client_verifier().verify(leaf, [])
    assert [s.value for s in res.subjects or []] == [WEB]
    session = mesh.identity.tokens.verify(body["session_token"], "session")
    assert (session.sub, session.exp) == (WEB, int(body["not_after"]))
    async with mesh.client() as c:  # roots are public
        bundle = (await c.get("/v1/identity/bundle")).json()
    assert bundle == {"trust_bundle": body["trust_bundle"], "trust_domain": "cluster.local"}
    assert mesh.identity.stats()["issued"] == {"join": 1, "renewal": 0}


async def test_renewal_with_proof_and_refusals(mesh: Mesh) -> None:
    key = new_key()
    cert = (await first_cert(mesh, key)).json()["cert"]
    new = rsa.generate_private_key(public_exponent=65537, key_size=2048)  # a new key is fine
    csr = csr_for(new)
    async with mesh.client() as c:
        ok = await c.post("/v1/identity/csr", json={"csr": csr, "cert": cert, "proof": proof(key, csr)})
        assert ok.status_code == 200 and ok.json()["spiffe_id"] == WEB
        renewed = ok.json()["cert"]
        again = csr_for(new_key())  # renew the renewed (RSA) certificate
        r = await c.post("/v1/identity/csr", json={"csr": again, "cert": renewed, "proof": proof(new, again)})
        assert r.status_code == 200
        wrong = await c.post("/v1/identity/csr", json={"csr": csr, "cert": cert,
                                                        "proof": proof(new_key(), csr)})
        assert wrong.status_code == 401 and wrong.json()["reason"] == "bad_proof"
        junk = await c.post("/v1/identity/csr", json={"csr": csr, "cert": cert, "proof": "%%%"})
        assert junk.status_code == 401 and junk.json()["reason"] == "bad_proof"
        other = csr_for(key, "spiffe://cluster.local/ns/default/sa/db")
        denied = await c.post("/v1/identity/csr", json={"csr": other, "cert": cert,
                                                         "proof": proof(key, other)})
        assert denied.status_code == 403 and denied.json()["reason"] == "identity_mismatch"
        mesh.clock.t += 3601
        late = await c.post("/v1/identity/csr", json={"csr": csr, "cert": cert, "proof": proof(key, csr)})
        assert late.status_code == 401 and late.json()["reason"] == "cert_expired"
    stats = mesh.identity.stats()
    assert stats["issued"] == {"join": 1, "renewal": 2}
    assert stats["refused"] == {"bad_proof": 2, "cert_expired": 1, "identity_mismatch": 1}


async def test_untrusted_certificate_refused(mesh: Mesh, tmp_path: Path) -> None:
    rogue = Mesh(tmp_path / "rogue")
    key = new_key()
    cert = (await first_cert(rogue, key)).json()["cert"]  # same trust domain, another CA
    csr = csr_for(key)
    async with mesh.client() as c:
        r = await c.post("/v1/identity/csr", json={"csr": csr, "cert": cert, "proof": proof(key, csr)})
    assert r.status_code == 401 and r.json()["reason"] == "cert_untrusted"


async def test_csr_for_another_identity_refused(mesh: Mesh) -> None:
    token = await mesh.join_token()
    async with mesh.client() as c:
        san = await c.post("/v1/identity/csr", json={
            "csr": csr_for(new_key(), "spiffe://cluster.local/ns/default/sa/db"), "token": token})
        field = await c.post("/v1/identity/csr", json={"csr": csr_for(new_key()), "token": token,
                                                        "service": "db"})
        ns = await c.post("/v1/identity/csr", json={"csr": csr_for(new_key()), "token": token,
                                                     "namespace": "prod"})
    assert [r.status_code for r in (san, field, ns)] == [403, 403, 403]
    assert "sa/db" in san.json()["error"]
    assert mesh.identity.stats()["refused"] == {"identity_mismatch": 3}


async def test_bad_tokens_refused(mesh: Mesh) -> None:
    token = await mesh.join_token()
    jti = mesh.identity.tokens.verify(token).jti
    other = Mesh(mesh.identity.ca.dir.parent / "other")
    forged = await other.join_token()
    async with mesh.client() as c:
        got = [await c.post("/v1/identity/csr", json={"csr": csr_for(new_key()), "token": forged}),
               await c.post("/v1/identity/csr", json={"csr": "nope", "token": token}),
               await c.post("/v1/identity/csr", content=b"{not json")]
        async with mesh.client(OP) as op:
            assert (await op.delete(f"/v1/tokens/{jti}")).status_code == 200
            assert (await op.delete("/v1/tokens/unknown")).status_code == 404
            listed = (await op.get("/v1/tokens")).json()["tokens"]
        assert [(t["jti"], t["state"]) for t in listed] == [(jti, "revoked")]
        got.append(await c.post("/v1/identity/csr", json={"csr": csr_for(new_key()), "token": token}))
        expiring = await mesh.join_token()
        mesh.clock.t += 3600
        got.append(await c.post("/v1/identity/csr", json={"csr": csr_for(new_key()), "token": expiring}))
    assert [r.status_code for r in got] == [401, 400, 400, 401, 401]
    assert [r.json()["error"] for r in got[3:]] == ["token revoked", "token expired"]
    assert mesh.identity.stats()["refused"] == {"bad_csr": 1, "bad_request": 1, "bad_token": 1,
                                                "token_expired": 1, "token_revoked": 1}


async def test_operator_routes_refuse_mesh_tokens(mesh: Mesh) -> None:
    token = await mesh.join_token()
    session = (await first_cert(mesh, new_key())).json()["session_token"]
    for bearer, status in ((token, 403), (session, 403), ("garbage", 401), ("", 401)):
        async with mesh.client(bearer) as c:
            got = [await c.post("/v1/rules", content=b""), await c.post("/v1/tokens", json={"service": "x"}),
                   await c.get("/v1/tokens"), await c.post("/v1/ca/rotate"), await c.get("/v1/ca"),
                   await c.get("/v1/rules"), await c.get("/v1/proxy-status"),
                   await c.post("/v1/rules/simulate", json={})]
        assert {r.status_code for r in got} == {status}, bearer
    refused = mesh.identity.stats()["refused"]
    assert refused == {"operator_required": 16, "unauthenticated": 16}
    async with mesh.client(OP) as c:
        assert (await c.get("/v1/rules")).status_code == 200
        assert (await c.get("/v1/identity/stats")).json()["refused_total"] == 32


async def test_sidecar_routes_bound_to_the_tokens_service(mesh: Mesh) -> None:
    body = (await first_cert(mesh, new_key())).json()
    async with mesh.client(body["session_token"]) as c:
        assert (await c.post("/v1/registry/instances", json=INST)).status_code == 200
        other = await c.post("/v1/registry/instances", json={**INST, "service": "db", "instance_id": "d"})
        assert other.status_code == 403 and other.json()["reason"] == "wrong_service"
        assert (await c.put("/v1/registry/instances/web-1/heartbeat")).status_code == 200
        assert (await c.get("/v1/snapshot/web-1", params={"service": "web"})).status_code == 200
        assert (await c.get("/v1/snapshot/web-1", params={"service": "db"})).status_code == 403
        assert (await c.post("/v1/snapshot/web-1/ack", json={"version": "x"})).status_code == 200
    async with mesh.client(OP) as c:  # the operator may act for anyone
        assert (await c.post("/v1/registry/instances", json={**INST, "service": "db",
                                                              "instance_id": "db-1"})).status_code == 200
    async with mesh.client(await mesh.join_token()) as c:
        assert (await c.delete("/v1/registry/instances/db-1")).status_code == 403
        assert (await c.delete("/v1/registry/instances/web-1")).status_code == 200
    mesh.clock.t += 3600
    async with mesh.client(body["session_token"]) as c:
        late = await c.put("/v1/registry/instances/web-1/heartbeat")
    assert late.status_code == 401 and late.json()["error"] == "token expired"
    assert mesh.identity.stats()["refused"] == {"token_expired": 1, "wrong_service": 3}


async def test_ca_rotation_api(mesh: Mesh) -> None:
    async with mesh.client(OP) as c:
        assert (await c.post("/v1/ca/activate")).status_code == 409
        rotated = (await c.post("/v1/ca/rotate")).json()
        assert rotated["rotation"] == "published" and len(rotated["roots"]) == 2
        assert len((await c.get("/v1/identity/bundle")).json()["trust_bundle"]) == 2
        assert (await c.post("/v1/ca/activate")).json()["rotation"] == "activated"
        assert (await c.post("/v1/ca/retire")).status_code == 409
        done = (await c.post("/v1/ca/retire", params={"force": "1"})).json()
        assert done["rotation"] == "none" and [r["name"] for r in done["roots"]] == ["root-2"]
        assert (await c.post("/v1/ca/bogus")).status_code == 404


async def test_open_mode_still_checks_identity(tmp_path: Path) -> None:
    mesh = Mesh(tmp_path, operator="")
    async with mesh.client() as c:
        assert (await c.get("/v1/rules")).status_code == 200
        made = await c.post("/v1/tokens", json={"service": "web"})
        assert made.status_code == 200 and made.json()["spiffe_id"] == WEB
        bad = await c.post("/v1/tokens", json={"service": "Web!"})
        assert bad.status_code == 400
        refused = await c.post("/v1/identity/csr", json={"csr": csr_for(new_key()), "token": "x.y.z"})
        assert refused.status_code == 401
        ok = await c.post("/v1/identity/csr", json={"csr": csr_for(new_key()), "token": made.json()["token"]})
        assert ok.status_code == 200

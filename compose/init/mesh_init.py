#!/usr/bin/env python3
"""One-shot set-up of the Compose mesh, run by the `mesh-init` and `mesh-tokens` services.

    mesh_init.py secrets DIR
        Once (kept in the volume): DIR/operator-token (meshd's operator token), and a private CA
        for meshd's HTTPS API: DIR/api-ca.pem (the trust file sidecars and the CLI get) and
        DIR/api.pem + DIR/api.key for the names meshd, localhost, 127.0.0.1. Files 0600 except
        api-ca.pem (0644), owned by --uid.
    mesh_init.py tokens --secrets DIR --out ROOT INSTANCE=SERVICE ...
        For each instance, once: ROOT/INSTANCE/join-token from `meshd token create --service
        SERVICE` (0600) and ROOT/INSTANCE/meshd-ca.pem; ROOT/INSTANCE is that sidecar's data
        volume, so its certificate cache lives beside the token and survives re-creation.

Idempotent: existing files are kept, so `docker compose up` again changes nothing.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import secrets
import subprocess
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

API_NAMES = ("meshd", "localhost")
API_IPS = ("127.0.0.1",)
VALIDITY = datetime.timedelta(days=825)  # CA/Browser Forum maximum for server certificates
TOKEN_TTL = "8760h"  # join tokens live a year; after the first certificate renewals use proofs


def _write(path: Path, data: bytes, mode: int, uid: int) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, mode)
    if os.geteuid() == 0:
        os.chown(tmp, uid, uid)
    os.replace(tmp, path)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
          issuer_key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    b = (x509.CertificateBuilder().subject_name(name)
         .issuer_name(issuer.subject if issuer else name).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + VALIDITY)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if issuer is None:
        b = (b.add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
             .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                            critical=True))
    else:
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in API_NAMES]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in API_IPS]
        b = (b.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False),
                            critical=True)
             .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
             .add_extension(x509.SubjectAlternativeName(sans), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                            critical=False))
    return b.sign(issuer_key, hashes.SHA256())


def make_secrets(out: Path, uid: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "operator-token").exists():
        _write(out / "operator-token", secrets.token_urlsafe(32).encode() + b"\n", 0o600, uid)
        print("mesh-init: operator token created")
    if not (out / "api.pem").exists():
        ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
        ca = _cert("meshd API CA", ca_key, None, ca_key)
        leaf = _cert("meshd", key, ca, ca_key)
        _write(out / "api-ca.pem", ca.public_bytes(serialization.Encoding.PEM), 0o644, uid)
        _write(out / "api.key", _pem_key(key), 0o600, uid)
        _write(out / "api.pem", leaf.public_bytes(serialization.Encoding.PEM), 0o600, uid)
        print("mesh-init: meshd API certificate created (names: meshd, localhost, 127.0.0.1)")


def make_tokens(secrets_dir: Path, root: Path, pairs: list[str], uid: int) -> None:
    env = {**os.environ, "MESHD_TOKEN": (secrets_dir / "operator-token").read_text().strip(),
           "MESHD_CACERT": str(secrets_dir / "api-ca.pem")}
    for pair in pairs:
        instance, _, service = pair.partition("=")
        target = root / instance
        target.mkdir(parents=True, exist_ok=True)
        _write(target / "meshd-ca.pem", (secrets_dir / "api-ca.pem").read_bytes(), 0o644, uid)
        if (target / "join-token").exists():
            continue
        token = subprocess.run(["meshd", "token", "create", "--service", service or instance,
                                "--ttl", TOKEN_TTL], env=env, check=True, capture_output=True,
                               text=True).stdout.strip()
        _write(target / "join-token", token.encode() + b"\n", 0o600, uid)
        if os.geteuid() == 0:
            os.chown(target, uid, uid)
        print(f"mesh-tokens: join token for {instance} (service {service or instance})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--uid", type=int, default=1337, help="owner of the files (the image's mesh user)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("secrets")
    s.add_argument("dir", type=Path)
    t = sub.add_parser("tokens")
    t.add_argument("--secrets", type=Path, required=True)
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("pairs", nargs="+", help="INSTANCE=SERVICE")
    args = parser.parse_args()
    try:
        if args.cmd == "secrets":
            make_secrets(args.dir, args.uid)
        else:
            make_tokens(args.secrets, args.out, args.pairs, args.uid)
    except subprocess.CalledProcessError as exc:
        print(f"mesh-tokens: meshd token create failed: {exc.stderr.strip()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``meshd token ...``, ``meshd certs`` and ``meshd ca ...``: join tokens and the mesh CA.

``meshd token create --service NAME`` prints only the token, so ``MESHD_TOKEN=$(meshd token
create --service web)`` works; every other command prints a table or one line. All of them
need the operator token (``MESHD_TOKEN``) when meshd runs with one. Exit codes as the rest of
the CLI: 2 = rejected input or a rotation step out of order, 1 = not found, refused or
connection/server error.
"""

from __future__ import annotations

import datetime
from typing import Any

import click

from meshd.cli.client import Api, fail, pass_api


def _check(status: int, body: dict[str, Any]) -> dict[str, Any]:
    """``body`` of a 200 answer; anything else fails with the server's error line."""
    if status == 200:
        return body
    msg = str(body.get("error") or f"HTTP {status}")
    if status == 403:
        fail(f"meshd refused: {msg} (set MESHD_TOKEN to the operator token)")
    fail(msg, 2 if status in (400, 409) else 1)


def _when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@click.group("token")
def token_group() -> None:
    """Create, list and revoke join tokens for sidecars."""


@token_group.command("create")
@click.option("--service", required=True, help="service the token is bound to")
@click.option("--namespace", default="default", show_default=True)
@click.option("--ttl", default="720h", show_default=True, help="lifetime (s, m, h, d)")
@pass_api
def token_create(api: Api, service: str, namespace: str, ttl: str) -> None:
    """Print a join token for SERVICE (nothing else, for $(...))."""
    body = _check(*api.call("POST", "/v1/tokens",
                            json={"service": service, "namespace": namespace, "ttl": ttl}))
    click.echo(body["token"])


@token_group.command("list")
@pass_api
def token_list(api: Api) -> None:
    """Every join token: id, identity, state, expiry."""
    body = _check(*api.call("GET", "/v1/tokens"))
    click.echo(f"{'JTI':<34} {'STATE':<8} {'EXPIRES':<21} SPIFFE ID")
    for t in body["tokens"]:
        click.echo(f"{t['jti']:<34} {t['state']:<8} {_when(t['expires']):<21} {t['spiffe_id']}")


@token_group.command("revoke")
@click.argument("jti")
@pass_api
def token_revoke(api: Api, jti: str) -> None:
    """Revoke token JTI, its session tokens and the renewals of certificates issued under it."""
    _check(*api.call("DELETE", f"/v1/tokens/{jti}"))
    click.echo(f"token {jti} revoked")


def _print_ca(body: dict[str, Any]) -> None:
    click.echo(f"trust domain  {body['trust_domain']}")
    click.echo(f"CA            {body['mode']}, leaf certificates {body['cert_ttl'] / 3600:g}h")
    rotation = body["rotation"]
    if rotation == "published":
        rotation = "new root published, the old root still signs (next: meshd ca activate)"
    elif rotation == "activated":
        rotation = f"new root signs; retire the old root after {_when(body['retire_after'])}"
    click.echo(f"rotation      {rotation}")
    click.echo(f"{'':2}{'NAME':<16} {'SIGNS':<6} {'NOT AFTER':<21} SHA-256 FINGERPRINT")
    for kind, rows in (("root", body["roots"]), ("chain", body["chain"])):
        for r in rows:
            mark = "yes" if r["signing"] else ""
            click.echo(f"{'':2}{r['name']:<16} {mark:<6} {_when(r['not_after']):<21} {r['fingerprint']}"
                       f"{'  (intermediate)' if kind == 'chain' else ''}")


@click.command("certs")
@pass_api
def certs(api: Api) -> None:
    """Trust domain, the roots in the trust bundle (fingerprint, expiry) and which one signs."""
    _print_ca(_check(*api.call("GET", "/v1/ca")))


@click.group("ca")
def ca_group() -> None:
    """Root rotation: rotate (publish a new root), activate (it signs), retire (drop the old)."""


@ca_group.command("show")
@pass_api
def ca_show(api: Api) -> None:
    """Same as meshd certs."""
    _print_ca(_check(*api.call("GET", "/v1/ca")))


def _step(action: str, help_text: str, force_option: bool = False) -> click.Command:
    @pass_api
    def run(api: Api, force: bool = False) -> None:
        _print_ca(_check(*api.call("POST", f"/v1/ca/{action}", params={"force": "1" if force else "0"})))

    cmd = click.command(action, help=help_text)(run)
    if force_option:
        cmd = click.option("--force", is_flag=True,
                           help="retire even though leaves of the old root may still be valid")(cmd)
    return cmd


ca_group.add_command(_step("rotate", "Publish a new root next to the old one; the old one keeps signing."))
ca_group.add_command(_step("activate", "Sign new leaf certificates with the new root."))
ca_group.add_command(_step("retire", "Drop the old root from the trust bundle.", force_option=True))


def register_identity_commands(group: click.Group) -> None:
    """Add ``token``, ``certs`` and ``ca`` to the ``meshd`` group."""
    for command in (token_group, certs, ca_group):
        group.add_command(command)

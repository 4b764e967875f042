"""``meshd``: the controller (``meshd serve``) and the operator CLI, with click.

``MESHD_ADDR`` (default ``http://127.0.0.1:15010``) selects the controller and ``MESHD_TOKEN``
supplies the join token, as ``CONSUL_HTTP_ADDR``/``CONSUL_HTTP_TOKEN`` do for consul. Every
failure prints one clear line to stderr and exits non-zero (2 for usage/validation, 1 for
connection or server errors).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, NoReturn

import click
import httpx

DEFAULT_ADDR = "http://127.0.0.1:15010"


def fail(msg: str, code: int = 1) -> NoReturn:
    click.echo(f"error: {msg}", err=True)
    sys.exit(code)


class Api:
    """Thin sync client for meshd's API; errors become ``fail``."""

    def __init__(self, addr: str, token: str) -> None:
        self.addr = addr.rstrip("/")
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(base_url=self.addr, headers=headers, timeout=10.0)

    def call(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        try:
            resp = self.client.request(method, path, **kw)
        except httpx.HTTPError as exc:
            fail(f"cannot reach meshd at {self.addr}: {exc}")
        try:
            body = resp.json()
        except ValueError:
            body = {"error": resp.text.strip() or f"HTTP {resp.status_code}"}
        if resp.status_code == 401:
            fail("meshd refused the join token (set MESHD_TOKEN)")
        return resp.status_code, body


pass_api = click.make_pass_decorator(Api)


@click.group()
@click.option("--addr", envvar="MESHD_ADDR", default=DEFAULT_ADDR, show_default=True,
              help="meshd address (env MESHD_ADDR)")
@click.option("--token", envvar="MESHD_TOKEN", default="", help="join token (env MESHD_TOKEN)")
@click.pass_context
def main(ctx: click.Context, addr: str, token: str) -> None:
    """meshd — a service mesh for Docker Compose and plain VMs."""
    ctx.obj = Api(addr, token)


@main.command()
@click.option("--listen", default="127.0.0.1:15010", show_default=True, help="API host:port")
@click.option("--data-dir", default="/var/lib/meshd", show_default=True,
              type=click.Path(file_okay=False), help="where meshd.db lives")
@click.option("--token", "serve_token", envvar="MESHD_TOKEN", default="",
              help="require this join token on the API")
@click.option("--log-level", default="info", show_default=True)
def serve(listen: str, data_dir: str, serve_token: str, log_level: str) -> None:
    """Run the controller."""
    import trio

    from meshd.errors import ConfigError
    from meshd.server.main import run

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    try:
        trio.run(run, listen, data_dir, serve_token)
    except ConfigError as exc:
        fail(str(exc), 2)
    except OSError as exc:
        fail(f"cannot listen on {listen}: {exc.strerror or exc}")


def _print_errors(body: dict[str, Any]) -> None:
    errors = body.get("errors") or []
    for e in errors:
        where = f"{e['file']}:{e['line']}" if e.get("line") else e["file"]
        click.echo(f"{where}: {e['field']}: {e['reason']}" if e.get("field")
                   else f"{where}: {e['reason']}", err=True)
    if not errors:
        click.echo(f"error: {body.get('error')}", err=True)


@main.group()
def rule() -> None:
    """Push, list, get and delete routing rules."""


@rule.command("push")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--dry-run", is_flag=True, help="validate and show what would change")
@pass_api
def rule_push(api: Api, file: str, dry_run: bool) -> None:
    """Validate FILE.toml and apply every rule in it (whole file or nothing)."""
    text = Path(file).read_bytes()
    params = {"file": file, "dry_run": "1" if dry_run else "0"}
    status, body = api.call("POST", "/v1/rules", content=text, params=params)
    if status != 200:
        _print_errors(body)
        sys.exit(2)
    changes = body.get("changes", [])
    for action, kind, name in changes:
        click.echo(f"{kind}/{name} {action}{' (dry run)' if dry_run else 'd'}")
    if not changes:
        click.echo("no changes")
    if not dry_run:
        click.echo(f"version {body['version']}")


@rule.command("list")
@pass_api
def rule_list(api: Api) -> None:
    """List rules as KIND/NAME HOST SOURCE."""
    _, body = api.call("GET", "/v1/rules")
    for kind in ("route", "destination", "egress"):
        for r in body["rules"].get(kind, []):
            src = body["sources"].get(f"{kind}/{r['name']}", "")
            click.echo(f"{kind}/{r['name']}\t{r['host']}\t{src}")


@rule.command("get")
@click.argument("kind", type=click.Choice(["route", "destination", "egress"]))
@click.argument("name")
@pass_api
def rule_get(api: Api, kind: str, name: str) -> None:
    """Print one rule as JSON."""
    status, body = api.call("GET", f"/v1/rules/{kind}/{name}")
    if status != 200:
        fail(f"no {kind} rule named {name!r}")
    click.echo(json.dumps(body, indent=2))


@rule.command("delete")
@click.argument("kind", type=click.Choice(["route", "destination", "egress"]))
@click.argument("name")
@pass_api
def rule_delete(api: Api, kind: str, name: str) -> None:
    """Delete one rule (refused if other rules still reference it)."""
    status, body = api.call("DELETE", f"/v1/rules/{kind}/{name}")
    if status != 200:
        _print_errors(body)
        sys.exit(2 if status == 400 else 1)
    click.echo(f"{kind}/{name} deleted\nversion {body['version']}")


@main.command()
@pass_api
def services(api: Api) -> None:
    """Show the registry: service, instance, address, labels, health, lease left."""
    _, body = api.call("GET", "/v1/registry/services")
    click.echo(f"{'SERVICE':<12} {'INSTANCE':<22} {'ADDRESS':<28} {'HEALTH':<8} LABELS")
    for svc in body["services"]:
        for i in svc["instances"]:
            labels = ",".join(f"{k}={v}" for k, v in sorted(i["labels"].items()))
            addr = f"{i['address']}:{i['port']}"
            health = "passing" if i["healthy"] else "critical"
            click.echo(f"{svc['name']:<12} {i['instance_id']:<22} {addr:<28} {health:<8} {labels}")


@main.command("proxy-status")
@pass_api
def proxy_status(api: Api) -> None:
    """Every sidecar: intended version, applied version, state, last NACK reason."""
    _, body = api.call("GET", "/v1/proxy-status")
    click.echo(f"{'PROXY':<24} {'SERVICE':<10} {'INTENDED':<10} {'APPLIED':<10} {'STATE':<8} NACK")
    for p in body["proxies"]:
        nack = f"{p['nacked']}: {p['nack_reason']}" if p["nacked"] else "-"
        click.echo(f"{p['node']:<24} {p['service']:<10} {p['intended']:<10} {p['applied']:<10} "
                   f"{p['state']:<8} {nack}")


@main.command()
@click.option("--requests", "n", default=2000, show_default=True, help="requests for step (c)")
@click.option("--keep", is_flag=True, help="keep the work directory with logs")
def demo(n: int, keep: bool) -> None:
    """Run the seed-article scenario on loopback as real processes (exit 0 = all steps OK)."""
    from meshd.demo.scenario import run_demo

    sys.exit(run_demo(n, keep))


if __name__ == "__main__":
    main()

"""``meshd``: the controller (``meshd serve``) and the operator CLI, with click.

``MESHD_ADDR`` (default ``http://127.0.0.1:15010``) selects the controller and ``MESHD_TOKEN``
supplies the operator token, as ``CONSUL_HTTP_ADDR``/``CONSUL_HTTP_TOKEN`` do for consul. Every
failure prints one clear line to stderr and exits non-zero (2 for usage/validation, 1 for
connection or server errors). The ``rule`` group lives in ``meshd.cli.rules``, ``token``,
``certs`` and ``ca`` in ``meshd.cli.identity``, the API client in ``meshd.cli.client``.
"""

from __future__ import annotations

import json
import logging
import sys

import click

from meshd.cli.client import DEFAULT_ADDR, Api, fail, pass_api
from meshd.cli.identity import register_identity_commands
from meshd.cli.rules import rule


@click.group()
@click.option("--addr", envvar="MESHD_ADDR", default=DEFAULT_ADDR, show_default=True,
              help="meshd address (env MESHD_ADDR)")
@click.option("--token", envvar="MESHD_TOKEN", default="", help="operator token (env MESHD_TOKEN)")
@click.pass_context
def main(ctx: click.Context, addr: str, token: str) -> None:
    """meshd — a service mesh for Docker Compose and plain VMs."""
    ctx.obj = Api(addr, token)


main.add_command(rule)
register_identity_commands(main)  # token, certs, ca


@main.command()
@click.option("--listen", default="127.0.0.1:15010", show_default=True, help="API host:port")
@click.option("--data-dir", default="/var/lib/meshd", show_default=True,
              type=click.Path(file_okay=False), help="where meshd.db lives")
@click.option("--token", "serve_token", envvar="MESHD_TOKEN", default="",
              help="operator token the API requires (env MESHD_TOKEN)")
@click.option("--trust-domain", envvar="MESHD_TRUST_DOMAIN", default="cluster.local", show_default=True,
              help="SPIFFE trust domain of workload identities")
@click.option("--ca-cert", default="", help="plugged-in CA certificate (root or intermediate) PEM")
@click.option("--ca-key", default="", help="private key PEM of --ca-cert")
@click.option("--ca-bundle", default="", help="root(s) PEM to publish when --ca-cert is an intermediate")
@click.option("--cert-ttl", default="24h", show_default=True, help="workload certificate lifetime")
@click.option("--tls-cert", default="", help="serve the API over HTTPS with this certificate PEM")
@click.option("--tls-key", default="", help="private key PEM of --tls-cert")
@click.option("--config", "config_file", default="", envvar="MESHD_CONFIG",
              help="meshd.toml: discovery sources and merging (default: built-in registry only)")
@click.option("--log-level", default="info", show_default=True)
def serve(listen: str, data_dir: str, serve_token: str, trust_domain: str, ca_cert: str, ca_key: str,
          ca_bundle: str, cert_ttl: str, tls_cert: str, tls_key: str, config_file: str,
          log_level: str) -> None:
    """Run the controller."""
    import trio

    from meshd.errors import ConfigError
    from meshd.identity import parse_ttl
    from meshd.identity.service import IdentityConfig
    from meshd.server.main import run

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    try:
        identity = IdentityConfig(trust_domain, ca_cert, ca_key, ca_bundle, parse_ttl(cert_ttl))
    except ValueError as exc:
        fail(f"--cert-ttl: {exc}", 2)
    try:
        if bool(tls_cert) != bool(tls_key):
            fail("--tls-cert and --tls-key go together", 2)
        from registry.config import load as load_config
        registry = load_config(config_file) if config_file else None
        trio.run(run, listen, data_dir, serve_token, identity,
                 (tls_cert, tls_key) if tls_cert else None, registry)
    except ConfigError as exc:
        fail(str(exc), 2)
    except OSError as exc:
        fail(f"cannot listen on {listen}: {exc.strerror or exc}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="print the API's JSON")
@pass_api
def services(api: Api, as_json: bool) -> None:
    """Show the merged registry: instances with source, labels, health; sources; conflicts."""
    _, body = api.call("GET", "/v1/registry/services")
    if as_json:
        click.echo(json.dumps(body, indent=2, sort_keys=True))
        return
    click.echo(f"{'SERVICE':<12} {'INSTANCE':<22} {'ADDRESS':<22} {'SOURCE':<10} {'HEALTH':<8} LABELS")
    for svc in body["services"]:
        marks = [f"stale: {','.join(svc['stale_sources'])}"] if svc.get("stale_sources") else []
        marks += [f"withheld from {src}: {w['removed']} of {w['of']} for {w['since']:.0f}s"
                  for src, w in (svc.get("withheld") or {}).items()]
        for i in svc["instances"]:
            labels = ",".join(f"{k}={v}" for k, v in sorted(i["labels"].items()))
            addr = f"{i['address']}:{i['port']}"
            health = "passing" if i["healthy"] else "critical"
            click.echo(f"{svc['name']:<12} {i['instance_id']:<22} {addr:<22} {i.get('source', ''):<10} "
                       f"{health:<8} {labels}")
        for mark in marks:
            click.echo(f"{svc['name']:<12} ! {mark}")
    if body.get("sources"):
        click.echo(f"\n{'SOURCE':<12} {'STATE':<8} {'INSTANCES':<10} DETAIL")
    for src in body.get("sources", []):
        state = "stale" if src["stale"] else ("ok" if src["synced"] else "waiting")
        detail = f"{src['stale_for']:.0f}s: {src['message']}" if src["stale"] else ""
        detail += "".join(f" [{s} stale {e['stale_for']:.0f}s: {e['message']}]"
                          for s, e in src.get("stale_services", {}).items())
        click.echo(f"{src['name']:<12} {state:<8} {src['instances']:<10} {detail}".rstrip())
    for c in body.get("conflicts", []):
        click.echo(f"conflict: {c['service']} {c['kind']} {c['key']} from {','.join(c['sources'])}: "
                   f"{c['detail']}")


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

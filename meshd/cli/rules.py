"""``meshd rule ...``: push, list, get, delete, and the rule history (history, diff, rollback).

Every accepted push, delete and rollback is a numbered revision in meshd's rule history; the
changing commands send ``--author`` (env ``MESHD_AUTHOR``, default ``$USER@hostname``) with it.
Exit codes as the rest of the CLI: 2 = rejected rules, 1 = not found or server/connection error.
"""

from __future__ import annotations

import datetime
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from meshd.cli.client import Api, default_author, fail, pass_api, print_errors
from meshd.rules.schema import KINDS

KIND = click.Choice(list(KINDS))
_MARK = {"create": "+", "update": "~", "delete": "-"}
_DIFF_COLOR = {"+": "green", "-": "red", "@": "cyan"}
F = TypeVar("F", bound=Callable[..., Any])


def author_option(f: F) -> F:
    return click.option("--author", envvar="MESHD_AUTHOR", default=default_author,
                        show_default="$USER@hostname",
                        help="who is recorded in the rule history (env MESHD_AUTHOR)")(f)


def _print_changes(changes: list[list[str]], suffix: str = "d") -> None:
    for action, kind, name in changes:
        click.echo(f"{kind}/{name} {action}{suffix}")


@click.group()
def rule() -> None:
    """Push, list, get and delete routing rules; show their history, diff and roll back."""


@rule.command("push")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--dry-run", is_flag=True, help="validate and show what would change")
@author_option
@pass_api
def rule_push(api: Api, file: str, dry_run: bool, author: str) -> None:
    """Validate FILE.toml and apply every rule in it (whole file or nothing)."""
    api.set_author(author)
    text = Path(file).read_bytes()
    params = {"file": file, "dry_run": "1" if dry_run else "0"}
    status, body = api.call("POST", "/v1/rules", content=text, params=params)
    if status != 200:
        print_errors(body)
        sys.exit(2)
    changes = body.get("changes", [])
    _print_changes(changes, " (dry run)" if dry_run else "d")
    for w in body.get("warnings", []):
        click.echo(f"warning: {w['file']}:{w['line']}: {w['field']}: {w['reason']}", err=True)
    if not changes:
        click.echo("no changes")
    if "revision" in body:
        click.echo(f"revision {body['revision']}")
    if not dry_run:
        click.echo(f"version {body['version']}")


@rule.command("list")
@pass_api
def rule_list(api: Api) -> None:
    """List rules as KIND/NAME HOST SOURCE."""
    _, body = api.call("GET", "/v1/rules")
    for kind in KINDS:
        for r in body["rules"].get(kind, []):
            src = body["sources"].get(f"{kind}/{r['name']}", "")
            click.echo(f"{kind}/{r['name']}\t{r['host']}\t{src}")


@rule.command("get")
@click.argument("kind", type=KIND)
@click.argument("name")
@pass_api
def rule_get(api: Api, kind: str, name: str) -> None:
    """Print one rule as JSON."""
    status, body = api.call("GET", f"/v1/rules/{kind}/{name}")
    if status != 200:
        fail(f"no {kind} rule named {name!r}")
    click.echo(json.dumps(body, indent=2))


@rule.command("delete")
@click.argument("kind", type=KIND)
@click.argument("name")
@author_option
@pass_api
def rule_delete(api: Api, kind: str, name: str, author: str) -> None:
    """Delete one rule (refused if other rules still reference it)."""
    api.set_author(author)
    status, body = api.call("DELETE", f"/v1/rules/{kind}/{name}")
    if status != 200:
        print_errors(body)
        sys.exit(2 if status == 400 else 1)
    click.echo(f"{kind}/{name} deleted\nrevision {body['revision']}\nversion {body['version']}")


@rule.command("history")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 1000),
              help="how many revisions, newest first")
@pass_api
def rule_history(api: Api, limit: int) -> None:
    """Every accepted push, delete and rollback: REV TIME AUTHOR ACTION FILE CHANGES."""
    status, body = api.call("GET", "/v1/rules/history", params={"limit": str(limit)})
    if status != 200:
        fail(str(body.get("error")))
    rows = [("REV", "TIME", "AUTHOR", "ACTION", "FILE", "CHANGES")]
    for e in body["history"]:
        at = datetime.datetime.fromtimestamp(e["at"]).astimezone().isoformat(timespec="seconds")
        changes = " ".join(f"{_MARK.get(a, '?')}{k}/{n}" for a, k, n in e["changes"])
        rows.append((str(e["revision"]), at, e["author"] or "-", e["action"], e["file"], changes))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r[:5], widths, strict=True)) + "  " + r[5])


@rule.command("diff")
@click.argument("rev_a", metavar="A", type=click.IntRange(0))
@click.argument("rev_b", metavar="[B]", required=False, type=click.IntRange(0))
@pass_api
def rule_diff(api: Api, rev_a: int, rev_b: int | None) -> None:
    """What changed from revision A to revision B (default: the live rules), rule by rule.

    Revision 0 is the empty rule set before the first push.
    """
    params = {"from": str(rev_a), **({"to": str(rev_b)} if rev_b is not None else {})}
    status, body = api.call("GET", "/v1/rules/diff", params=params)
    if status != 200:
        fail(str(body.get("error")))
    if not body["changes"]:
        click.echo(f"no differences between revisions {body['from']} and {body['to']}")
        return
    for line in body["diff"].splitlines():
        click.secho(line, fg=_DIFF_COLOR.get(line[:1]) if line[:3] not in ("---", "+++") else None,
                    bold=line[:3] in ("---", "+++"))


@rule.command("rollback")
@click.argument("rev", type=click.IntRange(0))
@author_option
@pass_api
def rule_rollback(api: Api, rev: int, author: str) -> None:
    """Make revision REV's rules live again, recorded as a new revision."""
    api.set_author(author)
    status, body = api.call("POST", f"/v1/rules/rollback/{rev}")
    if status != 200:
        print_errors(body)
        sys.exit(2 if status == 400 else 1)
    if not body["changes"]:
        click.echo(f"the live rules already equal revision {rev}'s; nothing changed")
        return
    _print_changes(body["changes"])
    click.echo(f"revision {body['revision']} (rollback to {rev})\nversion {body['version']}")


def _pairs(values: tuple[str, ...], sep: str, what: str) -> dict[str, str]:
    out = {}
    for v in values:
        k, found, val = v.partition(sep)
        if not found or not k.strip():
            raise click.BadParameter(f"{v!r} is not {what}")
        out[k.strip().lower() if sep == ":" else k.strip()] = val.strip()
    return out


@rule.command("simulate")
@click.option("--host", required=True, help="destination host[:port], e.g. svcb")
@click.option("--method", default="GET", show_default=True)
@click.option("--path", default="/", show_default=True, help="path and query")
@click.option("-H", "--header", "headers", multiple=True, help="'name: value' (repeatable)")
@click.option("--source", default="", help="calling service")
@click.option("--source-label", "source_labels", multiple=True, help="key=value (repeatable)")
@click.option("--rules", "rules_file", type=click.Path(exists=True, dir_okay=False),
              help="simulate with these proposed rules merged over the live ones")
@click.option("--json", "as_json", is_flag=True, help="print the raw JSON answer")
@pass_api
def rule_simulate(api: Api, host: str, method: str, path: str, headers: tuple[str, ...],
                  source: str, source_labels: tuple[str, ...], rules_file: str | None,
                  as_json: bool) -> None:
    """Show which route, subsets, policies and fault a request would hit, and why."""
    doc: dict[str, object] = {
        "host": host, "method": method, "path": path, "headers": _pairs(headers, ":", "name: value"),
        "source": source, "source_labels": _pairs(source_labels, "=", "key=value")}
    if rules_file:
        doc["rules"], doc["file"] = Path(rules_file).read_text(encoding="utf-8"), rules_file
    status, body = api.call("POST", "/v1/rules/simulate", json=doc)
    if status != 200:
        print_errors(body)
        sys.exit(2)
    if as_json:
        click.echo(json.dumps(body, indent=2))
        return
    _print_simulation(body)


def _print_simulation(body: dict[str, Any]) -> None:
    req = body["request"]
    click.echo(f"request: {req['method']} {body['host']}{req['path']}"
               f"{' from ' + req['source'] if req['source'] else ''}")
    for step in body.get("trace", []):
        mark = "MATCH" if step["matched"] else "skip "
        click.echo(f"  {mark} route {step['route']}" + ("" if step["matched"]
                                                        else f"  ({step['why_not']})"))
    outcome = body["outcome"]
    if outcome == "route":
        click.echo(f"route: {body['route']}")
        for d in body["destinations"]:
            click.echo(f"  -> {d['share_percent']:g}% subset {d['subset']} ({d['cluster']}, "
                       f"{d['load_balancer']}): {', '.join(d['endpoints']) or 'NO ENDPOINTS'}")
        for name, value in body["policies"].items():
            click.echo(f"  {name}: {json.dumps(value)}")
    elif outcome == "egress":
        click.echo(f"egress allowed: {json.dumps(body['egress'])}")
    else:
        click.echo(f"{outcome}: {body['reason']}")

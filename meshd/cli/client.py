"""What every ``meshd`` CLI command shares: the API client, failing with one line, errors.

``Api(addr, token)`` wraps an ``httpx.Client`` on meshd's address with the operator token
(``Authorization: Bearer``; ``--token``/``MESHD_TOKEN``, else the contents of the file named by
``MESHD_TOKEN_FILE``, see ``operator_token``); ``set_author`` adds the ``x-meshd-author``
header (percent-encoded UTF-8) that rule history records. ``fail(msg, code)`` prints
``error: msg`` to stderr and exits.
"""

from __future__ import annotations

import getpass
import os
import socket
import ssl
import sys
import urllib.parse
from collections.abc import Mapping
from typing import Any, NoReturn

import click
import httpx

DEFAULT_ADDR = "http://127.0.0.1:15010"


def fail(msg: str, code: int = 1) -> NoReturn:
    click.echo(f"error: {msg}", err=True)
    sys.exit(code)


def default_author() -> str:
    """``$USER@hostname`` (the login name from the password database if ``$USER`` is unset)."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no USER/LOGNAME and a uid without a passwd entry (containers)
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def operator_token(token: str, env: Mapping[str, str] | None = None) -> str:
    """``token`` (``--token`` or ``MESHD_TOKEN``) if set, else the contents of the file named by
    ``MESHD_TOKEN_FILE`` with surrounding whitespace stripped (a Docker secret or systemd
    credential, like the sidecar's ``MESH_JOIN_TOKEN_FILE``), else ``""``. An unreadable file
    is ``fail``ed with its path, never silently sent without a token."""
    env = os.environ if env is None else env
    path = env.get("MESHD_TOKEN_FILE", "")
    if token or not path:
        return token
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError as exc:
        fail(f"cannot read MESHD_TOKEN_FILE {path}: {exc.strerror}", 2)


class Api:
    """Thin sync client for meshd's API; errors become ``fail``."""

    def __init__(self, addr: str, token: str) -> None:
        self.addr = addr.rstrip("/")
        token = operator_token(token)
        headers = {"authorization": f"Bearer {token}"} if token else {}
        # an https MESHD_ADDR is verified against MESHD_CACERT (a PEM file) when set
        cafile = os.environ.get("MESHD_CACERT")
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=cafile) if cafile else True
        self.client = httpx.Client(base_url=self.addr, headers=headers, timeout=10.0, verify=verify)

    def set_author(self, author: str) -> None:
        """Send ``author`` as ``x-meshd-author`` on every later call."""
        self.client.headers["x-meshd-author"] = urllib.parse.quote(author, safe=" !#$&'()*+,/:;=?@[]~")

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
        if resp.status_code == 403 and "errors" not in body:
            fail(f"meshd: not allowed: {body.get('reason') or body.get('error')} "
                 "(this needs the operator token in MESHD_TOKEN)")
        return resp.status_code, body


pass_api = click.make_pass_decorator(Api)


def print_errors(body: dict[str, Any]) -> None:
    """An API error body as ``file:line: field: reason`` lines on stderr."""
    errors = body.get("errors") or []
    for e in errors:
        where = f"{e['file']}:{e['line']}" if e.get("line") else e["file"]
        click.echo(f"{where}: {e['field']}: {e['reason']}" if e.get("field")
                   else f"{where}: {e['reason']}", err=True)
    if not errors:
        click.echo(f"error: {body.get('error')}", err=True)

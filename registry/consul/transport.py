"""py-consul on trio: an ``HTTPClient`` over ``httpx.AsyncClient`` (mirrors ``consul/aio.py``).

``TrioConsul(address, token, datacenter)`` is a ``consul.base.Consul`` whose every API method
(``health.service``, ``catalog.services``, ``agent.service.register``, ...) returns a coroutine.
Address and token follow the ``consul`` CLI: an explicit value wins, else ``CONSUL_HTTP_ADDR``
(``host:port`` or ``scheme://host:port``) / ``CONSUL_HTTP_TOKEN``, else ``127.0.0.1:8500``
(py-consul alone would let the env token override an explicit one).

Blocking queries get a read timeout of ``wait * 17/16 + BLOCKING_SLACK`` (Consul adds up to
wait/16 of jitter, blocking.mdx). httpx errors are raised as ``RegistryUnavailable``; Consul
error statuses raise py-consul's ``ConsulException`` subclasses from its callbacks.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Callable, Coroutine
from typing import Any

import consul.base
import httpx
from consul.std import DEFAULT_WAIT, parse_duration

from meshd.errors import ConfigError, RegistryUnavailable

REQUEST_TIMEOUT = 10.0  # seconds for non-blocking calls (py-consul std uses 30)
BLOCKING_SLACK = 5.0  # seconds added to a blocking query's wait + jitter
DEFAULT_ADDRESS = "127.0.0.1:8500"  # the consul CLI's default
Callback = Callable[[consul.base.Response], Any]
Params = list[tuple[str, Any]] | None
Headers = dict[str, str] | None
# Every watched service holds one connection for up to ``wait`` (HTTP/1.1 long polls), so the
# pool must not cap connections (httpx's default cap of 100 would stall the 101st service).
POOL_LIMITS = httpx.Limits(max_connections=None, max_keepalive_connections=64)


def parse_address(address: str | None) -> tuple[str, int, str]:
    """``"http://h:8500"`` / ``"h:8500"`` / None (env, then default) -> (host, port, scheme)."""
    raw = address or os.getenv("CONSUL_HTTP_ADDR") or DEFAULT_ADDRESS
    parsed = urllib.parse.urlparse(raw if "//" in raw else "//" + raw)
    try:
        port = parsed.port or 8500
    except ValueError as err:
        raise ConfigError(f"bad consul address {raw!r}", field="address") from err
    scheme = parsed.scheme or ("https" if os.getenv("CONSUL_HTTP_SSL", "").lower() == "true" else "http")
    if not parsed.hostname or scheme not in ("http", "https"):
        raise ConfigError(f"bad consul address {raw!r}", field="address")
    return parsed.hostname, port, scheme


class TrioHTTPClient(consul.base.HTTPClient):
    """py-consul transport: each verb returns a coroutine that applies py-consul's callback."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._client = httpx.AsyncClient(verify=self.verify, cert=self.cert, limits=POOL_LIMITS,
                                         timeout=httpx.Timeout(REQUEST_TIMEOUT))

    def _timeout(self, params: Any) -> float:
        p = dict(params or ())
        if "index" not in p:
            return REQUEST_TIMEOUT
        wait = parse_duration(p["wait"]) if "wait" in p else DEFAULT_WAIT
        return wait * 17 / 16 + BLOCKING_SLACK

    async def _request(self, callback: Callback, method: str, path: str, params: Params,
                       data: str | bytes | None = None, headers: Headers = None, raw: bool = False) -> Any:
        timeout = self._timeout(params)
        try:
            r = await self._client.request(method, self.uri(path, params), content=data or None,
                                           headers=headers, timeout=httpx.Timeout(timeout))
        except httpx.HTTPError as err:
            raise RegistryUnavailable(f"consul {method} {path}: {type(err).__name__}: {err}") from err
        return callback(consul.base.Response(r.status_code, r.headers, r.content if raw else r.text))

    def get(self, callback: Callback, path: str, params: Params = None, headers: Headers = None,
            raw: bool = False) -> Coroutine[Any, Any, Any]:
        return self._request(callback, "GET", path, params, headers=headers, raw=raw)

    def put(self, callback: Callback, path: str, params: Params = None, data: str | bytes = "",
            headers: Headers = None) -> Coroutine[Any, Any, Any]:
        return self._request(callback, "PUT", path, params, data, headers)

    def delete(self, callback: Callback, path: str, params: Params = None, data: str | bytes = "",
               headers: Headers = None) -> Coroutine[Any, Any, Any]:
        return self._request(callback, "DELETE", path, params, data, headers)

    def post(self, callback: Callback, path: str, params: Params = None, data: str = "",
             headers: Headers = None) -> Coroutine[Any, Any, Any]:
        return self._request(callback, "POST", path, params, data, headers)

    async def close(self) -> None:
        await self._client.aclose()


class TrioConsul(consul.base.Consul):
    """``consul.base.Consul`` on trio; use as ``async with TrioConsul(...) as c``."""

    def __init__(self, address: str | None = None, token: str | None = None,
                 datacenter: str | None = None) -> None:
        host, port, scheme = parse_address(address)
        super().__init__(host=host, port=port, scheme=scheme, dc=datacenter)
        self.token = token or os.getenv("CONSUL_HTTP_TOKEN") or None

    def http_connect(self, host: str, port: int, scheme: str, verify: bool | str = True,
                     cert: Any = None) -> TrioHTTPClient:
        return TrioHTTPClient(host, port, scheme, verify, cert)

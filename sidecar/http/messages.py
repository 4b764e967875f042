"""The HTTP message shapes shared by the listener, the router and the upstream pool.

Heads are frozen dataclasses (hypercorn style): lower-case ``str`` header names,
latin-1 decoded values, order kept, hop-by-hop fields already removed. Bodies are never
buffered whole: a ``Body`` is an async iterator of chunks (bytes-like; the server hands out
the parser's chunks without copying, treat them as read-only).

Optional body attributes (a convention between ``server`` and ``client``, read with
``body_length`` / ``buffered_body``): ``expected_length: int | None`` is the number of bytes
the stream will yield if known (``None``: unknown, forwarded chunked); ``buffered: bytes | None``
is the whole body when it is already in memory and nothing has been read yet;
``trailers: tuple[tuple[str, str], ...] | None`` is read once the stream is exhausted (response
trailers, e.g. gRPC's ``grpc-status``; ``body_trailers``), passed on by HTTP/2 and by chunked
HTTP/1.1 to clients that sent ``TE: trailers``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

Body = AsyncIterator[bytes]


def _first(headers: tuple[tuple[str, str], ...], name: str) -> str | None:
    name = name.lower()
    for key, value in headers:
        if key == name:
            return value
    return None


def _split_absolute(target: str) -> tuple[str, str]:
    """``"http://user@svcb:80/notify?x=1"`` -> ``("svcb:80", "/notify?x=1")``."""
    rest = target.split("://", 1)[1]
    cut = len(rest)
    for sep in "/?#":
        i = rest.find(sep)
        if 0 <= i < cut:
            cut = i
    authority, path = rest[:cut], rest[cut:].split("#", 1)[0]
    authority = authority.rpartition("@")[2]
    if not path.startswith("/"):
        path = "/" + path
    return authority, path


@dataclass(frozen=True, slots=True)
class RequestHead:
    """A parsed request head.

    ``target`` is as received: origin-form ``"/pay?x=1"``, absolute-form
    ``"http://svcb:80/notify"`` (HTTP_PROXY mode), ``"*"`` or CONNECT's authority-form.
    """

    method: str
    target: str
    headers: tuple[tuple[str, str], ...]
    http_version: str = "1.1"

    def header(self, name: str) -> str | None:
        """First value of header ``name`` (case-insensitive), or None."""
        return _first(self.headers, name)

    @property
    def authority(self) -> str:
        """``host[:port]`` from an absolute-form target, else the Host header, else ``""``."""
        target = self.target
        if not target.startswith("/") and "://" in target:
            return _split_absolute(target)[0]
        if self.method == "CONNECT":
            return target
        return self.header("host") or ""

    @property
    def path(self) -> str:
        """Origin-form path and query (``"/notify?x=1"``), also for absolute-form targets."""
        target = self.target
        if not target.startswith("/") and "://" in target:
            return _split_absolute(target)[1]
        return target

    def replace(self, **changes: Any) -> RequestHead:
        """A copy with ``changes`` applied (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """A parsed or synthesised response head (``reason`` empty: the standard phrase is sent)."""

    status: int
    headers: tuple[tuple[str, str], ...]
    reason: str = ""

    def header(self, name: str) -> str | None:
        """First value of header ``name`` (case-insensitive), or None."""
        return _first(self.headers, name)


@dataclass(frozen=True, slots=True)
class ConnInfo:
    """Addresses of one downstream connection, ``(host, port)`` when known."""

    peer: tuple[str, int] | None
    local: tuple[str, int] | None
    principal: str | None = None  # the peer's SPIFFE ID after mTLS; None for plain text


@dataclass
class Response:
    """What a handler returns. ``aclose`` is awaited by the server when the response is done
    or aborted (the upstream pool uses it to release the connection)."""

    head: ResponseHead
    body: Body | bytes = b""
    aclose: Callable[[], Awaitable[None]] | None = None


Handler = Callable[[RequestHead, Body, ConnInfo], Awaitable[Response]]


def body_length(body: Body | bytes) -> int | None:
    """Bytes ``body`` will yield if known: ``len`` of bytes, a stream's ``expected_length``."""
    if isinstance(body, bytes | bytearray | memoryview):
        return len(body)
    length = getattr(body, "expected_length", None)
    return length if isinstance(length, int) else None


def buffered_body(body: Body | bytes) -> bytes | None:
    """The whole body if it is already in memory (bytes, or a stream's ``buffered``), else None."""
    if isinstance(body, bytes | bytearray | memoryview):
        return bytes(body) if isinstance(body, memoryview) else body  # type: ignore[return-value]
    data = getattr(body, "buffered", None)
    return data if isinstance(data, bytes | bytearray) else None


def body_trailers(body: Body | bytes) -> tuple[tuple[str, str], ...]:
    """Trailers of an exhausted stream (its ``trailers`` attribute), else ``()``."""
    trailers = getattr(body, "trailers", None)
    return tuple(trailers) if trailers else ()


def on_close(resp: Response, callback: Callable[[], None]) -> Response:
    """Wrap ``resp.aclose`` so ``callback()`` runs exactly once when the exchange ends, whether
    the body was read to the end or the exchange was aborted; returns ``resp``."""
    inner = resp.aclose
    fired = False

    async def aclose() -> None:
        nonlocal fired
        if not fired:
            fired = True
            callback()
        if inner is not None:
            await inner()

    resp.aclose = aclose
    return resp


async def drain(resp: Response) -> None:
    """Read the body to its end and drop it, then close the exchange (releases the upstream
    connection to its pool). Upstream errors while reading propagate."""
    try:
        if not isinstance(resp.body, bytes | bytearray | memoryview):
            async for _ in resp.body:
                pass
    finally:
        if resp.aclose is not None:
            await resp.aclose()

"""Fallback origin when nginx is not installed: a fixed ``200`` with an N-byte body.

``python tiny_origin.py --port P [--port Q ...] [--size 1024]`` serves HTTP/1.1 keep-alive on
127.0.0.1 with asyncio; every request head (bodies are not expected) gets the same response.
It is slower than nginx, so with it the origin may become the bottleneck: the bench says so.
"""

from __future__ import annotations

import argparse
import asyncio


def response_bytes(size: int) -> bytes:
    """The complete response: status line, headers and ``size`` bytes of ``x``."""
    head = (f"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {size}\r\n"
            "connection: keep-alive\r\n\r\n")
    return head.encode("ascii") + b"x" * size


class _Origin(asyncio.Protocol):
    """Answers one fixed response per complete request head received."""

    def __init__(self, response: bytes) -> None:
        self.response = response
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        count = self.buf.count(b"\r\n\r\n")
        if count and self.transport is not None:
            self.buf = self.buf[self.buf.rfind(b"\r\n\r\n") + 4:]
            self.transport.write(self.response * count)


async def serve(ports: list[int], size: int) -> None:
    """Listen on every port of ``ports`` until cancelled."""
    loop = asyncio.get_running_loop()
    response = response_bytes(size)
    servers = [await loop.create_server(lambda: _Origin(response), "127.0.0.1", p) for p in ports]
    await asyncio.gather(*(s.serve_forever() for s in servers))


def main() -> None:
    """Command line: ``--port`` (repeatable) and ``--size``."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, action="append", required=True)
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.size))


if __name__ == "__main__":
    main()

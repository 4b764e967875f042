"""Body decoders, sans-IO: Content-Length, chunked (llhttp, strict) and close-delimited.

``feed(data)`` returns ``(payload, rest)``: the body bytes found in ``data`` and the bytes after
the body's end (the next message, handed back to the connection); ``feed(b"")`` is EOF, an error
(400) unless the body is complete or close-delimited. ``done`` is True once the end was seen.

A chunked body goes through an llhttp parser primed with a synthetic chunked head. Its message
can only end right after a CRLF CRLF (strict mode: no bare LF), so data is fed up to each such
candidate and the bytes after the end are handed back instead of being parsed as a pipelined
next message.
"""

from __future__ import annotations

from typing import Protocol

import httptools

from meshd.errors import RemoteProtocolError

_CHUNKED_PRELUDE = b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
_END = b"\r\n\r\n"


class Decoder(Protocol):
    done: bool

    def feed(self, data: bytes) -> tuple[bytes, bytes]: ...


class LengthDecoder:
    """A body of ``length`` bytes (Content-Length framing)."""

    __slots__ = ("done", "remaining")

    def __init__(self, length: int):
        self.remaining = length
        self.done = length == 0

    def feed(self, data: bytes) -> tuple[bytes, bytes]:
        if not data:
            if self.done:
                return b"", b""
            raise RemoteProtocolError(f"peer closed {self.remaining} bytes before the body's end", 400)
        left = self.remaining
        if len(data) <= left:
            self.remaining = left - len(data)
            self.done = self.remaining == 0
            return data, b""
        self.remaining, self.done = 0, True
        return data[:left], data[left:]


class EOFDecoder:
    """A close-delimited response body (no Content-Length, no chunked): ends at EOF."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = False

    def feed(self, data: bytes) -> tuple[bytes, bytes]:
        self.done = not data
        return data, b""


class _ChunkSink:
    """llhttp callbacks of a chunked body (apart from the decoder: no reference cycle)."""

    __slots__ = ("chunks", "done")

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.done = False

    def on_body(self, chunk: bytes) -> None:
        self.chunks.append(chunk)

    def on_message_complete(self) -> None:
        self.done = True

    def on_message_begin(self) -> None:
        if self.done:  # never reached when data is cut at the body's end; a guard all the same
            raise RemoteProtocolError("data after the chunked body's end", 400)


class ChunkedDecoder:
    """A chunked body, decoded by llhttp in strict mode (bad sizes, footers, bare LF: 400).

    llhttp streams chunk extensions and trailers without a size limit; like h11's limit on them,
    more than ``max_framing`` bytes read without a payload byte is a 400.
    """

    __slots__ = ("_framing", "_max_framing", "_parser", "_sink", "_tail")

    def __init__(self, max_framing: int = 64 * 1024) -> None:
        self._sink = _ChunkSink()
        self._tail = b""  # the last bytes fed, to find a CRLF CRLF across two reads
        self._framing = 0  # bytes fed since the last read that had payload
        self._max_framing = max_framing
        self._parser = httptools.HttpRequestParser(self._sink)
        self._parser.feed_data(_CHUNKED_PRELUDE)

    @property
    def done(self) -> bool:
        return self._sink.done

    def feed(self, data: bytes) -> tuple[bytes, bytes]:
        sink = self._sink
        if sink.done:
            return b"", data
        if not data:
            raise RemoteProtocolError("peer closed before the chunked body's end", 400)
        sink.chunks = chunks = []
        view, pos = memoryview(data), 0
        try:
            for end in self._candidates(data):
                self._parser.feed_data(view[pos:end])
                pos = end
                if sink.done:
                    break
            else:
                self._parser.feed_data(view[pos:])
                pos = len(data)
        except httptools.HttpParserError as exc:
            raise RemoteProtocolError(f"bad chunked body: {exc}", 400) from None
        self._tail = (self._tail + data[max(0, pos - 3) : pos])[-3:]
        payload = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if payload:
            self._framing = 0
        else:
            self._framing += pos
            if self._framing > self._max_framing and not sink.done:
                raise RemoteProtocolError(f"chunk framing over {self._max_framing} bytes", 400)
        return payload, data[pos:] if pos < len(data) else b""

    def _candidates(self, data: bytes) -> list[int]:
        """Offsets in ``data`` just after a CRLF CRLF (one may start in the previous read)."""
        out = []
        tail = self._tail
        if tail:
            joined = tail + data[:3]
            i = joined.find(_END)
            while i >= 0:
                out.append(i + 4 - len(tail))
                i = joined.find(_END, i + 1)
        i = data.find(_END)
        while i >= 0:
            out.append(i + 4)
            i = data.find(_END, i + 1)
        return out

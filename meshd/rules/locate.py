"""Map a field path of a rules file to the TOML line that defines it (``tomllib`` has no positions).

A small scanner walks the source once and records the 1-based line where every key, table,
array-of-tables element and array element starts::

    [[route]]                          ("route",), ("route", 0)                      -> 1
    name = "r"                         ("route", 0, "name")                          -> 2
    [[route.http]]                     ("route", 0, "http"), ("route", 0, "http", 0) -> 3
    match = [{ headers.user-agent.regex = "x" }]
                                       (..., "match", 0, "headers", "user-agent", "regex") -> 4
    destinations = [
      { subset = "v1", weight = 95 },  (..., "destinations", 0), (..., 0, "subset") -> 6

Rules of the scanner:

- Array-of-tables indices count per parent element (``[[route.http]]`` restarts at 0 under
  every ``[[route]]``); array elements are numbered as the data is.
- A path is recorded at its *first* definition (dotted keys define their prefixes).
- Strings (basic, literal, multi-line) are skipped whole, so ``#``, ``[`` and ``=`` inside them
  do nothing; comments are skipped.
- It never raises: on text it does not understand it skips to the next line and keeps what it
  recorded. It is meant for files ``tomllib`` accepted; for others the answer is best effort.
"""

from __future__ import annotations

import bisect
import functools
import json
import re
from typing import Any, TypeVar

import msgspec

from meshd.errors import ConfigError

Path = tuple[str | int, ...]
T = TypeVar("T")
_MSGSPEC_PATH = re.compile(r"[.\[]?([A-Za-z_][A-Za-z0-9_-]*|\d+)\]?")

_BARE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_SCALAR_END = frozenset(",]}#\r\n")


def line_of(text: str, path: Path) -> int:
    """1-based line of the field at ``path`` in ``text``, else of its longest locatable prefix.

    ``path`` holds keys (``str``) and array indices (``int``), e.g.
    ``("route", 0, "http", 1, "destinations", 0, "weight")``. Returns 0 when not even the
    first element can be found. Never raises.
    """
    positions = _positions(text)
    for end in range(len(path), 0, -1):
        line = positions.get(path[:end])
        if line is not None:
            return line
    return 0


def convert_located(data: Any, text: str, file: str, typ: type[T]) -> T:
    """``msgspec.convert(data, typ)`` of a TOML document parsed from ``text``; a validation
    error becomes ``ConfigError`` with ``file``, the line of the offending field and the dotted
    field path (an unknown field's own name included)."""
    try:
        return msgspec.convert(data, typ)
    except msgspec.ValidationError as exc:
        msg, _, where = str(exc).partition(" - at `$")
        parts: list[str | int] = [int(p) if p.isdigit() else p for p in _MSGSPEC_PATH.findall(where)]
        unknown = re.search(r"unknown field `([^`]+)`", msg)
        if unknown:
            parts.append(unknown.group(1))
        raise ConfigError(msg, file=file, line=line_of(text, tuple(parts)),
                          field=".".join(str(p) for p in parts)) from exc


@functools.lru_cache(maxsize=8)
def _positions(text: str) -> dict[Path, int]:
    scanner = _Scanner(text)
    try:
        scanner.document()
    except RecursionError:
        pass  # absurdly deep nesting: keep what was recorded
    return scanner.lines


class _Scanner:
    """Single pass over the TOML source; fills ``lines`` (path -> line)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.lines: dict[Path, int] = {}
        self.aot_counts: dict[Path, int] = {}
        self._newlines = [i for i, c in enumerate(text) if c == "\n"]

    def peek(self, offset: int = 0) -> str:
        i = self.pos + offset
        return self.text[i] if i < len(self.text) else ""

    def line(self) -> int:
        return bisect.bisect_left(self._newlines, self.pos) + 1

    def mark(self, path: Path, line: int, start: int = 1) -> None:
        """Record ``path`` and its prefixes from length ``start`` on, keeping earlier lines."""
        for end in range(start, len(path) + 1):
            self.lines.setdefault(path[:end], line)

    def skip(self, newlines: bool) -> None:
        """Skip blanks and comments, and line breaks too when ``newlines``."""
        while True:
            c = self.peek()
            if c in (" ", "\t") or (newlines and c in ("\r", "\n")):
                self.pos += 1
            elif c == "#":
                end = self.text.find("\n", self.pos)
                self.pos = len(self.text) if end < 0 else end
            else:
                return

    def to_next_line(self) -> None:
        end = self.text.find("\n", self.pos)
        self.pos = len(self.text) if end < 0 else end + 1

    def document(self) -> None:
        table: Path = ()
        while True:
            self.skip(newlines=True)
            if not self.peek():
                return
            start = self.pos
            if self.peek() == "[":
                table = self.header()
            else:
                self.keyval(table)
            self.skip(newlines=False)
            if self.peek() not in ("\n", "\r", "") or self.pos == start:
                self.to_next_line()  # something we do not understand: resync

    def resolve(self, keys: list[str]) -> Path:
        """Key path -> data path: after every array of tables, its current element index."""
        path: Path = ()
        for key in keys:
            path += (key,)
            if path in self.aot_counts:
                path += (self.aot_counts[path] - 1,)
        return path

    def header(self) -> Path:
        line = self.line()
        is_array = self.peek(1) == "["
        self.pos += 2 if is_array else 1
        keys = self.keys()
        if not keys:
            return ()
        self.skip(newlines=False)
        self.pos += 2 if is_array and self.peek(1) == "]" else 1
        if not is_array:
            path = self.resolve(keys)
            self.mark(path, line)
            return path
        array = (*self.resolve(keys[:-1]), keys[-1])
        index = self.aot_counts.get(array, 0)
        self.aot_counts[array] = index + 1
        self.mark((*array, index), line)
        return (*array, index)

    def keyval(self, table: Path) -> None:
        line = self.line()
        keys = self.keys()
        self.skip(newlines=False)
        if not keys or self.peek() != "=":
            return
        self.pos += 1
        path = table + tuple(keys)
        self.mark(path, line, start=len(table) + 1)
        self.skip(newlines=False)
        self.value(path)

    def keys(self) -> list[str]:
        """A dotted key: bare, ``"basic"`` or ``'literal'`` parts."""
        keys: list[str] = []
        while True:
            self.skip(newlines=False)
            c = self.peek()
            if c in ('"', "'"):
                keys.append(self.quoted_key(c))
            elif c in _BARE:
                start = self.pos
                while self.peek() in _BARE and self.peek():
                    self.pos += 1
                keys.append(self.text[start : self.pos])
            else:
                return keys
            self.skip(newlines=False)
            if self.peek() != ".":
                return keys
            self.pos += 1

    def quoted_key(self, quote: str) -> str:
        start = self.pos
        self.string()
        raw = self.text[start + 1 : self.pos - 1]
        if quote == "'":
            return raw
        try:
            return str(json.loads(f'"{raw}"'))
        except ValueError:
            return raw

    def value(self, path: Path) -> None:
        c = self.peek()
        if c == "{":
            self.inline_table(path)
        elif c == "[":
            self.array(path)
        elif c in ('"', "'"):
            self.string()
        else:
            while self.peek() and self.peek() not in _SCALAR_END:
                self.pos += 1

    def inline_table(self, path: Path) -> None:
        self.pos += 1
        while True:
            self.skip(newlines=True)
            if self.peek() in ("}", ""):
                self.pos += 1
                return
            start, line = self.pos, self.line()
            keys = self.keys()
            self.skip(newlines=False)
            if keys and self.peek() == "=":
                self.pos += 1
                self.mark(path + tuple(keys), line, start=len(path) + 1)
                self.skip(newlines=False)
                self.value(path + tuple(keys))
            self.skip(newlines=True)
            if self.peek() == "," or self.pos == start:
                self.pos += 1

    def array(self, path: Path) -> None:
        self.pos += 1
        index = 0
        while True:
            self.skip(newlines=True)
            if self.peek() in ("]", ""):
                self.pos += 1
                return
            start = self.pos
            self.lines.setdefault((*path, index), self.line())
            self.value((*path, index))
            index += 1
            self.skip(newlines=True)
            if self.peek() == "," or self.pos == start:
                self.pos += 1

    def string(self) -> None:
        """Skip one string of any of TOML's four kinds; ``pos`` ends after the closing quote."""
        quote = self.peek()
        if self.text.startswith(quote * 3, self.pos):
            end = self._find_close(quote * 3, self.pos + 3, escapes=quote == '"')
            for _ in range(2):  # up to two quotes may sit right before the closing delimiter
                if self.text[end : end + 1] == quote:
                    end += 1
            self.pos = end
            return
        end = self._find_close(quote, self.pos + 1, escapes=quote == '"')
        self.pos = end

    def _find_close(self, delim: str, i: int, escapes: bool) -> int:
        """Index just past ``delim`` from ``i`` (end of text if unterminated)."""
        text = self.text
        while i < len(text):
            if escapes and text[i] == "\\":
                i += 2
            elif text.startswith(delim, i):
                return i + len(delim)
            elif len(delim) == 1 and text[i] == "\n":
                return i  # unterminated single-line string: stop at the line end
            else:
                i += 1
        return len(text)

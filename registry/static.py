"""The static-file source: instances listed in a TOML file, for things that register nowhere.

File format (external databases, VMs without an agent)::

    [[instances]]
    service = "db"
    address = "10.0.0.5"
    port = 5432
    instance_id = "db-1"          # default: <service>-<address>-<port>
    labels = { version = "v1", zone = "a" }
    protocol = "tcp"              # optional: http | http2 | grpc | tcp
    namespace = "default"

``StaticFileSource.watch`` checks the file's (mtime, size, inode) every ``poll_interval``
seconds and re-reads it on change. A file that is missing or does not parse is a source error
(``sink.error`` with ``file:line: field: reason``): the last good view stays, marked stale.
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import trio

from meshd.errors import ConfigError
from meshd.rules.locate import line_of
from registry.config import PROTOCOLS, STATIC_POLL, toml_struct
from registry.model import Instance
from registry.source import SourceSink


class StaticInstance(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    service: str
    address: str
    port: int
    instance_id: str = ""
    labels: dict[str, str] = {}
    protocol: str = ""
    namespace: str = "default"


class StaticFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    instances: list[StaticInstance] = []


def parse(text: str, file: str, source: str = "static") -> list[Instance]:
    """The instances of a static file; ConfigError (file:line: field: reason) on bad input."""
    doc = toml_struct(text, file, StaticFile)
    out, seen = [], set()
    for n, s in enumerate(doc.instances):
        iid = s.instance_id or f"{s.service}-{s.address}-{s.port}"
        problem = _problem(s, iid in seen)
        if problem:
            raise ConfigError(problem[1], file=file, line=line_of(text, ("instances", n, problem[0])),
                              field=f"instances.{n}.{problem[0]}")
        seen.add(iid)
        out.append(Instance(service=s.service, instance_id=iid, address=s.address, port=s.port,
                            labels=dict(s.labels), source=source, namespace=s.namespace,
                            protocol=s.protocol))
    return out


def _problem(s: StaticInstance, duplicate: bool) -> tuple[str, str] | None:
    if not s.service:
        return ("service", "must not be empty")
    if not s.address:
        return ("address", "must not be empty")
    if not 0 < s.port < 65536:
        return ("port", "must be within 1..65535")
    if s.protocol not in PROTOCOLS:
        return ("protocol", f"must be one of {', '.join(PROTOCOLS[1:])}")
    if duplicate:
        return ("instance_id", "is listed twice")
    return None


class StaticFileSource:
    """``DiscoverySource`` over a TOML file (see module doc)."""

    def __init__(self, name: str, path: str | Path, poll_interval: float = STATIC_POLL) -> None:
        self.name = name
        self.path = Path(path)
        self.poll_interval = poll_interval

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    async def watch(self, sink: SourceSink) -> None:
        seen: tuple[int, int, int] | str | None = "never"
        while True:
            stamp = self._stamp()
            if stamp != seen:
                seen = stamp
                try:
                    text = await trio.Path(self.path).read_text(encoding="utf-8")
                    sink.update(parse(text, str(self.path), self.name))
                except OSError as exc:
                    sink.error(f"{self.path}: cannot read: {exc.strerror or exc}")
                except (ConfigError, UnicodeDecodeError) as exc:
                    sink.error(str(exc))
            await trio.sleep(self.poll_interval)

"""etcd v3 JSON gateway messages <-> ``Instance`` — pure code, tested on recorded gateway JSON.

Layout: one key per instance, ``<prefix><service>/<instance_id>`` (default prefix
``/meshd/services/``), value a JSON object ``{"address", "port", "labels", "protocol",
"namespace", "ttl"}`` (unknown fields ignored, so newer writers stay readable), attached to a
lease the registering sidecar keeps alive: when it dies without deregistering, the lease
expires and etcd deletes the key (a ``DELETE`` watch event).

The gateway (etcd 3.4 ``/v3/...``) speaks protobuf-JSON: keys and values base64, int64 as
strings, default values omitted (a ``PUT`` event has no ``type``).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

import msgspec

from registry.config import PROTOCOLS
from registry.model import DEFAULT_TTL, Instance

Json = dict[str, Any]  # a decoded gateway message


class Value(msgspec.Struct, frozen=True):
    address: str
    port: int
    labels: dict[str, str] = {}
    protocol: str = ""
    namespace: str = "default"
    ttl: float = DEFAULT_TTL


def b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.b64encode(raw).decode("ascii")


def unb64(text: str) -> str:
    return base64.b64decode(text).decode("utf-8")


def prefix_range(prefix: str) -> dict[str, str]:
    """``{"key", "range_end"}`` selecting every key under ``prefix`` (etcd's prefix rule: the
    range end is the prefix with its last byte incremented)."""
    raw = prefix.encode()
    end = raw[:-1] + bytes([raw[-1] + 1])
    return {"key": b64(raw), "range_end": b64(end)}


def key_of(prefix: str, inst: Instance) -> str:
    return f"{prefix}{inst.service}/{inst.instance_id}"


def value_of(inst: Instance) -> str:
    """The base64 value a registrar puts."""
    return b64(msgspec.json.encode(Value(inst.address, inst.port, dict(inst.labels), inst.protocol,
                                         inst.namespace, inst.ttl)))


def split_key(prefix: str, key: str) -> tuple[str, str] | None:
    """``(service, instance_id)`` of a key under ``prefix``, None for anything else."""
    if not key.startswith(prefix):
        return None
    service, sep, iid = key[len(prefix):].partition("/")
    return (service, iid) if sep and service and iid and "/" not in iid else None


def parse_kv(kv: Json, prefix: str, source: str) -> tuple[str, Instance | None, str]:
    """``(key, instance, problem)`` for one gateway ``kv``; problem names what is wrong."""
    key = unb64(kv.get("key", ""))
    where = split_key(prefix, key)
    if where is None:
        return key, None, f"{key}: not <prefix><service>/<instance_id>"
    try:
        v = msgspec.json.decode(base64.b64decode(kv.get("value", "")), type=Value)
    except (msgspec.DecodeError, ValueError) as exc:
        return key, None, f"{key}: bad instance JSON: {exc}"
    if not 0 < v.port < 65536 or not v.address:
        return key, None, f"{key}: address and a port in 1..65535 are required"
    if v.protocol not in PROTOCOLS:
        return key, None, f"{key}: protocol must be one of {', '.join(PROTOCOLS[1:])}"
    return key, Instance(service=where[0], instance_id=where[1], address=v.address, port=v.port,
                         labels=dict(v.labels), source=source, ttl=v.ttl, namespace=v.namespace,
                         protocol=v.protocol), ""


@dataclass(slots=True)
class Batch:
    """One gateway message, range response or watch result, as changes."""

    revision: int = 0
    changes: list[tuple[str, Instance | None]] = field(default_factory=list)  # None = deleted
    problems: list[tuple[str, str, str]] = field(default_factory=list)  # (key, service or "", msg)
    canceled: bool = False
    compact_revision: int = 0
    cancel_reason: str = ""


def _add(batch: Batch, kv: Json, prefix: str, source: str) -> None:
    key, inst, problem = parse_kv(kv, prefix, source)
    if inst is not None:
        batch.changes.append((key, inst))
    elif problem:
        where = split_key(prefix, key)
        batch.problems.append((key, where[0] if where else "", problem))


def parse_range(body: Json, prefix: str, source: str) -> Batch:
    """A ``/v3/kv/range`` response: every kv as a put, at the header's revision."""
    batch = Batch(revision=int(body["header"]["revision"]))
    for kv in body.get("kvs") or []:
        _add(batch, kv, prefix, source)
    return batch


def parse_watch(line: Json, prefix: str, source: str) -> Batch:
    """One ``/v3/watch`` stream message (``{"result": ...}`` or ``{"error": ...}``)."""
    if "error" in line:
        err = line["error"]
        return Batch(canceled=True, cancel_reason=str(err.get("message") or err))
    res = line.get("result") or {}
    batch = Batch(revision=int((res.get("header") or {}).get("revision") or 0),
                  canceled=bool(res.get("canceled")),
                  compact_revision=int(res.get("compact_revision") or 0),
                  cancel_reason=str(res.get("cancel_reason") or ""))
    for ev in res.get("events") or []:
        kv = ev.get("kv") or {}
        if ev.get("type") == "DELETE":
            batch.changes.append((unb64(kv.get("key", "")), None))
        else:  # a bad value is reported and the key keeps its last good instance
            _add(batch, kv, prefix, source)
        batch.revision = max(batch.revision, int(kv.get("mod_revision") or 0))
    return batch

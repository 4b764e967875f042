"""Docker Engine JSON -> ``Instance`` — pure code (no I/O), table-tested on recorded JSON.

Input: a container as ``GET /containers/{id}/json`` (inspect) returns it, Engine API 1.41.
Which labels say what, first match wins (``docs/registries.md`` has the table):

* skip: ``mesh.enable=false``; registrator ``SERVICE_IGNORE``.
* service: ``mesh.service``; ``SERVICE_NAME`` (per port ``SERVICE_<p>_NAME``);
  ``com.docker.compose.service``.
* port: ``mesh.port``; the ports with a ``SERVICE_<p>_NAME``; else the exposed TCP port(s).
* instance id: ``mesh.instance_id``; ``SERVICE_ID`` / ``SERVICE_<p>_ID``; Compose
  ``<project>-<service>-<number>``; else the container name.
* labels: ``mesh.<key>=<value>`` win over registrator's ``SERVICE_TAGS`` items ``k=v`` and
  attributes ``SERVICE_<KEY>=v`` / ``SERVICE_<p>_<KEY>=v`` (key lower-cased).
* protocol: ``mesh.protocol``; network: ``mesh.network``, else the source's ``network``.

A container is used only while it runs, is not paused and, if it has a health check, reports
``healthy`` (``starting`` and ``unhealthy`` are left out, as Docker Swarm and Traefik do). Its
address is its IP on the configured network (``mesh.network`` label, else the source's
``network``, else its only network, else the first by name). Registrator's rule applies to
several exposed ports without a ``SERVICE_<p>_NAME``: one instance per port, named
``<service>-<port>``, id ``<id>:<port>``.

``convert`` returns ``(instances, reason)``: ``reason`` says why a container gives none.
``event_action`` maps an event to "refresh" (re-inspect), "remove" or "" (ignore).
"""

from __future__ import annotations

import re
from typing import Any

from registry.config import PROTOCOLS
from registry.model import Instance

Json = dict[str, Any]  # a decoded Engine API object

COMPOSE_SERVICE = "com.docker.compose.service"
MESH_KEYS = frozenset({"enable", "service", "port", "protocol", "network", "instance_id", "upstreams"})
REGISTRATOR_KEYS = frozenset({"NAME", "TAGS", "ID", "IGNORE", "PORT"})
_PORT_KEY = re.compile(r"SERVICE_(\d+)_([A-Z0-9_]+)")
REMOVE_ACTIONS = frozenset({"die", "stop", "destroy", "pause", "oom"})
REFRESH_ACTIONS = frozenset({"start", "unpause", "restart", "health_status", "connect", "disconnect",
                             "rename", "update"})
EVENT_FILTER = {"type": ["container", "network"],
                "event": ["start", "die", "stop", "destroy", "pause", "unpause", "restart",
                          "health_status", "connect", "disconnect", "rename", "update", "oom"]}


def _settings(attrs: Json) -> dict[str, str]:
    """Registrator reads ``SERVICE_*`` from the environment and from labels (labels win)."""
    config = attrs.get("Config") or {}
    out: dict[str, str] = {}
    for item in config.get("Env") or []:
        key, sep, value = item.partition("=")
        if sep and key.startswith("SERVICE_"):
            out[key] = value
    out.update(config.get("Labels") or {})
    return out


def _split_tags(text: str) -> list[str]:
    """Registrator's ``SERVICE_TAGS``: comma-separated, ``\\,`` escapes a comma."""
    return [t.replace("\\,", ",").strip() for t in re.split(r"(?<!\\),", text) if t.strip()]


def _address(attrs: Json, network: str) -> tuple[str, str]:
    nets: Json = (attrs.get("NetworkSettings") or {}).get("Networks") or {}
    if network:
        net = nets.get(network)
        if net is None:
            return "", f"not on network {network!r} (on {', '.join(sorted(nets)) or 'none'})"
    elif nets:
        net = nets[sorted(nets)[0]]
    else:
        return "", "on no network"
    ip = net.get("IPAddress") or net.get("GlobalIPv6Address") or ""
    return (ip, "") if ip else ("", "no IP address on its network (host networking?)")


def _health(attrs: Json) -> str:
    state = attrs.get("State") or {}
    if not state.get("Running") or state.get("Paused") or state.get("Restarting"):
        return f"not running ({state.get('Status', 'unknown')})"
    health = (state.get("Health") or {}).get("Status", "")
    return "" if health in ("", "healthy", "none") else f"health {health}"


def _labels(s: dict[str, str], prefix: str, port: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    for key, value in s.items():  # registrator attributes, the port's own ones overriding
        if key.startswith("SERVICE_") and not _PORT_KEY.fullmatch(key):
            attr = key[len("SERVICE_"):]
            if attr not in REGISTRATOR_KEYS and not attr.startswith(("CHECK_", "EUREKA_")):
                labels[attr.lower()] = value
    for tags in (s.get("SERVICE_TAGS", ""), s.get(f"SERVICE_{port}_TAGS", "")):
        for tag in _split_tags(tags):
            k, sep, v = tag.partition("=")
            if sep:
                labels[k.strip()] = v.strip()
    for key, value in s.items():
        m = _PORT_KEY.fullmatch(key)
        if m and m.group(1) == port and m.group(2) not in REGISTRATOR_KEYS:
            labels[m.group(2).lower()] = value
    for key, value in s.items():
        if key.startswith(prefix) and key[len(prefix):] not in MESH_KEYS:
            labels[key[len(prefix):]] = value
    return labels


def _default_id(attrs: Json, s: dict[str, str]) -> str:
    project, number = s.get("com.docker.compose.project"), s.get("com.docker.compose.container-number")
    if project and number and COMPOSE_SERVICE in s:
        return f"{project}-{s[COMPOSE_SERVICE]}-{number}"
    return str(attrs.get("Name") or attrs.get("Id", "")[:12]).lstrip("/")


def _ports(attrs: Json, s: dict[str, str], prefix: str) -> list[tuple[str, str]]:
    """``[(port, service name or "")]``: the ports to publish as instances."""
    if s.get(prefix + "port"):
        return [(s[prefix + "port"], "")]
    named = sorted((m.group(1), v) for k, v in s.items()
                   if (m := _PORT_KEY.fullmatch(k)) and m.group(2) == "NAME")
    if named:
        return named
    exposed = sorted({p.split("/")[0] for p in ((attrs.get("Config") or {}).get("ExposedPorts") or {})
                      if p.endswith("/tcp")}, key=int)
    if len(exposed) > 1:
        return [(p, f"-{p}") for p in exposed]  # registrator: <name>-<port>
    return [(p, "") for p in exposed]


def convert(attrs: Json, network: str = "", source: str = "docker",
            prefix: str = "mesh.") -> tuple[list[Instance], str]:
    """One inspected container -> its instances, or ``([], reason)``."""
    s = _settings(attrs)
    if s.get(prefix + "enable", "").lower() == "false" or "SERVICE_IGNORE" in s:
        return [], "disabled by label"
    service = s.get(prefix + "service") or s.get("SERVICE_NAME") or s.get(COMPOSE_SERVICE) or ""
    ports = _ports(attrs, s, prefix)
    if not service and not any(name and not name.startswith("-") for _, name in ports):
        return [], "no service name (mesh.service, SERVICE_NAME or com.docker.compose.service)"
    if not ports:
        return [], "no port (mesh.port, SERVICE_<port>_NAME or one exposed port)"
    unhealthy = _health(attrs)
    if unhealthy:
        return [], unhealthy
    address, why = _address(attrs, s.get(prefix + "network") or network)
    if not address:
        return [], why
    protocol = s.get(prefix + "protocol", "")
    if protocol not in PROTOCOLS:
        return [], f"bad {prefix}protocol {protocol!r} (one of {', '.join(PROTOCOLS[1:])})"
    base_id = s.get(prefix + "instance_id") or s.get("SERVICE_ID") or _default_id(attrs, s)
    out = []
    for port, name in ports:
        if not port.isdigit() or not 0 < int(port) < 65536:
            return [], f"bad port {port!r}"
        svc = service + name if name.startswith("-") or not name else name
        iid = s.get(f"SERVICE_{port}_ID") or (base_id if len(ports) == 1 else f"{base_id}:{port}")
        out.append(Instance(service=svc, instance_id=iid, address=address, port=int(port),
                            labels=_labels(s, prefix, port), source=source, protocol=protocol))
    return out, ""


def event_action(event: Json) -> tuple[str, str]:
    """``(action, container id)``: "remove", "refresh" or "" for an Engine event."""
    action = str(event.get("Action") or event.get("status") or "").split(":", 1)[0]
    actor = event.get("Actor") or {}
    if event.get("Type") == "network":
        cid = (actor.get("Attributes") or {}).get("container", "")
        return ("refresh" if action in ("connect", "disconnect") and cid else "", cid)
    cid = actor.get("ID") or event.get("id") or ""
    if action in REMOVE_ACTIONS:
        return "remove", cid
    return ("refresh" if action in REFRESH_ACTIONS else "", cid)

"""Sidecar bootstrap parsing and the snapshot subscription's ACK/NACK/disk-cache logic.

The subscription talks to meshd through an ``httpx.MockTransport`` that records the calls, so
the NACK path can be fed a snapshot meshd itself would never publish.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import msgspec
import pytest

from meshd.errors import ConfigError
from meshd.rules.schema import RulesFile
from meshd.snapshot.compile import NodeInfo, compile_mesh, for_node
from meshd.snapshot.model import Version, WeightedCluster, encode
from registry.model import Instance
from sidecar import bootstrap
from sidecar.control import Subscription
from sidecar.metrics import Metrics
from sidecar.state import State

BOOT = 'service = "svcb"\napp_port = 8080\nlabels = { version = "v1" }\ndata_dir = "{dir}"\n'


def test_bootstrap_defaults_and_env_overrides(tmp_path: Path) -> None:
    boot = bootstrap.parse(BOOT.replace("{dir}", str(tmp_path)), "b.toml",
                           env={"MESHD_ADDR": "http://meshd:15010", "MESH_JOIN_TOKEN": "t"})
    assert (boot.inbound_port, boot.outbound_port, boot.admin_port) == (15006, 15001, 15000)
    assert boot.meshd_addr == "http://meshd:15010" and boot.token == "t"
    assert boot.instance_id.startswith("svcb-") and boot.spiffe_id.endswith("/ns/default/sa/svcb")


@pytest.mark.parametrize(("text", "error"), [
    ('service = "svcb"\napp_port = 8080\ncolour = "red"\n',
     "b.toml:3: colour: Object contains unknown field `colour`"),
    ('service = "svcb"\napp_port = "x"\n', "b.toml:2: app_port: Expected `int`, got `str`"),
    ('service = "svcb"\n', "b.toml: Object missing required field `app_port`"),
    ('service = "Svc B"\napp_port = 1\n', "b.toml:1: service: must be a lower-case DNS name"),
    ('service = "svcb"\napp_port = 70000\n', "b.toml:2: app_port: must be a port within 1..65535"),
    ('service = "svcb"\napp_port = 80\nmeshd_addr = "meshd:1"\n',
     "b.toml:3: meshd_addr: must start with http:// or https://"),
    ('service = "svcb"\napp_port = 80\nttl = 0.1\n', "b.toml:3: ttl: must be within 1..3600 seconds"),
])
def test_bad_bootstrap_names_file_line_field(text: str, error: str) -> None:
    with pytest.raises(ConfigError) as exc:
        bootstrap.parse(text, "b.toml", env={})
    assert str(exc.value) == error


def test_bootstrap_syntax_error_has_line() -> None:
    with pytest.raises(ConfigError, match=r"^b.toml:2: "):
        bootstrap.parse('service = "svcb"\napp_port = = 1\n', "b.toml", env={})


def _snapshot(version: Version, weight: int = 100) -> bytes:
    mesh = compile_mesh(RulesFile(), [Instance("svcb", "b1", "127.0.0.1", 1)])
    snap = for_node(mesh, NodeInfo(node="n1"), version)
    if weight != 100:
        vh = snap.virtual_hosts[0]
        route = msgspec.structs.replace(vh.routes[0], clusters=(
            WeightedCluster(cluster=vh.routes[0].clusters[0].cluster, weight=weight),))
        snap = msgspec.structs.replace(snap, virtual_hosts=(msgspec.structs.replace(vh, routes=(route,)),))
    return encode(snap)


class FakeMeshd:
    """Answers long-polls from a queue of bodies; records ACK/NACK posts."""

    def __init__(self, bodies: list[bytes]) -> None:
        self.bodies = bodies
        self.acks: list[dict[str, str | None]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/ack"):
            self.acks.append(json.loads(request.content))
            return httpx.Response(200, json={"ok": True})
        if not self.bodies:
            return httpx.Response(304)
        return httpx.Response(200, content=self.bodies.pop(0))


async def _subscription(tmp_path: Path, fake: FakeMeshd) -> tuple[Subscription, State]:
    boot = bootstrap.parse(BOOT.replace("{dir}", str(tmp_path)), env={})
    state = State()
    client = httpx.AsyncClient(transport=httpx.MockTransport(fake))
    return Subscription(boot, state, Metrics(), client), state


async def test_ack_good_nack_bad_and_keep_last_good(tmp_path: Path) -> None:
    fake = FakeMeshd([_snapshot(Version(1, 1)), _snapshot(Version(1, 2), weight=50), b"{oops"])
    sub, state = await _subscription(tmp_path, fake)
    for _ in range(3):
        await sub.poll_once()
    assert str(state.applied.snapshot.version) == "1.1"
    assert fake.acks[0] == {"version": "1.1", "error": None}
    assert fake.acks[1]["version"] == "1.2" and "weights sum to 50" in fake.acks[1]["error"]
    assert fake.acks[2]["version"] == "unknown" and fake.acks[2]["error"]
    assert sub.known == "unknown"  # never re-requests the same bad version in a hot loop


async def test_disk_cache_survives_restart(tmp_path: Path) -> None:
    sub, _ = await _subscription(tmp_path, FakeMeshd([_snapshot(Version(4, 2))]))
    await sub.poll_once()
    sub2, state2 = await _subscription(tmp_path, FakeMeshd([]))
    assert sub2.load_cache() and state2.applied.source == "disk-cache"
    assert str(state2.applied.snapshot.version) == "4.2" and sub2.known == "4.2"
    (tmp_path / "snapshot.json").write_bytes(b"garbage")
    sub3, state3 = await _subscription(tmp_path, FakeMeshd([]))
    assert not sub3.load_cache() and state3.applied is None

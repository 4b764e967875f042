"""meshd.toml parsing, the static-file source, and the merged registry in meshd's API/metrics."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import trio

from meshd.errors import ConfigError
from meshd.server.api import build_app
from meshd.server.control import ControlPlane
from meshd.store.sqlite import SqliteStore
from registry import config, factory, static
from registry.docker.source import DockerSource
from registry.model import Instance

FULL = """\
[merge]
max_removal_share = 0.3
guard_hold = 10

[[sources]]
kind = "builtin"

[[sources]]
kind = "docker"
network = "app_default"

[[sources]]
kind = "etcd"
name = "etcd-dc2"
endpoints = ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]

[[sources]]
kind = "static"
path = "static.toml"

[[sources]]
kind = "consul"
address = "http://127.0.0.1:8500"

[[sources]]
kind = "eureka"
address = "http://127.0.0.1:8761/eureka"
"""


def test_full_config_builds_every_source(tmp_path: Path) -> None:
    (tmp_path / "meshd.toml").write_text(FULL)
    cfg = config.load(tmp_path / "meshd.toml")
    assert [s.source_name for s in cfg.sources] == ["builtin", "docker", "etcd-dc2", "static", "consul",
                                                    "eureka"]
    assert cfg.merge.policy.max_removal_share == 0.3 and cfg.merge.policy.hold == 10
    built = factory.build(cfg)
    assert [type(s).__name__ for s in built] == ["DockerSource", "EtcdSource", "StaticFileSource",
                                                 "ConsulSource", "EurekaSource"]
    assert isinstance(built[0], DockerSource) and built[0].network == "app_default"
    assert built[2].path == tmp_path / "static.toml"  # relative to meshd.toml


@pytest.mark.parametrize(("text", "where"), [
    ('[[sources]]\nkind = "zookeeper"\n', "meshd.toml:2: sources.0.kind: Invalid value 'zookeeper'"),
    ('[[sources]]\nkind = "docker"\nnetwork = 1\n', "meshd.toml:3: sources.0.network: Expected `str`"),
    ('[[sources]]\nkind = "docker"\n\n[[sources]]\nkind = "etcd"\nbogus = 1\n',
     "meshd.toml:6: sources.1.bogus: Object contains unknown field `bogus`"),
    ('[[sources]]\nkind = "docker"\n[[sources]]\nkind = "docker"\n',
     "meshd.toml:3: sources.1.name: source name 'docker' is used twice"),
    ('[[sources]]\nkind = "static"\n', "meshd.toml:1: sources.0.path: a static source needs path"),
    ('[[sources]]\nkind = "etcd"\nprefix = "/x"\n', "meshd.toml:3: sources.0.prefix: needs"),
    ('[merge]\nmax_removal_share = 0\n', "meshd.toml:2: merge.max_removal_share: out of range"),
    ('[[sources]]\nkind = "docker"\nname = "Docker!"\n', "meshd.toml:3: sources.0.name: must be"),
    ("[[sources]\n", "meshd.toml:1: "),
])
def test_config_errors_name_file_line_field(text: str, where: str) -> None:
    with pytest.raises(ConfigError) as err:
        config.parse(text)
    assert str(err.value).startswith(where), str(err.value)


def test_static_parse_and_errors() -> None:
    good = static.parse('[[instances]]\nservice = "db"\naddress = "10.0.0.5"\nport = 5432\n'
                        'labels = { zone = "a" }\nprotocol = "tcp"\n', "s.toml")
    assert good == [Instance("db", "db-10.0.0.5-5432", "10.0.0.5", 5432, {"zone": "a"}, source="static",
                             protocol="tcp")]
    for text, where in [
        ('[[instances]]\nservice = "db"\naddress = "h"\nport = 0\n', "s.toml:4: instances.0.port"),
        ('[[instances]]\nservice = "db"\naddress = "h"\nport = 1\nprotocol = "udp"\n',
         "s.toml:5: instances.0.protocol"),
        ('[[instances]]\nservice = "db"\nport = 1\n', "s.toml:1: instances.0: Object missing"),
        ('[[instances]]\nservice = "a"\naddress = "h"\nport = 1\n' * 2, "s.toml:5: instances.1.instance_id"),
    ]:
        with pytest.raises(ConfigError, match="^" + where):
            static.parse(text, "s.toml")


class Recorder:
    def __init__(self) -> None:
        self.views: list[list[Instance]] = []
        self.errors: list[str] = []

    def update(self, instances: list[Instance]) -> None:
        self.views.append(list(instances))

    def error(self, message: str, service: str | None = None) -> None:
        self.errors.append(message)


async def _until(pred: Callable[[], bool]) -> None:
    while not pred():  # noqa: ASYNC110 (polling a recorder; bounded by the caller's fail_after)
        await trio.sleep(0.02)


async def test_static_source_reloads_on_change_and_keeps_last_good(tmp_path: Path) -> None:
    path, sink = tmp_path / "static.toml", Recorder()
    row = '[[instances]]\nservice = "db"\naddress = "10.0.0.{n}"\nport = 5432\n'
    path.write_text(row.format(n=1))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(static.StaticFileSource("static", path, 0.02).watch, sink)
        with trio.fail_after(5):
            await _until(lambda: bool(sink.views))
            path.write_text("[[instances]]\nport = 'x'\n")  # broken: an error, no update
            await _until(lambda: bool(sink.errors))
            assert len(sink.views) == 1 and "static.toml:2: instances.0.port" in sink.errors[0]
            path.unlink()
            await _until(lambda: len(sink.errors) >= 2)
            path.write_text(row.format(n=1) + row.format(n=2))
            await _until(lambda: len(sink.views) >= 2)
        assert [i.address for i in sink.views[-1]] == ["10.0.0.1", "10.0.0.2"]
        nursery.cancel_scope.cancel()


async def test_api_and_metrics_show_sources_staleness_and_conflicts(tmp_path: Path) -> None:
    cfg = config.parse('[[sources]]\nkind = "builtin"\n[[sources]]\nkind = "docker"\n'
                       '[[sources]]\nkind = "static"\npath = "x"\n')
    cp = ControlPlane(SqliteStore(tmp_path), config=cfg)
    cp.start()
    cp.register(Instance("web", "web-1", "10.0.0.1", 80, {"v": "1"}))
    cp.sink("docker").update([Instance("web", "c1", "10.0.0.1", 80, {"v": "2"}),
                              Instance("web", "c2", "10.0.0.2", 80)])
    cp.sink("docker").error("docker: event stream ended")
    cp.sink("static").error("x: cannot read: No such file or directory")
    assert {i.instance_id for i in cp.instances()} == {"web-1", "c2"}  # 10.0.0.1:80 once
    app = build_app(cp)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://m") as c:
        body = (await c.get("/v1/registry/services")).json()
        metrics = (await c.get("/metrics")).text
    [web] = body["services"]
    assert {i["source"] for i in web["instances"]} == {"builtin", "docker"}
    assert web["stale_sources"] == ["docker"]
    by_name = {s["name"]: s for s in body["sources"]}
    assert by_name["docker"]["stale"] and by_name["docker"]["message"] == "docker: event stream ended"
    assert by_name["static"]["stale"] and not by_name["static"]["synced"]
    assert body["conflicts"][0]["kind"] == "address" and body["conflicts"][0]["key"] == "10.0.0.1:80"
    assert 'meshd_registry_source_stale{source="docker"} 1.0' in metrics
    assert 'meshd_registry_source_stale{source="builtin"} 0.0' in metrics
    assert 'meshd_registry_instances{source="docker"} 2.0' in metrics
    assert "meshd_registry_conflicts 1.0" in metrics


@pytest.mark.parametrize(("table", "kind"), [
    ("", "MeshdRegistrar"),
    ('[registry]\nkind = "etcd"\nendpoints = ["http://127.0.0.1:2379"]\n', "EtcdRegistrar"),
    ('[registry]\nkind = "consul"\naddress = "http://127.0.0.1:8500"\n', "ConsulRegistrar"),
    ('[registry]\nkind = "eureka"\naddress = "http://127.0.0.1:8761/eureka"\n', "EurekaRegistrar"),
])
async def test_sidecar_registry_table_picks_the_registrar(table: str, kind: str) -> None:
    from sidecar import bootstrap
    from sidecar.registration import instance_of, make_registrar

    boot = bootstrap.parse(f'service = "web"\napp_port = 8080\nttl = 6\nlabels = {{ v = "1" }}\n{table}',
                           env={})
    async with httpx.AsyncClient() as client:
        reg = make_registrar(boot, client)
    assert type(reg).__name__ == kind
    assert instance_of(boot).labels == {"app": "web", "v": "1"} and instance_of(boot).ttl == 6
    if kind in ("MeshdRegistrar", "EtcdRegistrar"):
        assert reg.heartbeat_interval == 2.0  # ttl / 3


def test_sidecar_registry_table_errors() -> None:
    from sidecar import bootstrap

    with pytest.raises(ConfigError, match=r"^b.toml:4: registry.kind: Invalid enum value 'zookeeper'"):
        bootstrap.parse('service = "web"\napp_port = 1\n[registry]\nkind = "zookeeper"\n', "b.toml", env={})

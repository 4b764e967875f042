"""Configured sources -> running ``DiscoverySource`` objects (imports each adapter lazily).

``build(config)`` returns one source per ``[[sources]]`` entry except ``builtin`` (meshd feeds
its own registry to the merger directly). Adapters are imported only when configured, so a
meshd without Docker never imports the Docker code.
"""

from __future__ import annotations

from registry import config as rc
from registry.source import DiscoverySource


def build_one(src: rc.SourceConfig) -> DiscoverySource | None:
    name = src.source_name
    if isinstance(src, rc.DockerSource):
        from registry.docker.source import DockerSource
        return DockerSource(name, src.host, src.network, src.label_prefix)
    if isinstance(src, rc.EtcdSource):
        from registry.etcd.source import EtcdSource
        return EtcdSource(name, list(src.endpoints), src.prefix)
    if isinstance(src, rc.StaticSource):
        from registry.static import StaticFileSource
        return StaticFileSource(name, src.path, src.poll_interval)
    if isinstance(src, rc.ConsulSource):
        from registry.consul.source import ConsulSource
        return ConsulSource(name, address=src.address or None, token=src.token or None,
                            datacenter=src.datacenter or None, services=src.services, wait=src.wait)
    if isinstance(src, rc.EurekaSource):
        from registry.eureka.source import EurekaSource
        return EurekaSource(name, address=src.address, poll=src.poll)
    return None  # builtin


def build(cfg: rc.MeshdConfig) -> list[DiscoverySource]:
    return [s for s in (build_one(src) for src in cfg.sources) if s is not None]

"""Outage matrix: Docker (event stream dropped), etcd (killed) and a static file (broken) at
once under one merger — 0 instances removed because of an error, staleness reported, resync on
recovery, and the mass-disappearance guard withholding then applying a removal."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import trio

from registry.docker.source import DockerSource
from registry.etcd.registrar import EtcdRegistrar
from registry.etcd.source import EtcdSource
from registry.guard import GuardPolicy
from registry.model import Instance
from registry.static import StaticFileSource

DOCKER_SOCK = "/var/run/docker.sock"
HOLD = 2.0  # seconds: the guard's hold in this test (default 30)


class UnixProxy:
    """A Unix-socket TCP pipe to dockerd that the test can cut (every connection closed, the
    socket gone) and restore: a dropped event stream and a daemon that cannot be reached."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.scope = trio.CancelScope()

    async def _pipe(self, src: trio.abc.Stream, dst: trio.abc.Stream) -> None:
        try:
            while data := await src.receive_some(65536):
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _handle(self, down: trio.SocketStream) -> None:
        async with down, await trio.open_unix_socket(DOCKER_SOCK) as up, trio.open_nursery() as n:
            n.start_soon(self._pipe, down, up)
            await self._pipe(up, down)
            n.cancel_scope.cancel()

    async def up(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as self.scope:
            sock = trio.socket.socket(trio.socket.AF_UNIX)
            await sock.bind(str(self.path))
            sock.listen()
            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, self._handle, [trio.SocketListener(sock)])
                task_status.started()

    def drop(self) -> None:
        self.scope.cancel()
        os.unlink(self.path)


def write_static(path: Path, names: list[str]) -> None:
    rows = [f'[[instances]]\nservice = "db"\ninstance_id = "{n}"\naddress = "10.1.0.{n[-1]}"\n'
            'port = 5432\n' for n in names]
    tmp = path.with_suffix(".new")
    tmp.write_text("\n".join(rows))
    tmp.replace(path)


async def test_outage_matrix(docker_env, etcd, merged_view, tmp_path: Path) -> None:
    d, static = docker_env, tmp_path / "static.toml"
    view = merged_view(["docker", "etcd", "static"], GuardPolicy(hold=HOLD))
    write_static(static, ["db-1", "db-2"])
    proxy = UnixProxy(tmp_path / "docker.sock")
    c1 = await d.run("c1", "-l", "mesh.service=web", "-l", "mesh.port=80")
    c2 = await d.run("c2", "-l", "mesh.service=web", "-l", "mesh.port=80")
    async with httpx.AsyncClient() as client, trio.open_nursery() as nursery:
        reg = EtcdRegistrar([etcd.url], ttl=60, client=client)
        for n in (1, 2):
            await reg.register(Instance("api", f"api-{n}", f"10.2.0.{n}", 8080, ttl=60))
        await nursery.start(proxy.up)
        nursery.start_soon(DockerSource("docker", f"unix://{proxy.path}", d.network).watch,
                           view.sink("docker"))
        nursery.start_soon(EtcdSource("etcd", [etcd.url]).watch, view.sink("etcd"))
        nursery.start_soon(StaticFileSource("static", static, poll_interval=0.1).watch,
                           view.sink("static"))
        everything = {c1, c2, "api-1", "api-2", "db-1", "db-2"}
        await view.until(lambda: view.ids() == everything)

        # outage: the Docker event stream drops and dockerd is unreachable, etcd is killed,
        # the static file is broken; meanwhile c2 really stops (nobody can see it)
        proxy.drop()
        etcd.stop()
        static.write_text("[[instances]]\nservice = 42\n")
        await d.cli("stop", "-t", "0", c2)
        await view.until(lambda: all(view.stale(s) for s in ("docker", "etcd", "static")))
        await trio.sleep(1.0)  # several failed retries of every source
        assert view.ids() == everything  # 0 instances removed because of errors
        assert "static.toml:2: instances.0.service" in view.merger.sources["static"].stale.message

        # recovery: every source resyncs from a fresh listing
        etcd.start()
        await nursery.start(proxy.up)
        write_static(static, ["db-3"])  # db-1 and db-2 both gone at once: the guard holds them
        await view.until(lambda: not any(view.stale(s) for s in ("docker", "etcd", "static")),
                         within=20)
        await view.until(lambda: view.ids() == {c1, "api-1", "api-2", "db-1", "db-2", "db-3"})
        withheld = view.merger.sources["static"].guard.withheld["db"]
        assert (withheld.removed, withheld.of) == (2, 2)
        await view.until(lambda: view.merger.tick(trio.current_time()) or "db-1" not in view.ids(),
                         within=HOLD + 5)
        assert view.ids() == {c1, "api-1", "api-2", "db-3"}
        nursery.cancel_scope.cancel()

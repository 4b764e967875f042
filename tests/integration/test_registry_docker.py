"""Docker adapter against this machine's dockerd: containers from the local ``meshbase`` image
on a network the test creates (no pulls); everything it starts is removed in ``finally``."""

from __future__ import annotations

import trio

from registry.docker.source import DockerSource


async def test_add_health_change_and_stop_seen_at_once(docker_env, merged_view) -> None:
    d = docker_env
    view = merged_view(["docker"])
    src = DockerSource("docker", network=d.network)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(src.watch, view.sink("docker"))
        await view.until(lambda: view.merger.sources["docker"].synced)

        c1 = await d.run("c1", "--health-cmd", "test -f /tmp/ok", "--health-interval", "500ms",
                         "--health-retries", "1", "-l", "mesh.service=web", "-l", "mesh.port=8080",
                         "-l", "mesh.version=v1", "-l", "mesh.protocol=http")
        await d.until_health(c1, "starting", "unhealthy")  # no /tmp/ok yet
        assert c1 not in view.ids()  # "starting" or "unhealthy": not routable
        await d.cli("exec", c1, "touch", "/tmp/ok")
        healthy_after = await view.until(lambda: c1 in view.ids())
        inst = view.get(c1)
        assert inst is not None and inst.address == await d.ip(c1) and inst.port == 8080
        assert inst.labels == {"version": "v1"} and inst.protocol == "http"

        c2 = await d.run("c2", "--expose", "9000", "-l", "SERVICE_NAME=web",
                         "-l", "SERVICE_TAGS=version=v2,canary")  # registrator labels, no check
        added_after = await view.until(lambda: c2 in view.ids())
        assert (i := view.get(c2)) is not None and (i.service, i.port, i.labels) == ("web", 9000,
                                                                                     {"version": "v2"})

        await d.cli("exec", c1, "rm", "/tmp/ok")  # unhealthy -> out
        await view.until(lambda: c1 not in view.ids())

        gone = trio.Event()

        async def watch_removal() -> None:
            await view.until(lambda: c2 not in view.ids(), within=10)
            gone.set()

        nursery.start_soon(watch_removal)
        start = trio.current_time()
        await d.cli("kill", c2)  # SIGKILL: the container dies now, the die event follows
        killed = trio.current_time() - start
        await gone.wait()
        removed_after = trio.current_time() - start
        assert view.ids() == set() and src.rounds == 1 and not view.stale("docker")
        print(f"docker: healthy->in {healthy_after:.3f}s, run->in {added_after:.3f}s, "
              f"kill command {killed:.3f}s, removed {removed_after:.3f}s after it started")
        nursery.cancel_scope.cancel()

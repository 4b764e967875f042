"""Shared fixtures of the integration tests (add fixtures here; keep each one self-contained)."""

from __future__ import annotations

import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import trio

from meshd.demo.harness import free_port, stop_processes, wait_until
from registry.guard import GuardPolicy
from registry.merge import Merger, Sink
from registry.model import Instance

ETCD_START_TIMEOUT = 20.0  # seconds


def start_etcd(data_dir: Path, port: int, peer_port: int) -> subprocess.Popen[bytes]:
    """Debian's ``etcd`` (3.4) as a single-member cluster on loopback, logging to data_dir."""
    url, peer = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{peer_port}"
    log = open(data_dir.parent / f"etcd-{port}.log", "ab")
    proc = subprocess.Popen(
        ["etcd", "--name", "t", "--data-dir", str(data_dir), "--listen-client-urls", url,
         "--advertise-client-urls", url, "--listen-peer-urls", peer,
         "--initial-advertise-peer-urls", peer, "--initial-cluster", f"t={peer}",
         "--log-level", "warn"], stdout=log, stderr=log, start_new_session=True)
    log.close()
    wait_until(lambda: httpx.get(f"{url}/health", timeout=1).status_code == 200,
               ETCD_START_TIMEOUT, f"etcd on {url}")
    return proc


class Etcd:
    """A running etcd: ``url``; ``stop()`` kills it, ``start()`` restarts it on the same data."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port, self.peer_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = start_etcd(self.root / "data", self.port, self.peer_port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture
def etcd() -> Iterator[Etcd]:
    """A fresh etcd per test on free loopback ports with a temporary data dir."""
    if shutil.which("etcd") is None:
        pytest.skip("etcd is not installed (apt-get install etcd-server)")
    root = Path(tempfile.mkdtemp(prefix="meshd-etcd-"))
    server = Etcd(root)
    try:
        server.start()
        yield server
    finally:
        if server.proc is not None:
            stop_processes([server.proc], grace=2.0)
        shutil.rmtree(root, ignore_errors=True)


class MergedView:
    """A real ``registry.merge.Merger`` fed by live sources, with polling helpers for tests."""

    def __init__(self, sources: list[str], policy: GuardPolicy | None = None) -> None:
        self.merger = Merger(sources, policy)

    def sink(self, source: str) -> Sink:
        return Sink(self.merger, source, trio.current_time)

    def ids(self, source: str | None = None) -> set[str]:
        return {i.instance_id for i in self.merger.instances() if source in (None, i.source)}

    def get(self, iid: str) -> Instance | None:
        return next((i for i in self.merger.instances() if i.instance_id == iid), None)

    def stale(self, source: str) -> bool:
        st = self.merger.sources[source]
        return st.stale is not None or bool(st.stale_services)

    async def until(self, pred: Callable[[], bool], within: float = 10.0) -> float:
        """Poll ``pred`` every 10 ms (errors change no instances, so there is no event to wait
        on); seconds waited. TooSlowError after ``within`` seconds."""
        start = trio.current_time()
        with trio.fail_after(within):
            while not pred():  # noqa: ASYNC110
                await trio.sleep(0.01)
        return trio.current_time() - start


@pytest.fixture
def merged_view() -> type[MergedView]:
    return MergedView


DOCKER_IMAGE = "meshbase:bookworm"  # imported locally by .ci/base-image.sh; never pulled


class DockerEnv:
    """Containers (``sleep infinity`` from ``DOCKER_IMAGE``) on a network this test created,
    all labelled ``meshd.test=<tag>``; the docker CLI runs in a worker thread."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.network = f"meshd-t-{tag}"

    def cli_sync(self, *args: str, check: bool = True) -> str:
        out = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=60)
        if check and out.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)}: {out.stderr.strip()}")
        return out.stdout.strip()

    async def cli(self, *args: str) -> str:
        return await trio.to_thread.run_sync(self.cli_sync, *args)

    async def run(self, name: str, *opts: str, cmd: tuple[str, ...] = ("sleep", "infinity")) -> str:
        """Start a container; returns its name (``<name>-<tag>``, also its instance id)."""
        full = f"{name}-{self.tag}"
        await self.cli("run", "-d", "--name", full, "--network", self.network,
                       "-l", f"meshd.test={self.tag}", *opts, DOCKER_IMAGE, *cmd)
        return full

    async def ip(self, name: str) -> str:
        return await self.cli("inspect", "-f", f"{{{{(index .NetworkSettings.Networks "
                              f"\"{self.network}\").IPAddress}}}}", name)

    async def until_health(self, name: str, *states: str, within: float = 20.0) -> str:
        """Wait until the container's health status is one of ``states``; returns it."""
        fmt = "{{if .State.Health}}{{.State.Health.Status}}{{end}}"
        with trio.fail_after(within):
            while (now := await self.cli("inspect", "-f", fmt, name)) not in states:  # noqa: ASYNC110
                await trio.sleep(0.1)
        return now

    def cleanup(self) -> None:
        ids = self.cli_sync("ps", "-aq", "--filter", f"label=meshd.test={self.tag}", check=False)
        if ids:
            self.cli_sync("rm", "-f", *ids.split(), check=False)
        self.cli_sync("network", "rm", self.network, check=False)


@pytest.fixture
def docker_env() -> Iterator[DockerEnv]:
    if shutil.which("docker") is None or subprocess.run(
            ["docker", "image", "inspect", DOCKER_IMAGE], capture_output=True, timeout=30).returncode:
        pytest.skip(f"needs dockerd and the local image {DOCKER_IMAGE} (.ci/run builds it)")
    env = DockerEnv(secrets.token_hex(4))
    env.cli_sync("network", "create", "--label", f"meshd.test={env.tag}", env.network)
    try:
        yield env
    finally:
        env.cleanup()

"""compose/labels-only: containers onboarded by Docker labels alone (meshd's Docker source).

The example's meshd and edge sidecar come up with Compose; then this test starts two more
containers itself with ``docker run --label ...`` and nothing else (no sidecar, no bootstrap,
no API call), and traffic through the edge reaches them; a stopped one leaves the endpoints.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator

import pytest
from e2e_docker import ROOT, TIMINGS, ComposeProject, free_port, get, run

pytestmark = pytest.mark.slow
HEALTH = "python -c \"import socket; socket.create_connection(('127.0.0.1', 8080), 2).close()\""


@pytest.fixture(scope="module")
def labels_stack(compose: list[str], project_image: str) -> Iterator[dict]:
    name = f"meshlbl{os.getpid()}{int(time.time()) % 10000}"
    env = {"MESHD_IMAGE": project_image, "MESH_EDGE_PORT": str(free_port()),
           "MESHD_API_PORT": str(free_port())}
    project = ComposeProject(name, [ROOT / "compose" / "labels-only" / "docker-compose.yml"], env, compose)
    try:
        started = time.monotonic()
        project.cmd("up", "-d", "meshd", "edge")  # the example's web-v1/v2 are not needed here
        project.wait_healthy(["meshd", "edge"])
        TIMINGS["labels-only: up -> healthy"] = time.monotonic() - started
        yield {"project": project, "edge": int(env["MESH_EDGE_PORT"]), "image": project_image}
    finally:
        project.down()


def _start_labelled(stack: dict, version: str) -> str:
    project: ComposeProject = stack["project"]
    name = f"{project.name}-web-{version}"
    project.extra_containers.append(name)
    run(["docker", "run", "-d", "--name", name, "--network", f"{project.name}_default",
         "--label", "mesh.service=web", "--label", "mesh.port=8080", "--label", f"mesh.version={version}",
         "--label", f"mesh.e2e={project.name}", "--health-cmd", HEALTH, "--health-interval", "1s",
         stack["image"], "python", "-m", "meshd.demo.apps", "static", "--host", "0.0.0.0", "--port", "8080",
         "--version", version, "--instance", name])
    return name


def _versions(edge: int, n: int) -> Counter:
    seen: Counter = Counter()
    for _ in range(n):
        status, body = get(edge, "/hello", "web")
        seen[body["version"] if status == 200 else status] += 1
    return seen


def test_labels_alone_route_traffic(labels_stack: dict) -> None:
    edge = labels_stack["edge"]
    started = time.monotonic()
    v1, v2 = _start_labelled(labels_stack, "v1"), _start_labelled(labels_stack, "v2")
    deadline, seen = time.monotonic() + 60, Counter()
    while time.monotonic() < deadline:  # discovery: healthy containers -> endpoints -> snapshot
        seen = _versions(edge, 10)
        if seen.keys() == {"v1", "v2"}:
            break
        time.sleep(1.0)
    TIMINGS["labels-only: docker run -> both routed"] = time.monotonic() - started
    assert seen.keys() == {"v1", "v2"}, seen
    seen = _versions(edge, 40)
    assert seen["v1"] + seen["v2"] == 40 and seen["v1"] >= 5 and seen["v2"] >= 5, seen
    # a container that stops leaves the endpoints (Docker event), traffic goes to the other
    run(["docker", "stop", "-t", "1", v2])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _versions(edge, 5).keys() != {"v1"}:
        time.sleep(0.5)
    assert _versions(edge, 20) == {"v1": 20}, v1


def test_labels_down_leaves_nothing(labels_stack: dict) -> None:
    project: ComposeProject = labels_stack["project"]
    project.down()
    assert project.leftovers() == {"containers": [], "networks": [], "volumes": []}
    assert run(["docker", "ps", "-aq", "--filter", f"label=mesh.e2e={project.name}"]).stdout.split() == []

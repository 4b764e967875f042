"""Fixtures of the deployment tests (tests/e2e): skip cleanly without Docker, build the project
image once per session, print what was measured."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_docker import (
    BASE_IMAGE,
    TIMINGS,
    build_project_image,
    build_wheels,
    compose_command,
    docker_reachable,
    run,
)

SESSION_START = time.monotonic()


@pytest.fixture(scope="session")
def compose() -> list[str]:
    why = docker_reachable()
    if why:
        pytest.skip(why)
    cmd = compose_command()
    if not cmd:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed (.ci/run installs them)")
    return cmd


@pytest.fixture(scope="session")
def wheels(compose: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Host-built wheels of meshd and its dependencies (the image and the VM install from them)."""
    return build_wheels(Path(tmp_path_factory.mktemp("wheels")) / "wheels")


@pytest.fixture(scope="session")
def project_image(
    compose: list[str], wheels: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The meshd image, FROM the local base image, from wheels built on the host (no registry)."""
    if run(["docker", "image", "inspect", BASE_IMAGE], check=False).returncode != 0:
        pytest.fail(f"the local base image {BASE_IMAGE} is missing: run .ci/base-image.sh")
    yield build_project_image(Path(tmp_path_factory.mktemp("image")), wheels)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if TIMINGS:
        TIMINGS["e2e session (wall)"] = time.monotonic() - SESSION_START
        terminalreporter.section("e2e measurements")
        for name, value in TIMINGS.items():
            unit = "" if name.startswith(("failed", "requests")) else " s"
            terminalreporter.write_line(f"{name:<48} {value:.1f}{unit}" if unit else f"{name:<48} {value:g}")

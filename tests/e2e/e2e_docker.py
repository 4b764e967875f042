"""Helpers of the deployment (e2e) tests: the docker CLI, Compose (v2 plugin or 1.29), the
project image built once per session, and a Compose project that always cleans up.

Everything goes through the real ``docker`` / ``docker compose`` / ``docker-compose`` commands
(what users run); only containers, networks and volumes of the test's own project are touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BASE_IMAGE = "meshbase:bookworm"  # .ci/base-image.sh
VM_IMAGE = "meshvm:bookworm"
VM_FLAGS = [
    "--cap-add",
    "SYS_ADMIN",
    "--cap-add",
    "NET_ADMIN",
    "--security-opt",
    "seccomp=unconfined",
    "--security-opt",
    "apparmor=unconfined",
    "-v",
    "/sys/fs/cgroup:/sys/fs/cgroup:ro",
    "--tmpfs",
    "/run",
    "--tmpfs",
    "/run/lock",
    "-e",
    "container=docker",
]  # containers-here.md
CMD_TIMEOUT = 180.0  # seconds for one docker command (a build, an `up`)
TIMINGS: dict[str, float] = {}  # what the suite measured, printed at the end of the session


def run(
    args: list[str],
    *,
    timeout: float = CMD_TIMEOUT,
    check: bool = True,
    env: dict[str, str] | None = None,
    input: str | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )
    if check and out.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args)} -> {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        )
    return out


def docker_reachable() -> str:
    """'' if dockerd answers, else why not (the skip reason)."""
    if shutil.which("docker") is None:
        return "the docker CLI is not installed (.ci/run installs docker.io)"
    try:
        out = subprocess.run(
            ["docker", "info", "-f", "{{.ServerVersion}}"], capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:
        return "docker info timed out"
    return "" if out.returncode == 0 else f"dockerd is not reachable: {out.stderr.strip()[:200]}"


def compose_command() -> list[str]:
    """``docker compose`` (v2 plugin) when present, else ``docker-compose`` (1.29); [] if neither."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _source_digest() -> str:
    h = hashlib.sha256()
    for top in (
        "pyproject.toml",
        "meshd",
        "sidecar",
        "registry",
        "compose/Dockerfile",
        "compose/healthcheck.py",
    ):
        paths = [ROOT / top] if (ROOT / top).is_file() else sorted((ROOT / top).rglob("*.py"))
        for p in paths:
            h.update(str(p.relative_to(ROOT)).encode() + p.read_bytes())
    return h.hexdigest()[:12]


def build_wheels(target: Path) -> Path:
    """meshd and every dependency as wheels, made on the host (pip's cache makes it quick), plus
    setuptools for building meshd's own wheel offline inside the image."""
    started = time.monotonic()
    run(
        [sys.executable, "-m", "pip", "wheel", "-q", "-w", str(target), str(ROOT), "setuptools>=77"],
        timeout=300,
    )
    TIMINGS["host wheels (pip wheel)"] = time.monotonic() - started
    return target


def build_project_image(workdir: Path, wheel_dir: Path) -> str:
    """The project image from host-built wheels FROM the local base image; reused when the
    sources did not change (tag = digest of the sources). Returns the tag."""
    tag = f"meshd-e2e:{_source_digest()}"
    if run(["docker", "image", "inspect", tag], check=False).returncode == 0:
        TIMINGS["project image build (cached)"] = 0.0
        return tag
    ctx = workdir / "ctx"
    shutil.copytree(wheel_dir, ctx / "compose" / "wheels")
    for top in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / top, ctx / top)
    for top in ("meshd", "sidecar", "registry"):
        shutil.copytree(ROOT / top, ctx / top, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("Dockerfile", "healthcheck.py"):
        shutil.copy(ROOT / "compose" / name, ctx / "compose" / name)
    started = time.monotonic()
    run(
        [
            "docker",
            "build",
            "-q",
            "-f",
            str(ctx / "compose" / "Dockerfile"),
            "--build-arg",
            f"BASE={BASE_IMAGE}",
            "-t",
            tag,
            str(ctx),
        ],
        timeout=400,
    )
    TIMINGS["project image build"] = time.monotonic() - started
    # older builds of this image (other source digests): removed unless a container still uses them
    for old in run(["docker", "images", "meshd-e2e", "--format", "{{.Repository}}:{{.Tag}}"]).stdout.split():
        if old != tag:
            run(["docker", "rmi", old], check=False)
    return tag


@dataclass
class ComposeProject:
    """One ``-p <name>`` Compose project; ``down()`` removes its containers, networks, volumes."""

    name: str
    files: list[Path]
    env: dict[str, str]
    compose: list[str]
    extra_containers: list[str] = field(default_factory=list)
    extra_networks: list[str] = field(default_factory=list)

    def cmd(
        self, *args: str, timeout: float = CMD_TIMEOUT, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        files = [a for f in self.files for a in ("-f", str(f))]
        return run(
            [*self.compose, "-p", self.name, *files, *args], timeout=timeout, check=check, env=self.env
        )

    def container(self, service: str) -> str:
        out = run(
            [
                "docker",
                "ps",
                "-q",
                "--filter",
                f"label=com.docker.compose.project={self.name}",
                "--filter",
                f"label=com.docker.compose.service={service}",
            ]
        ).stdout.split()
        if not out:
            raise RuntimeError(f"no running container for {service}")
        return out[0]

    def states(self) -> dict[str, str]:
        """service -> health ('healthy', 'starting', 'none') or the state of a stopped container."""
        ids = run(
            ["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={self.name}"]
        ).stdout.split()
        if not ids:
            return {}
        found = {}
        for c in json.loads(run(["docker", "inspect", *ids]).stdout):
            svc = c["Config"]["Labels"].get("com.docker.compose.service", c["Name"])
            st = c["State"]
            found[svc] = (
                st.get("Health", {}).get("Status", "none") if st["Running"] else f"exited {st['ExitCode']}"
            )
        return found

    def wait_healthy(self, services: list[str], timeout: float = 150.0) -> None:
        deadline, states = time.monotonic() + timeout, {}
        while time.monotonic() < deadline:
            states = self.states()
            if all(states.get(s) in ("healthy", "none") for s in services):
                return
            time.sleep(1.0)
        raise AssertionError(f"not healthy after {timeout:.0f}s: {states}")

    def leftovers(self) -> dict[str, list[str]]:
        label = f"label=com.docker.compose.project={self.name}"
        return {
            kind: run(["docker", *cmd, "--filter", label]).stdout.split()
            for kind, cmd in (
                ("containers", ["ps", "-aq"]),
                ("networks", ["network", "ls", "-q"]),
                ("volumes", ["volume", "ls", "-q"]),
            )
        }

    def down(self) -> None:
        for c in self.extra_containers:
            run(["docker", "rm", "-f", "-v", c], check=False)
        for n in self.extra_networks:
            run(["docker", "network", "rm", n], check=False)
        self.cmd("down", "-v", "--remove-orphans", "-t", "2", check=False, timeout=120)


def load_in(
    container: str, url: str, host: str, seconds: float, workers: int = 4, expect: str = ""
) -> subprocess.Popen[str]:
    """Start tests/e2e/load.py inside ``container``; ``finish_load`` collects its JSON result."""
    proc = subprocess.Popen(
        ["docker", "exec", "-i", container, "python", "-", url, host, str(seconds), str(workers), expect],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None
    proc.stdin.write((Path(__file__).parent / "load.py").read_text())
    proc.stdin.close()
    return proc


def finish_load(proc: subprocess.Popen[str], timeout: float = 120.0) -> dict:
    assert proc.stdout is not None and proc.stderr is not None
    proc.wait(timeout=timeout)
    out, err = proc.stdout.read(), proc.stderr.read()
    if proc.returncode != 0:
        raise RuntimeError(f"load failed: {err[-2000:]}")
    return json.loads(out.strip().splitlines()[-1])


def get(port: int, path: str, host: str, ua: str = "e2e") -> tuple[int, dict]:
    """GET from the host through a published sidecar port; a non-JSON body comes as {"text": ...}."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Host": host, "User-Agent": ua})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=20) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        body = json.loads(raw or b"null")
    except ValueError:
        body = {"text": raw.decode("utf-8", "replace")}
    return status, body if isinstance(body, dict) else {"value": body}

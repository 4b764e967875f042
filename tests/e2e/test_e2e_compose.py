"""compose/docker-compose.yml against the real Docker engine, then a systemd "VM" joins it.

One Compose project per module (unique name, free host ports), driven from the host exactly as
the README says; the tests run in order and the last one checks that ``down -v`` leaves nothing.

* demo outcomes as ``meshd demo``: egress denied (502) then allowed by a pushed rule (200),
  the 95/5 canary split, the iPhone header route; sidecars use mTLS (STRICT refuses plain text);
* hybrid: a systemd container onboarded by deploy/onboard-vm.sh runs service ``vmpay``; traffic
  container -> VM -> container, a rule pushed from the host, restarts under steady load;
* ``down -v``: no container, network or volume of the project is left.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from e2e_docker import (
    ROOT,
    TIMINGS,
    VM_FLAGS,
    VM_IMAGE,
    ComposeProject,
    finish_load,
    free_port,
    get,
    load_in,
    run,
)

pytestmark = pytest.mark.slow
IPHONE = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X)"
SPLIT_REQUESTS = 400
LOAD_SECONDS = 9.0  # steady traffic around each restart (the restart starts 3 s in)


@pytest.fixture(scope="module")
def stack(
    compose: list[str], project_image: str, wheels: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict]:
    name = f"meshe2e{os.getpid()}{int(time.time()) % 10000}"
    ports = {"MESH_EDGE_PORT": str(free_port()), "MESHD_API_PORT": str(free_port())}
    env = {"MESHD_IMAGE": project_image, **ports}
    project = ComposeProject(name, [ROOT / "compose" / "docker-compose.yml"], env, compose)
    tmp = tmp_path_factory.mktemp("stack")
    pool = ThreadPoolExecutor(1)
    try:
        vm = pool.submit(_prepare_vm, project, wheels)  # boots and installs the package meanwhile
        started = time.monotonic()
        project.cmd("up", "-d")
        project.wait_healthy(["meshd", "svca", "svcb-v1-a", "svcb-v1-b", "svcb-v2", "svca-sidecar", "msgd"])
        TIMINGS["compose up -> all healthy"] = time.monotonic() - started
        meshd = project.container("meshd")
        (tmp / "api-ca.pem").write_text(run(["docker", "exec", meshd, "cat", "/secrets/api-ca.pem"]).stdout)
        token = run(["docker", "exec", meshd, "cat", "/secrets/operator-token"]).stdout.strip()
        cli_env = {**os.environ, "MESHD_ADDR": f"https://127.0.0.1:{ports['MESHD_API_PORT']}",
                   "MESHD_CACERT": str(tmp / "api-ca.pem"), "MESHD_TOKEN": token}
        edge = int(ports["MESH_EDGE_PORT"])
        yield {"project": project, "edge": edge, "cli_env": cli_env, "tmp": tmp, "vm": vm}
    finally:
        pool.shutdown(wait=True)
        project.down()


def meshd_cli(stack: dict, *args: str) -> str:
    """The meshd CLI on the host, against the stack's published HTTPS API."""
    return run([sys.executable, "-m", "meshd.cli.main", *args], env=stack["cli_env"]).stdout


def plaintext_refused(container: str, host: str, port: int) -> bool:
    """From inside ``container``: a plain HTTP request to a STRICT inbound gets no HTTP answer."""
    probe = (
        "import socket,sys; s=socket.create_connection((sys.argv[1], int(sys.argv[2])), 5); "
        "s.settimeout(5); s.sendall(b'GET /notify HTTP/1.1\\r\\nHost: svcb\\r\\n\\r\\n'); "
        "d=s.recv(100); print(repr(d)); sys.exit(0 if d.startswith(b'HTTP/') else 3)"
    )
    out = run(["docker", "exec", container, "python", "-c", probe, host, str(port)], check=False)
    return out.returncode != 0


def test_compose_demo_outcomes(stack: dict) -> None:
    project, edge = stack["project"], stack["edge"]
    # (a) egress is denied by default
    status, body = get(edge, "/pay", "svca")
    assert status == 502 and "egress to msgd.example:80 denied" in json.dumps(body), body
    # (b) an egress rule pushed from the host (HTTPS API, operator token) lets svcb reach msgd
    meshd_cli(stack, "rule", "push", str(ROOT / "compose" / "rules" / "egress.toml"))
    status, body = get(edge, "/pay", "svca")
    assert status == 200 and body["downstream"]["downstream"]["sent"] is True, body
    # mTLS: the svcb sidecars are STRICT, so plain text from another container gets no answer
    assert plaintext_refused(project.container("msgd"), "svcb-v1-a-sidecar", 15006)
    # (c) canary 95/5 and the iPhone header route
    meshd_cli(stack, "rule", "push", str(ROOT / "compose" / "rules" / "route.toml"))
    time.sleep(1.0)  # the snapshot reaches svca's sidecar by long-poll
    versions = Counter(get(edge, "/pay", "svca")[1]["downstream"]["version"] for _ in range(SPLIT_REQUESTS))
    TIMINGS["requests to v2 of 400 (canary 5 %)"] = versions["v2"]
    assert versions["v1"] + versions["v2"] == SPLIT_REQUESTS, versions
    assert 4 <= versions["v2"] <= 50, versions  # 5 % of 400 = 20; binomial bounds, never flaky
    iphone = Counter(get(edge, "/pay", "svca", IPHONE)[1]["downstream"]["version"] for _ in range(20))
    assert iphone == {"v2": 20}, iphone
    status_lines = meshd_cli(stack, "proxy-status")
    assert status_lines.count("SYNCED") == 4, status_lines


def _prepare_vm(project: ComposeProject, wheels: Path) -> str:
    """A systemd "VM" container on its own network (joined to the project's later), booted, with
    the package installed by ``onboard-vm.sh --install-only``; runs while the stack comes up."""
    name, net = f"{project.name}-vm", f"{project.name}-vmnet"
    run(["docker", "network", "create", "--label", f"mesh.e2e={project.name}", net])
    project.extra_networks.append(net)
    project.extra_containers.append(name)
    started = time.monotonic()
    run(["docker", "run", "-d", "--name", name, "--hostname", "vmpay-vm", "--network", net,
         "--label", f"mesh.e2e={project.name}", *VM_FLAGS, VM_IMAGE, "/sbin/init"])
    deadline, state = time.monotonic() + 60, ""
    while time.monotonic() < deadline and state not in ("running", "degraded"):
        time.sleep(0.5)
        state = run(["docker", "exec", name, "systemctl", "is-system-running"], check=False).stdout.strip()
    assert state in ("running", "degraded"), f"the VM did not boot: {state}"
    TIMINGS["VM boot (systemd is-system-running)"] = time.monotonic() - started
    run(["docker", "exec", name, "mkdir", "-p", "/tmp/onboard"])
    for src, dst in ((wheels, "wheels"), (ROOT / "deploy", "deploy"), (ROOT / "systemd", "systemd")):
        run(["docker", "cp", str(src), f"{name}:/tmp/onboard/{dst}"])
    started = time.monotonic()
    run(["docker", "exec", name, "/tmp/onboard/deploy/onboard-vm.sh", "--install-only",
         "--wheels", "/tmp/onboard/wheels"], timeout=300)
    TIMINGS["VM package install (venv from wheels; during compose up)"] = time.monotonic() - started
    return name


APP_UNIT = """[Unit]
Description=demo app vmpay (svca's code: GET /pay calls http://svcb/notify)
[Service]
Environment=HTTP_PROXY=http://127.0.0.1:15001 NO_PROXY=
ExecStart=/opt/meshd/bin/python -m meshd.demo.apps svca --port 8080 --version vm --instance vmpay-1
DynamicUser=yes
Restart=on-failure
[Install]
WantedBy=multi-user.target
"""


def _onboard(stack: dict, vm: str) -> None:
    project: ComposeProject = stack["project"]
    run(["docker", "network", "connect", "--alias", "vmpay-vm", f"{project.name}_default", vm])
    meshd = project.container("meshd")
    token = run(["docker", "exec", meshd, "meshctl", "token", "create", "--service", "vmpay"])
    run(["docker", "cp", str(stack["tmp"] / "api-ca.pem"), f"{vm}:/tmp/onboard/meshd-ca.pem"])
    started = time.monotonic()
    args = ["--name", "vmpay", "--meshd", "https://meshd:15010", "--token", token.stdout.strip(),
            "--app-port", "8080", "--advertise", "vmpay-vm", "--labels", "version=vm",
            "--wheels", "/tmp/onboard/wheels", "--ca-file", "/tmp/onboard/meshd-ca.pem"]
    run(["docker", "exec", vm, "/tmp/onboard/deploy/onboard-vm.sh", *args], timeout=300)
    TIMINGS["VM onboarding (config, token, units, ready)"] = time.monotonic() - started
    unit = "cat > /etc/systemd/system/vmpay-app.service"
    run(["docker", "exec", "-i", vm, "sh", "-c", unit], input=APP_UNIT)
    run(["docker", "exec", vm, "systemctl", "enable", "--now", "vmpay-app.service"])


def _chain_ok(stack: dict, tries: int = 40) -> dict:
    """GET /pay on vmpay from inside svca's pod (its sidecar's outbound), until 200."""
    svca = stack["project"].container("svca-sidecar")
    probe = (
        "import urllib.request,sys; o=urllib.request.build_opener(urllib.request.ProxyHandler({})); "
        "r=urllib.request.Request('http://127.0.0.1:15001/pay', headers={'Host': 'vmpay'}); "
        "print(o.open(r, timeout=15).read().decode())"
    )
    out = None
    for _ in range(tries):
        out = run(["docker", "exec", svca, "python", "-c", probe], check=False)
        if out.returncode == 0:
            return json.loads(out.stdout)
        time.sleep(0.5)
    raise AssertionError(f"container -> VM -> container failed: {out.stderr[-1500:] if out else ''}")


def _restart_under_load(stack: dict, action: list[str], label: str) -> dict:
    svca = stack["project"].container("svca-sidecar")
    load = load_in(svca, "http://127.0.0.1:15001/pay", "vmpay", LOAD_SECONDS, 4, '"sent": true')
    time.sleep(3.0)
    started = time.monotonic()
    run(action, timeout=120)
    TIMINGS[f"{label}: restart command"] = time.monotonic() - started
    result = finish_load(load)
    TIMINGS[f"failed requests across {label}"] = result["failed"]
    TIMINGS[f"requests during {label} window"] = result["ok"] + result["failed"]
    return result


def test_hybrid_vm_onboarding_and_restarts(stack: dict) -> None:
    vm = stack["vm"].result(timeout=300)
    _onboard(stack, vm)
    # both units as installed on the VM pass systemd's own checks
    verify = run(
        [
            "docker",
            "exec",
            "-w",
            "/etc/systemd/system",
            vm,
            "systemd-analyze",
            "verify",
            "meshd.service",
            "mesh-sidecar@vmpay.service",
            "mesh-sidecar@vmpay.socket",
        ],
        check=False,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    show = run(
        [
            "docker",
            "exec",
            vm,
            "systemctl",
            "show",
            "mesh-sidecar@vmpay",
            "-p",
            "Type",
            "-p",
            "WatchdogUSec",
            "-p",
            "StatusText",
            "-p",
            "ActiveState",
        ]
    ).stdout
    assert "Type=notify" in show and "ActiveState=active" in show and "serving" in show, show
    assert "WatchdogUSec=20s" in show, show
    # meshd.service too, under the same hardening: READY once the API listens, then a clean stop
    run(["docker", "exec", vm, "useradd", "--system", "--home-dir", "/var/lib/meshd", "--shell",
         "/usr/sbin/nologin", "meshd"])
    run(["docker", "exec", vm, "systemctl", "start", "meshd"], timeout=120)  # returns on READY=1
    show = run(["docker", "exec", vm, "systemctl", "show", "meshd", "-p", "ActiveState", "-p",
                "StatusText"]).stdout
    assert "ActiveState=active" in show and "API on 0.0.0.0:15010" in show, show
    run(["docker", "exec", vm, "systemctl", "stop", "meshd"], timeout=60)
    state = run(["docker", "exec", vm, "systemctl", "is-failed", "meshd"], check=False).stdout.strip()
    assert state == "inactive", state  # stopped cleanly, not failed
    # the rule from the host: egress for svcb, all svcb traffic to v2, a 10 s connect timeout to vmpay
    meshd_cli(stack, "rule", "push", str(ROOT / "tests" / "e2e" / "rules" / "hybrid.toml"))
    time.sleep(1.0)
    body = _chain_ok(stack)  # container (svca pod) -> VM (vmpay) -> container (svcb v2) -> msgd
    assert body["instance"] == "vmpay-1" and body["downstream"]["version"] == "v2", body
    assert body["downstream"]["downstream"]["sent"] is True, body
    assert plaintext_refused(stack["project"].container("msgd"), "vmpay-vm", 15006)  # STRICT mTLS
    # SIGHUP reload: a label change is logged as needing a restart, the unit stays up
    run(
        [
            "docker",
            "exec",
            vm,
            "sed",
            "-i",
            's/version = "vm"/version = "vm2"/',
            "/etc/meshd/sidecar-vmpay.toml",
        ]
    )
    run(["docker", "exec", vm, "systemctl", "reload", "mesh-sidecar@vmpay"])
    journal = run(["docker", "exec", vm, "journalctl", "-u", "mesh-sidecar@vmpay", "--no-pager"]).stdout
    assert re.search(r"reload: labels changed but need a restart", journal), journal[-2000:]
    # 0 failed requests across a restart of the VM's sidecar unit (systemd holds its sockets)
    result = _restart_under_load(
        stack, ["docker", "exec", vm, "systemctl", "restart", "mesh-sidecar@vmpay"], "sidecar unit restart"
    )
    assert result["failed"] == 0 and result["ok"] > 20, result
    # meshd's container restarted: the data plane keeps its snapshot; only requests in flight
    # at that moment may fail (none touch meshd, so the target is 0)
    result = _restart_under_load(
        stack,
        ["docker", "restart", "-t", "10", stack["project"].container("meshd")],
        "meshd container restart",
    )
    assert result["failed"] <= 4 and result["ok"] > 20, result
    # VM reboot: the sidecar comes back with its cached certificate (no new join needed)
    run(["docker", "restart", "-t", "1", vm])
    started = time.monotonic()
    body = _chain_ok(stack, tries=120)
    TIMINGS["VM reboot -> traffic flows again"] = time.monotonic() - started
    assert body["downstream"]["version"] == "v2", body
    journal = run(["docker", "exec", vm, "journalctl", "-b", "-u", "mesh-sidecar@vmpay", "--no-pager"]).stdout
    assert "from disk cache" in journal, journal[-2000:]


def test_consul_profile_is_valid(compose: list[str]) -> None:
    """The `consul` profile (real hashicorp/consul image) cannot run here (no registry to pull
    from): Compose validates it, and meshd and the sidecars accept its configuration files."""
    from registry.config import load
    from sidecar.bootstrap import load as load_bootstrap

    env = {"COMPOSE_PROFILES": "consul", "MESH_REGISTRY": "consul"}
    out = run([*compose, "-f", str(ROOT / "compose" / "docker-compose.yml"), "--profile", "consul", "config"],
              env=env).stdout
    assert "image: hashicorp/consul:" in out and "/mesh/config/consul/meshd.toml" in out, out[-2000:]
    assert out.count("config/consul/") >= 4
    sources = load(ROOT / "compose" / "config" / "consul" / "meshd.toml").sources
    assert [type(s).__name__ for s in sources] == ["ConsulSource"]
    for f in (ROOT / "compose" / "config" / "consul").glob("svc*.toml"):
        assert load_bootstrap(f, env={"MESH_JOIN_TOKEN": "t"}).registry.kind == "consul"


def test_compose_down_leaves_nothing(stack: dict) -> None:
    project: ComposeProject = stack["project"]
    started = time.monotonic()
    project.down()
    TIMINGS["compose down -v"] = time.monotonic() - started
    assert project.leftovers() == {"containers": [], "networks": [], "volumes": []}
    label = f"label=mesh.e2e={project.name}"  # the VM and its network
    assert run(["docker", "ps", "-aq", "--filter", label]).stdout.split() == []
    assert run(["docker", "network", "ls", "-q", "--filter", label]).stdout.split() == []

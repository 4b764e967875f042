"""One meshd with every kind of source at once — built-in, Consul (API double), Eureka (API
double), Docker (this machine's dockerd), etcd (real etcd) and a static file — routing one
request to an instance from each, chosen by labels, and keeping a source's instances while it
is down.

Every backend is a real sidecar + demo app for service ``backend`` labelled ``reg=<source>``.
The sidecars of the Consul, Eureka, etcd and built-in instances register themselves through
their bootstrap's ``[registry]``; the Docker one is a container on a test network whose
``mesh.port`` forwards (TCP, in the container) to its sidecar's inbound listener on the host,
and the static one is listed in the static file. The sidecars that meshd must not learn about
twice register under an etcd prefix meshd does not watch.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from meshd.demo.harness import MeshHarness, Sidecar, free_port, wait_until
from tests.doubles.consul import ConsulDouble
from tests.doubles.eureka import EurekaDouble

pytestmark = pytest.mark.slow
SOURCES = ("builtin", "consul", "eureka", "docker", "etcd", "static")
FORWARDER = """
import socket, sys, threading
def pipe(a, b):
    try:
        while data := a.recv(65536):
            b.sendall(data)
    except OSError:
        pass
    for s in (a, b):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
srv = socket.create_server(("0.0.0.0", 15006))
while True:
    down, _ = srv.accept()
    up = socket.create_connection((sys.argv[1], int(sys.argv[2])))
    for a, b in ((down, up), (up, down)):
        threading.Thread(target=pipe, args=(a, b), daemon=True).start()
"""
RULES = "".join(
    ['[[destination]]\nname = "backend"\nhost = "backend"\n']
    + [f'[[destination.subsets]]\nname = "{s}"\nlabels = {{ reg = "{s}" }}\n' for s in SOURCES]
    + ['[[route]]\nname = "backend"\nhost = "backend"\n']
    + [f'[[route.http]]\nmatch = [{{ headers = {{ x-reg = {{ exact = "{s}" }} }} }}]\n'
       f'destinations = [{{ subset = "{s}" }}]\n' for s in SOURCES])


def add_backend(mesh: MeshHarness, reg: str, registry: str) -> Sidecar:
    """A demo app + sidecar labelled ``reg``, whose bootstrap ends with ``registry``."""
    name = f"b-{reg}"
    sc = Sidecar(name, "backend", free_port(), free_port(), free_port(), free_port(),
                 mesh.workdir / f"{name}.toml", {"reg": reg})
    sc.config.write_text(mesh._bootstrap(sc) + registry)
    sc.procs.append(mesh.start_app(f"{name}-app", "static", sc.app_port, version=reg, instance=name))
    sc.procs.append(mesh._spawn(name, ["sidecar.main", "run", "--config", str(sc.config),
                                       "--log-level", "warning"]))
    mesh.sidecars[name] = sc
    return sc


def meshd_toml(consul: ConsulDouble, eureka: EurekaDouble, etcd_url: str, network: str,
               static: Path) -> str:
    return (f'[[sources]]\nkind = "builtin"\n\n'
            f'[[sources]]\nkind = "consul"\naddress = "{consul.url}"\nwait = 30.0\n\n'
            f'[[sources]]\nkind = "eureka"\naddress = "{eureka.url}/eureka"\npoll = 0.5\n\n'
            f'[[sources]]\nkind = "docker"\nnetwork = "{network}"\n\n'
            f'[[sources]]\nkind = "etcd"\nendpoints = ["{etcd_url}"]\n\n'
            f'[[sources]]\nkind = "static"\npath = "{static}"\npoll_interval = 0.2\n')


def sources_of(mesh: MeshHarness) -> dict[str, str]:
    """``{sidecar name: source}`` of service backend (Consul ids are ``<node>/<service id>``)."""
    body = mesh.api("GET", "/v1/registry/services").json()
    return {i["instance_id"].rsplit("/", 1)[-1]: i["source"] for s in body["services"]
            if s["name"] == "backend" for i in s["instances"]}


async def test_one_meshd_routes_to_an_instance_of_every_source(docker_env, etcd, tmp_path: Path) -> None:
    d = docker_env
    mesh = MeshHarness(tmp_path, ttl=3.0, drain=0.2)
    static = tmp_path / "static.toml"
    with ConsulDouble() as consul, EurekaDouble(prefix="/eureka") as eureka:
        try:
            (tmp_path / "meshd.toml").write_text(meshd_toml(consul, eureka, etcd.url, d.network, static))
            mesh.start_meshd("", "--config", str(tmp_path / "meshd.toml"))
            unwatched = f'\n[registry]\nkind = "etcd"\nendpoints = ["{etcd.url}"]\nprefix = "/unwatched/"\n'
            add_backend(mesh, "builtin", "")
            add_backend(mesh, "consul", f'\n[registry]\nkind = "consul"\naddress = "{consul.url}"\n')
            add_backend(mesh, "eureka", f'\n[registry]\nkind = "eureka"\naddress = "{eureka.url}/eureka"\n')
            add_backend(mesh, "etcd", f'\n[registry]\nkind = "etcd"\nendpoints = ["{etcd.url}"]\n')
            b_docker = add_backend(mesh, "docker", unwatched)
            b_static = add_backend(mesh, "static", unwatched)
            static.write_text(f'[[instances]]\nservice = "backend"\ninstance_id = "b-static"\n'
                              f'address = "127.0.0.1"\nport = {b_static.inbound}\n'
                              f'labels = {{ reg = "static" }}\n')
            gateway = d.cli_sync("network", "inspect", "-f", "{{(index .IPAM.Config 0).Gateway}}", d.network)
            await d.run("b-docker", "-l", "mesh.service=backend", "-l", "mesh.port=15006",
                        "-l", "mesh.reg=docker", "-l", "mesh.instance_id=b-docker",
                        cmd=("python3", "-c", FORWARDER, gateway, str(b_docker.inbound)))
            client = mesh.add_service("client-1", "client", None)
            mesh.wait_ready()
            want = {f"b-{s}": s for s in SOURCES}
            wait_until(lambda: sources_of(mesh) == want, 30, "every backend from its own source")
            mesh.push_rules(RULES, "backend.toml")

            with httpx.Client(proxy=f"http://127.0.0.1:{client.outbound}", timeout=10) as c:
                def answers(reg: str) -> str:
                    resp = c.get("http://backend/", headers={"x-reg": reg})
                    return str(resp.json()["instance"]) if resp.status_code == 200 else resp.text

                for reg in SOURCES:
                    wait_until(lambda r=reg: answers(r) == f"b-{r}", 15, f"a request routed to b-{reg}")

                out = mesh.cli("services")
                assert out.returncode == 0, out.stderr
                for reg in SOURCES:
                    assert f"b-{reg}" in out.stdout
                metrics = mesh.api("GET", "/metrics").text
                for reg in SOURCES:  # the built-in registry also holds the client
                    count = 2.0 if reg == "builtin" else 1.0
                    assert f'meshd_registry_instances{{source="{reg}"}} {count}' in metrics, metrics

                consul.stop()  # Consul down: its instance stays (stale) and keeps serving
                wait_until(lambda: 'meshd_registry_source_stale{source="consul"} 1.0'
                           in mesh.api("GET", "/metrics").text, 20, "consul reported stale")
                assert sources_of(mesh) == want and answers("consul") == "b-consul"
                out = mesh.cli("services")
                assert "stale" in out.stdout and "consul" in out.stdout
                consul.start()
                wait_until(lambda: 'meshd_registry_source_stale{source="consul"} 0.0'
                           in mesh.api("GET", "/metrics").text, 30, "consul resynced")
                assert answers("consul") == "b-consul"
        finally:
            mesh.close()

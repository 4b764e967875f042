"""registry.docker.convert on Engine 1.41 JSON recorded from this machine's dockerd."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from registry.docker.convert import convert, event_action
from registry.docker.source import daemon_ns, since_param

FIX = Path(__file__).parent.parent / "fixtures" / "docker"


def load(name: str) -> dict:
    return json.loads((FIX / name).read_text())


def test_mesh_labels_win_over_compose() -> None:
    attrs = load("inspect_mesh_labels.json")  # mesh.service=svca, mesh.port=8080, healthy
    insts, reason = convert(attrs, network="fixnet", source="dock")
    assert reason == ""
    [i] = insts
    assert (i.service, i.port, i.address, i.source) == ("svca", 8080, "172.18.0.2", "dock")
    assert i.instance_id == "fix1"
    assert i.labels == {"version": "v2", "a": "b"}  # mesh.version; SERVICE_TAGS a=b from env


def test_registrator_env_and_labels_per_port() -> None:
    attrs = load("inspect_registrator.json")  # SERVICE_NAME=legacy, SERVICE_8080_NAME=legacy-http
    attrs["State"]["Health"]["Status"] = "healthy"
    insts, reason = convert(attrs)
    assert reason == ""
    [i] = insts  # only the named port is published
    assert (i.service, i.port, i.address) == ("legacy-http", 8080, "172.19.0.2")
    assert i.labels == {"v": "1", "region": "eu"}  # tags k=v; SERVICE_REGION attribute


def test_registrator_several_exposed_ports_without_names() -> None:
    attrs = load("inspect_registrator.json")
    attrs["State"]["Health"]["Status"] = "healthy"
    attrs["Config"]["Env"] = []
    insts, _ = convert(attrs)
    assert [(i.service, i.port, i.instance_id) for i in insts] == [
        ("legacy-8080", 8080, "fix2:8080"), ("legacy-9090", 9090, "fix2:9090")]


@pytest.mark.parametrize(("change", "reason"), [
    (lambda a: a["State"]["Health"].update(Status="unhealthy"), "health unhealthy"),
    (lambda a: a["State"]["Health"].update(Status="starting"), "health starting"),
    (lambda a: a["State"].update(Running=False, Status="exited"), "not running (exited)"),
    (lambda a: a["State"].update(Paused=True), "not running"),
    (lambda a: a["Config"]["Labels"].update({"mesh.enable": "false"}), "disabled by label"),
    (lambda a: a["Config"]["Labels"].clear(), "no service name"),
    (lambda a: a["Config"]["Labels"].update({"mesh.network": "other"}), "not on network 'other'"),
    (lambda a: a["NetworkSettings"]["Networks"]["fixnet"].update(IPAddress=""), "no IP address"),
    (lambda a: a["Config"]["Labels"].update({"mesh.protocol": "udp"}), "bad mesh.protocol 'udp'"),
    (lambda a: a["Config"]["Labels"].update({"mesh.port": "http"}), "bad port 'http'"),
])
def test_left_out_with_a_reason(change, reason) -> None:
    attrs = copy.deepcopy(load("inspect_mesh_labels.json"))
    change(attrs)
    insts, why = convert(attrs)
    assert insts == [] and why.startswith(reason)


def test_compose_service_and_instance_id() -> None:
    attrs = load("inspect_mesh_labels.json")
    labels = attrs["Config"]["Labels"]
    for k in ("mesh.service", "mesh.version"):
        del labels[k]
    labels.update({"com.docker.compose.service": "web", "com.docker.compose.project": "shop",
                   "com.docker.compose.container-number": "2", "mesh.protocol": "http2"})
    [i] = convert(attrs)[0]
    assert (i.service, i.instance_id, i.protocol, i.port) == ("web", "shop-web-2", "http2", 8080)


def test_events() -> None:
    events = [json.loads(line) for line in (FIX / "events.jsonl").read_text().splitlines()]
    got = [event_action(e)[0] for e in events]
    assert got == ["refresh", "refresh", "refresh", "remove", "refresh", "remove", "remove"]
    cid = "28cc410eb8db5aeb5eb7a279fce2ff7166da992a08eb2b4539ce9a925b3bd8a1"
    assert {event_action(e)[1] for e in events} == {cid}
    assert event_action({"Type": "container", "Action": "exec_start: sh", "Actor": {"ID": "x"}}) == ("", "x")


def test_since_param() -> None:
    assert daemon_ns("2026-11-22T13:23:31.002882181Z") == 1795353811_002882181
    assert since_param("2026-11-22T13:23:31.002882181Z") == "1795353810.002882181"
    assert since_param("2026-11-22T14:23:31+01:00") == "1795353810.000000000"
    with pytest.raises(ValueError):
        since_param("yesterday")

"""meshd's API over HTTPS (``--tls-cert/--tls-key``): the CLI verifies it with MESHD_CACERT,
sidecars with ``meshd_ca_file``; plain HTTP to the TLS port gets nothing."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trustme

from meshd.demo.harness import MeshHarness, free_port, wait_until

pytestmark = pytest.mark.slow


def test_api_over_tls_for_cli_and_sidecars(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    port = free_port()
    addr = f"https://127.0.0.1:{port}"
    meshd = subprocess.Popen(
        [sys.executable, "-m", "meshd.cli.main", "serve", "--listen", f"127.0.0.1:{port}",
         "--data-dir", str(tmp_path / "data"), "--tls-cert", str(tmp_path / "cert.pem"),
         "--tls-key", str(tmp_path / "key.pem"), "--log-level", "warning"])
    try:
        verify = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        wait_until(lambda: httpx.get(f"{addr}/healthz", verify=verify).status_code == 200, 20,
                   "meshd over TLS")
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=3)
        env = {**os.environ, "MESHD_ADDR": addr, "MESHD_CACERT": str(tmp_path / "ca.pem")}
        out = subprocess.run([sys.executable, "-m", "meshd.cli.main", "services"], env=env,
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        untrusted = subprocess.run([sys.executable, "-m", "meshd.cli.main", "services"],
                                   env={**env, "MESHD_CACERT": ""}, capture_output=True,
                                   text=True, timeout=30)
        assert untrusted.returncode == 1 and "cannot reach meshd" in untrusted.stderr
        _sidecar_registers_over_tls(tmp_path, addr, str(tmp_path / "ca.pem"))
    finally:
        meshd.terminate()
        meshd.wait(timeout=10)


def _sidecar_registers_over_tls(tmp_path: Path, addr: str, ca_file: str) -> None:
    h = MeshHarness(tmp_path / "mesh")
    (tmp_path / "mesh").mkdir()
    h.meshd_addr = addr
    h.http = httpx.Client(timeout=10.0, verify=ssl.create_default_context(cafile=ca_file))
    try:
        sc = h.add_service("echo-1", "echo", "msgd")
        sc.config.write_text(sc.config.read_text() + f'meshd_ca_file = "{ca_file}"\n')
        h.restart_sidecar("echo-1")
        h.wait_ready(["echo-1"])
        services = h.api("GET", "/v1/registry/services").json()["services"]
        assert [i["instance_id"] for s in services for i in s["instances"]] == ["echo-1"]
    finally:
        h.close()

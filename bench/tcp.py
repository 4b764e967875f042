"""TCP bulk throughput (MB/s): direct, through one sidecar, through two sidecars with mTLS.

Same run, same processes, loopback only::

    .venv/bin/python bench/tcp.py [--mib 512] [--repeat 3] [--json FILE]

* **sink**: a separate process (``bench/tcp.py sink``, plain blocking sockets) that reads each
  connection to EOF, counts the bytes and answers the count — so the sender's and the sink's
  CPU never share an interpreter lock.
* **direct**: sender -> sink.
* **sidecar x1**: sender -> the sink sidecar's inbound listener in plain text (PERMISSIVE;
  ``app_protocol = "tcp"``) -> sink: one proxy hop, the byte pump alone.
* **sidecar x2**: sender -> the client sidecar's localhost upstream port (``[[upstreams]]``,
  the service declared ``tcp`` through the registry) -> mTLS (ALPN ``meshd-tcp``) -> sink
  sidecar inbound -> sink: the path of a database client in the mesh.

Each transfer sends ``--mib`` MiB of zeros in 1 MiB writes, half-closes, and waits for the
sink's count (which must match); MB/s = bytes / (first write .. count received). Targets are
interleaved per repetition; the median is reported with the ratio to direct.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from meshd.demo.harness import MeshHarness, Sidecar, free_port, wait_until  # noqa: E402

WRITE = 1 << 20  # bytes per sendall


def sink(port: int) -> None:
    """Serve forever: read each connection to EOF, answer the byte count."""
    server = socket.create_server(("127.0.0.1", port), backlog=64)

    def serve(conn: socket.socket) -> None:
        with conn:
            count, buf = 0, bytearray(WRITE)
            while n := conn.recv_into(buf):
                count += n
            conn.sendall(str(count).encode())

    while True:
        conn, _ = server.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def transfer(port: int, total: int) -> float:
    """Seconds to send ``total`` bytes to ``port`` and get the sink's matching count."""
    zeros = memoryview(bytes(WRITE))
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sent = 0
        while sent < total:
            n = min(WRITE, total - sent)
            sock.sendall(zeros[:n])
            sent += n
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while data := sock.recv(64):
            answer += data
    seconds = time.perf_counter() - start
    if int(answer or b"-1") != total:
        raise RuntimeError(f"sink counted {answer!r}, sent {total}")
    return seconds


class _Mesh(MeshHarness):
    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir, ttl=3.0, drain=0.2)
        self.extra: dict[str, str] = {}

    def _bootstrap(self, sc: Sidecar) -> str:
        return super()._bootstrap(sc) + self.extra.get(sc.name, "")


def run(mib: int, repeat: int) -> dict[str, object]:
    total = mib << 20
    with tempfile.TemporaryDirectory(prefix="bench-tcp-") as tmp:
        mesh = _Mesh(Path(tmp))
        try:
            mesh.start_meshd()
            local = free_port()
            mesh.extra["sink-1"] = 'app_protocol = "tcp"\n'
            sink_sc = mesh.add_service("sink-1", "sink", None)
            mesh.procs.append(mesh._spawn("sink-app", ["bench.tcp", "sink", "--port",
                                                       str(sink_sc.app_port)]))
            mesh.extra["client-1"] = f'[[upstreams]]\nservice = "sink"\nlocal_port = {local}\n'
            mesh.add_service("client-1", "client", None)
            mesh.wait_ready()
            mesh.wait_synced()
            mesh.wait_app("sink-1")
            wait_until(lambda: mesh.admin_json("client-1", "/certs")["identity"]["serial"] != "", 15,
                       "client certificate")
            targets = {"direct": sink_sc.app_port, "sidecar x1": sink_sc.inbound,
                       "sidecar x2 (mTLS)": local}
            transfer(local, 1 << 20)  # warm-up: the path works, connections and caches are made
            runs: dict[str, list[float]] = {t: [] for t in targets}
            for i in range(repeat):
                order = list(targets)[i % len(targets):] + list(targets)[:i % len(targets)]
                for name in order:
                    runs[name].append(total / 1e6 / transfer(targets[name], total))
        finally:
            mesh.close()
    direct = statistics.median(runs["direct"])
    return {"mib": mib, "repeat": repeat, "mb_per_s": {t: statistics.median(v) for t, v in runs.items()},
            "ratio_to_direct": {t: statistics.median(v) / direct for t, v in runs.items()},
            "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd")
    s = sub.add_parser("sink")
    s.add_argument("--port", type=int, required=True)
    parser.add_argument("--mib", type=int, default=512, help="MiB per transfer")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    if args.cmd == "sink":
        sink(args.port)
        return
    result = run(args.mib, args.repeat)
    print(f"TCP bulk, {args.mib} MiB per transfer, median of {args.repeat}:")
    print(f"{'target':<20}{'MB/s':>10}{'vs direct':>12}")
    for name, rate in result["mb_per_s"].items():  # type: ignore[union-attr]
        print(f"{name:<20}{rate:>10.0f}{result['ratio_to_direct'][name]:>12.2f}")  # type: ignore[index]
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

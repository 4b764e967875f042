"""The demo's applications: plain stdlib HTTP servers that know nothing about the mesh.

``python -m meshd.demo.apps svca|svcb|msgd --port P [--version v1] [--instance ID]``

* ``svca``  ``GET /pay``    -> calls ``http://svcb/notify``
* ``svcb``  ``GET /notify`` -> calls ``http://msgd.example/send`` (outside the mesh)
* ``msgd``  ``GET /send``   -> ``{"sent": true}``
* ``static`` any path       -> ``--status`` after ``--delay`` seconds (a test upstream)

Outgoing calls use ``urllib`` with the standard ``HTTP_PROXY`` variable, which the demo points
at the app's sidecar outbound port — the "no code change" path. Apps forward the tracing and
``user-agent`` headers they received, as Istio asks applications to do. A failed downstream
call becomes a 502 with the reason in the JSON body.
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PROPAGATE = ("user-agent", "x-request-id", "traceparent", "tracestate", "b3", "x-b3-traceid",
             "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags")
CALL_TIMEOUT = 10.0  # seconds
CALLS = {"svca": ("/pay", "http://svcb/notify"), "svcb": ("/notify", "http://msgd.example/send"),
         "msgd": ("/send", None), "static": ("*", None)}


def call(url: str, headers: dict[str, str]) -> tuple[int, object]:
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=CALL_TIMEOUT) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        body = exc.read().decode("utf-8", "replace").strip()
        try:
            return exc.code, json.loads(body)
        except ValueError:
            return exc.code, body
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return 599, str(exc)


def make_handler(name: str, version: str, instance: str, status: int = 200,
                 delay: float = 0.0) -> type[BaseHTTPRequestHandler]:
    """``static`` answers every path with ``status`` after ``delay`` seconds (test upstream)."""
    path, downstream = CALLS[name]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # head and body are separate writes: avoid 40 ms stalls
        wbufsize = 64 * 1024            # and buffer them into one write, flushed per request

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def _send(self, status: int, doc: object) -> None:
            body = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            self.rfile.read(length)
            self.do_GET()

        def do_GET(self) -> None:
            if name == "static":
                time.sleep(delay)
                self._send(status, {"service": name, "version": version, "instance": instance,
                                    "path": self.path, "headers": dict(self.headers.items())})
                return
            if self.path.split("?", 1)[0] != path:
                self._send(404, {"error": f"{name} serves {path}"})
                return
            doc: dict[str, object] = {"service": name, "version": version, "instance": instance}
            if downstream is None:
                doc["sent"] = True
                self._send(200, doc)
                return
            fwd = {k: v for k, v in self.headers.items() if k.lower() in PROPAGATE}
            code, answer = call(downstream, fwd)
            doc["downstream"] = answer
            doc["downstream_status"] = code
            self._send(200 if code == 200 else 502, doc)

    return Handler


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # listen backlog; socketserver's 5 drops connections in a burst
    daemon_threads = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("name", choices=sorted(CALLS))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--version", default="v1")
    parser.add_argument("--instance", default="")
    parser.add_argument("--status", type=int, default=200, help="static: status to answer")
    parser.add_argument("--delay", type=float, default=0.0, help="static: seconds before answering")
    args = parser.parse_args()
    handler = make_handler(args.name, args.version, args.instance or f"{args.name}-{args.port}",
                           args.status, args.delay)
    server = _Server((args.host, args.port), handler)
    server.serve_forever()


if __name__ == "__main__":
    main()

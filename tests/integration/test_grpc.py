"""gRPC end to end with the real ``grpcio`` client and server through TWO sidecars (mTLS
STRICT, HTTP/2 between the sidecars chosen by ALPN): unary, server/client/bidi streaming,
status codes and trailing metadata intact, ``grpc-timeout`` as the deadline, an
``unavailable`` upstream retried per the rule, and a gRPC fault abort. Generic handlers with
bytes (no protobuf codegen)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import httpx
import pytest

from meshd.demo.harness import MeshHarness

pytestmark = pytest.mark.slow
SERVICE = "helloworld.Greeter"


class Greeter:
    """The app: counts calls; ``flaky`` answers UNAVAILABLE to its first ``fail_first`` calls."""

    def __init__(self, fail_first: int = 0) -> None:
        self.calls = 0
        self.fail_first = fail_first
        self.lock = threading.Lock()

    def say_hello(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        with self.lock:
            self.calls += 1
            n = self.calls
        if n <= self.fail_first:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"warming up ({n})")
        if request == b"missing":
            context.set_trailing_metadata((("x-reason", "not-here"),))
            context.abort(grpc.StatusCode.NOT_FOUND, "no greeting for missing")
        if request == b"slow":
            threading.Event().wait(2.0)
        context.set_trailing_metadata((("x-served-by", "greeter"),))
        return b"hello " + request

    @staticmethod
    def spray(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        count, _, size = request.partition(b":")
        for i in range(int(count)):
            yield b"part-%d" % i + b"." * int(size or 0)

    @staticmethod
    def collect(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        return b"+".join(requests)

    @staticmethod
    def chat(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for message in requests:
            yield b"echo:" + message
        context.set_trailing_metadata((("x-chat-end", "bye"),))

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(SERVICE, {
            "SayHello": grpc.unary_unary_rpc_method_handler(self.say_hello),
            "Spray": grpc.unary_stream_rpc_method_handler(self.spray),
            "Collect": grpc.stream_unary_rpc_method_handler(self.collect),
            "Chat": grpc.stream_stream_rpc_method_handler(self.chat),
        })


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[MeshHarness]:
    h = MeshHarness(tmp_path, ttl=2.0, drain=0.2)
    servers: list[grpc.Server] = []
    h.grpc_servers = servers  # type: ignore[attr-defined]
    try:
        yield h
    finally:
        for server in servers:
            server.stop(0)
        h.close()


def _serve(mesh: MeshHarness, name: str, service: str, greeter: Greeter) -> None:
    sc = mesh.add_service(name, service, None, {"version": "v1"}, mtls_mode="STRICT")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((greeter.handler(),))
    server.add_insecure_port(f"127.0.0.1:{sc.app_port}")
    server.start()
    mesh.grpc_servers.append(server)  # type: ignore[attr-defined]


def _start(mesh: MeshHarness, **greeters: Greeter) -> grpc.Channel:
    mesh.start_meshd()
    mesh.add_service("client-1", "client", None, {"version": "v1"})
    for service, greeter in greeters.items():
        _serve(mesh, f"{service}-1", service, greeter)
    mesh.wait_ready()
    mesh.wait_synced()
    mesh.wait_certs()
    return _channel(mesh, next(iter(greeters)))


def _channel(mesh: MeshHarness, authority: str) -> grpc.Channel:
    outbound = mesh.sidecars["client-1"].outbound
    return grpc.insecure_channel(f"127.0.0.1:{outbound}", options=[
        ("grpc.default_authority", authority), ("grpc.enable_http_proxy", 0),
        ("grpc.enable_retries", 0)])


def _method(channel: grpc.Channel, kind: str, name: str) -> grpc.UnaryUnaryMultiCallable:
    return getattr(channel, kind)(f"/{SERVICE}/{name}")


def test_unary_and_streaming_through_two_sidecars_with_mtls(mesh: MeshHarness) -> None:
    greeter = Greeter()
    with _start(mesh, greeter=greeter) as channel:
        hello = _method(channel, "unary_unary", "SayHello")
        replies = [hello.with_call(b"mesh-%d" % i, timeout=10) for i in range(20)]
        assert [r for r, _ in replies] == [b"hello mesh-%d" % i for i in range(20)]
        assert all(("x-served-by", "greeter") in call.trailing_metadata() for _, call in replies)
        assert all(call.code() == grpc.StatusCode.OK for _, call in replies)
        spray = _method(channel, "unary_stream", "Spray")
        assert list(spray(b"50", timeout=10)) == [b"part-%d" % i for i in range(50)]
        big = list(spray(b"40:100000", timeout=20))  # 4 MB: many stream windows, both hops
        assert big == [b"part-%d" % i + b"." * 100000 for i in range(40)]
        collect = _method(channel, "stream_unary", "Collect")
        assert collect(iter([b"a", b"b", b"c"] * 100), timeout=10) == b"+".join([b"a", b"b", b"c"] * 100)
        chunks = [bytes([i]) * 70_000 for i in range(30)]  # 2.1 MB upstream, client streaming
        assert collect(iter(chunks), timeout=20) == b"+".join(chunks)
        chat = _method(channel, "stream_stream", "Chat")
        call = chat(iter([b"m%d" % i for i in range(200)]), timeout=10)
        assert list(call) == [b"echo:m%d" % i for i in range(200)]
        assert ("x-chat-end", "bye") in call.trailing_metadata()
        assert call.code() == grpc.StatusCode.OK
    metrics = httpx.get(f"http://127.0.0.1:{mesh.sidecars['greeter-1'].admin}/metrics").text
    assert 'grpc_response_status="0"' in metrics and 'request_protocol="grpc"' in metrics
    certs = mesh.admin_json("greeter-1", "/certs")["tls"]
    assert certs["handshakes"] >= 1 and certs["plaintext_refused"] == 0


def test_status_codes_trailers_and_deadline(mesh: MeshHarness) -> None:
    with _start(mesh, greeter=Greeter()) as channel:
        hello = _method(channel, "unary_unary", "SayHello")
        with pytest.raises(grpc.RpcError) as err:
            hello(b"missing", timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert err.value.details() == "no greeting for missing"
        assert ("x-reason", "not-here") in err.value.trailing_metadata()
        with pytest.raises(grpc.RpcError) as err:  # grpc-timeout 300 ms < the 2 s handler
            hello(b"slow", timeout=0.3)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert hello(b"again", timeout=10) == b"hello again"  # the connection survived
        outbound = mesh.sidecars["client-1"].outbound
        with httpx.Client(http1=False, http2=True, timeout=10, trust_env=False) as raw:  # no client deadline
            resp = raw.post(f"http://127.0.0.1:{outbound}/{SERVICE}/SayHello",
                            content=b"\x00\x00\x00\x00\x04slow", headers={
                                "host": "greeter", "content-type": "application/grpc", "te": "trailers",
                                "grpc-timeout": "200m"})
        assert resp.status_code == 200 and resp.headers["grpc-status"] == "4"  # DEADLINE_EXCEEDED
        assert resp.headers["x-meshd-response-flags"] == "UT"  # the sidecar's deadline fired
        unknown = _method(channel, "unary_unary", "NoSuchMethod")
        with pytest.raises(grpc.RpcError) as err:
            unknown(b"x", timeout=10)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


RETRY_RULES = """\
[[route]]
name = "flaky"
host = "flaky"
[[route.http]]
destinations = [{}]
retries = { attempts = 3, retry_on = "unavailable", backoff = "5ms" }
[[route]]
name = "broken"
host = "broken"
[[route.http]]
destinations = [{}]
fault = { abort = { grpc_status = "RESOURCE_EXHAUSTED" } }
"""


def test_unavailable_is_retried_per_rule_and_grpc_fault_abort(mesh: MeshHarness) -> None:
    flaky = Greeter(fail_first=2)
    with _start(mesh, flaky=flaky, broken=Greeter()) as channel:
        mesh.push_rules(RETRY_RULES)
        hello = _method(channel, "unary_unary", "SayHello")
        assert hello(b"retry", timeout=10) == b"hello retry"
        assert flaky.calls == 3  # two UNAVAILABLE answers retried, the third call served
        flaky.fail_first, flaky.calls = 10, 0
        with pytest.raises(grpc.RpcError) as err:  # attempts exhausted: the last status passes
            hello(b"retry", timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and flaky.calls == 4
    with _channel(mesh, "broken") as channel:
        with pytest.raises(grpc.RpcError) as err:
            _method(channel, "unary_unary", "SayHello")(b"x", timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert err.value.details() == "fault filter abort"

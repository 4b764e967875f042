"""Forward one request to a cluster: circuit breaker, endpoint pick, attempts, retries, timeouts.

Semantics (Envoy router / Istio HTTPRoute):

* the route ``timeout`` (default ``DEFAULT_ROUTE_TIMEOUT``, Envoy's 15 s) bounds the time until
  the response head, over all attempts and back-offs -> 504 ``UT``; each attempt is bounded by
  ``per_try_timeout``; a timed-out attempt is cancelled (its connection closed);
* admission: ``CircuitBreaker.admit`` -> go / queue (wait for a release) / overflow (503 ``UO``);
* retries follow ``RetryPolicy`` (``sidecar.core.retry``): only replayable bodies, idempotent
  methods unless configured, within ``max_retries`` and the retry budget, with jittered
  exponential back-off; without a policy, connect failures are retried ``DEFAULT_ATTEMPTS`` times
  (Istio's default policy: attempts 2, retry_on connect-failure,refused-stream);
* a peer sidecar's 503 with flag ``UF`` (its app refused the connection) counts as a connect
  failure: nothing was processed;
* every outcome feeds outlier detection.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import trio

from meshd.errors import (
    MeshError,
    NoHealthyUpstream,
    UpstreamConnectError,
    UpstreamError,
    UpstreamResetError,
    UpstreamTimeoutError,
)
from meshd.snapshot.model import Endpoint, RetryPolicy
from sidecar.core.balancer import Key, key
from sidecar.core.retry import Failure, backoff, may_retry_request, retriable
from sidecar.http.bodies import RecordingBody
from sidecar.http.client import UpstreamPool
from sidecar.http.messages import Body, RequestHead, Response, on_close
from sidecar.http2.grpc import grpc_status_of
from sidecar.proxy.clusters import ClusterRuntime

DEFAULT_ROUTE_TIMEOUT = 15.0  # seconds; Envoy route timeout default
REPLAY_LIMIT = 64 * 1024  # bytes of a streamed body kept for a retry (outbound REPLAY_BUFFER_BYTES)
DEFAULT_RETRY = RetryPolicy(attempts=2, retry_on=("connect-failure", "refused-stream"))  # Istio


class Overflow(UpstreamError):
    response_flag = "UO"
    status = 503


@dataclass
class Attempt:
    endpoint: Endpoint | None = None
    response: Response | None = None
    failure: Failure | None = None
    error: MeshError | None = None


def _peer_refused(resp: Response) -> bool:
    return resp.head.status == 503 and resp.head.header("x-meshd-response-flags") == "UF"


class Forwarder:
    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.rand = random.Random()

    async def forward(self, rt: ClusterRuntime, head: RequestHead, body: Body | bytes,
                      *, timeout: float | None, retry: RetryPolicy | None,  # noqa: ASYNC109
                      hash_key: int | None) -> tuple[Response, Endpoint]:
        """Response and the endpoint that gave it; raises a MeshError with status and flag."""
        with trio.move_on_after(timeout or DEFAULT_ROUTE_TIMEOUT):
            return await self._attempts(rt, head, body, retry or DEFAULT_RETRY, hash_key)
        raise UpstreamTimeoutError(f"no response from {rt.cluster.name} within "
                                   f"{timeout or DEFAULT_ROUTE_TIMEOUT:g} s")

    async def _attempts(self, rt: ClusterRuntime, head: RequestHead, body: Body | bytes,
                        policy: RetryPolicy, hash_key: int | None) -> tuple[Response, Endpoint]:
        tried: set[Key] = set()
        retrying = False
        for n in range(policy.attempts + 1):
            if n:
                await trio.sleep(backoff(n, policy.backoff_base, lambda hi: self.rand.uniform(0, hi)))
            try:
                result = await self._one(rt, head, body, policy, hash_key, tried)
            finally:
                if retrying:
                    rt.breaker.finish_retry()
            if result.response is not None and result.failure is None and not retriable_outcome(
                    policy, result):
                return result.response, result.endpoint  # type: ignore[return-value]
            last = result
            sent = result.failure != "connect-failure"
            replayable = (isinstance(body, bytes | bytearray) or not sent
                          or (isinstance(body, RecordingBody) and body.replayable))
            if (n == policy.attempts or (result.error is not None and result.failure is None)
                    or not (may_retry_request(policy, head.method, replayable, request_sent=sent)
                            or (replayable and _grpc_status(result) is not None))
                    or not retriable_outcome(policy, result)
                    or not rt.breaker.try_start_retry()):
                break
            retrying = True
            if result.response is not None:
                await _discard(result.response)
            if isinstance(body, RecordingBody):  # what the attempt read, then the rest
                body = RecordingBody(body.replay(), REPLAY_LIMIT)
        return _outcome(last)

    async def _one(self, rt: ClusterRuntime, head: RequestHead, body: Body | bytes,
                   policy: RetryPolicy, hash_key: int | None, tried: set[Key]) -> Attempt:
        await self._admit(rt)
        now = trio.current_time()
        ep = rt.pick(now, hash_key, tried)
        if ep is None:
            rt.breaker.finish_request()
            rt.release()
            return Attempt(error=NoHealthyUpstream(f"no healthy endpoint in {rt.cluster.name}"))
        tried.add(key(ep))
        rt.picker.started(ep)
        try:
            attempt = await self._send(rt, ep, head, body, policy)
        except BaseException:  # cancelled by the route timeout: give the slot back
            self._done(rt, ep)
            raise
        if attempt.response is None or attempt.failure is not None:
            self._done(rt, ep)
        else:
            attempt.response = on_close(attempt.response, lambda: self._done(rt, ep))
        return attempt

    async def _admit(self, rt: ClusterRuntime) -> None:
        """Envoy pool admission: go, or queue behind earlier waiters, or overflow (503 UO)."""
        queued = False
        try:
            while True:
                verdict = rt.breaker.admit(queued=queued)
                if verdict == "go":
                    if queued:
                        rt.breaker.finish_pending()
                        queued = False
                    rt.breaker.start_request()
                    return
                if verdict == "overflow":
                    raise Overflow(f"circuit breaker open for {rt.cluster.name}")
                if not queued:
                    rt.breaker.start_pending()
                    queued = True
                await rt.wait_released()
        except BaseException:
            if queued:
                rt.breaker.finish_pending()
            raise

    async def _send(self, rt: ClusterRuntime, ep: Endpoint, head: RequestHead,
                    body: Body | bytes, policy: RetryPolicy) -> Attempt:
        attempt = Attempt(endpoint=ep)
        per_try = policy.per_try_timeout or float("inf")
        try:
            with trio.move_on_after(per_try) as scope:
                c = rt.cluster
                attempt.response = await self.pool.request(
                    ep.address, ep.port, head, body, connect_timeout=c.connect_timeout,
                    idle_timeout=c.idle_timeout, max_age=c.max_connection_duration)
            if scope.cancelled_caught:
                attempt.failure, attempt.error = "timeout", UpstreamTimeoutError(
                    f"{_name(ep)}: no response within per_try_timeout {per_try:g} s")
        except UpstreamConnectError as exc:
            attempt.failure, attempt.error = "connect-failure", exc
        except UpstreamResetError as exc:
            attempt.failure, attempt.error = "reset", exc
        now = trio.current_time()
        if attempt.response is not None and _peer_refused(attempt.response):
            await _discard(attempt.response)
            attempt.response = None
            attempt.failure = "connect-failure"
            attempt.error = UpstreamConnectError(f"{_name(ep)}: its app refused the connection")
        if attempt.failure is not None:
            rt.record(ep, now, local_failure=True)
        else:
            rt.record(ep, now, status=attempt.response.head.status)  # type: ignore[union-attr]
        return attempt

    @staticmethod
    def _done(rt: ClusterRuntime, ep: Endpoint) -> None:
        rt.picker.finished(ep)
        rt.breaker.finish_request()
        rt.release()


def retriable_outcome(policy: RetryPolicy, result: Attempt) -> bool:
    if result.failure is not None:
        return retriable(policy, failure=result.failure)
    return result.response is not None and retriable(
        policy, status=result.response.head.status, grpc_status=_grpc_status(result))


def _grpc_status(result: Attempt) -> int | None:
    """``grpc-status`` of a trailers-only gRPC answer (Envoy's x-envoy-retry-grpc-on input).
    A gRPC condition the rule names is an explicit opt-in: it retries any method (gRPC is POST)."""
    return grpc_status_of(result.response.head.headers) if result.response is not None else None


def _name(ep: Endpoint) -> str:
    return ep.instance_id or f"{ep.address}:{ep.port}"


def _outcome(last: Attempt) -> tuple[Response, Endpoint]:
    if last.response is not None and last.failure is None:
        return last.response, last.endpoint  # type: ignore[return-value]
    raise last.error or NoHealthyUpstream("no endpoint answered")


async def _discard(resp: Response) -> None:
    if resp.aclose is not None:
        with trio.CancelScope(shield=True):
            await resp.aclose()

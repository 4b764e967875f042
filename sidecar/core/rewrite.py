"""Request/response manipulation, fault and mirror decisions — pure code (Istio HTTPRoute).

* ``apply_header_ops(headers, ops)``: ``set`` replaces every value of a name, ``add`` appends,
  ``remove`` deletes (Istio ``headers.request|response``); order of untouched headers is kept.
* ``rewrite_path(path, matched_prefix, new_prefix)``: Istio ``rewrite.uri`` — the matched path
  prefix is replaced, the rest and the query string are kept.
* ``redirect_location(redirect, scheme, authority, path)``: the ``Location`` of a redirect route.
* ``fault_decision(policy, draw)``: which of delay/abort apply to one request; ``draw()`` returns
  a float in [0, 100) and is called once per configured fault (Envoy fault filter percentages).
* ``mirror_decision(policy, draw)``: whether this request is mirrored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from meshd.snapshot.model import FaultPolicy, HeaderOps, MirrorPolicy, Redirect

Headers = tuple[tuple[str, str], ...]


def apply_header_ops(headers: Sequence[tuple[str, str]], ops: HeaderOps | None) -> Headers:
    if ops is None:
        return tuple(headers)
    drop = set(ops.remove) | {k for k, _ in ops.set}
    out = [(k, v) for k, v in headers if k not in drop]
    out += list(ops.set)
    out += list(ops.add)
    return tuple(out)


def rewrite_path(path: str, matched_prefix: str | None, new_prefix: str) -> str:
    """``("/api/v1/x?q=1", "/api/v1", "/v2")`` -> ``"/v2/x?q=1"``; unmatched paths unchanged."""
    prefix = matched_prefix or "/"
    if not path.startswith(prefix):
        return path
    rest = path[len(prefix):]
    if new_prefix.endswith("/") and rest.startswith("/"):
        rest = rest[1:]
    result = new_prefix + rest
    return result if result.startswith("/") else "/" + result


def redirect_location(redirect: Redirect, scheme: str, authority: str, path: str) -> str:
    """Absolute Location: replaced path (query dropped when a path is set) and/or authority."""
    target_path = redirect.path if redirect.path is not None else path
    return f"{scheme}://{redirect.authority or authority}{target_path}"


@dataclass(frozen=True, slots=True)
class FaultDecision:
    delay: float | None      # seconds to wait before forwarding
    abort_status: int | None  # answer this status instead of forwarding
    abort_grpc_status: int | None = None  # answer this gRPC status (trailers-only) instead


def fault_decision(policy: FaultPolicy | None, draw: Callable[[], float]) -> FaultDecision:
    if policy is None:
        return FaultDecision(None, None)
    delay = policy.delay if policy.delay is not None and draw() < policy.delay_percentage else None
    aborts = policy.abort_status is not None or policy.abort_grpc_status is not None
    if not aborts or not draw() < policy.abort_percentage:
        return FaultDecision(delay, None)
    return FaultDecision(delay, policy.abort_status, policy.abort_grpc_status)


def mirror_decision(policy: MirrorPolicy | None, draw: Callable[[], float]) -> bool:
    return policy is not None and draw() < policy.percentage

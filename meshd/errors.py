"""The one error taxonomy of meshd, its sidecar and its registry adapters.

Every failure the mesh reports is one of these. Library exceptions (trio, h11, httpx,
sqlite3, msgspec, tomllib) are mapped to them once, at the edge where they are caught::

    MeshError
    ├── ConfigError            bad bootstrap/rules/snapshot: carries file, line, field, reason
    │   └── RuleValidationError  a rule push rejected whole: a list of ConfigError
    ├── ProtocolError          HTTP framing/limits; carries status_hint (h11 style)
    │   ├── LocalProtocolError   we misused the protocol (a bug on our side)
    │   └── RemoteProtocolError  the peer broke HTTP -> 4xx + close
    ├── UpstreamError          the chosen endpoint failed (response flag in brackets)
    │   ├── UpstreamConnectError   refused/unreachable           [UF]
    │   ├── UpstreamResetError     closed/reset mid-exchange      [UC]
    │   └── UpstreamTimeoutError   no answer in time              [UT]
    ├── NoHealthyUpstream      cluster has no endpoint          [UH] -> 503
    ├── NoRouteFound           host known, no route matched      [NR] -> 404
    ├── PolicyDenied           egress not allowed / authz deny          -> 502/403
    ├── IdentityError          certificates, SPIFFE IDs (mTLS issue)
    └── RegistryError          a registry source failed; never means "no endpoints"
        ├── RegistryUnavailable
        └── RegistryInconsistent

The response flags are Envoy's ``%RESPONSE_FLAGS%`` so Istio dashboards read them.
"""

from __future__ import annotations


class MeshError(Exception):
    """Root of every error meshd raises on purpose."""


class ConfigError(MeshError):
    """Invalid configuration: ``file:line: field: reason``.

    Args:
        reason: what is wrong, one sentence.
        file: source file name (``"<stdin>"`` when unknown).
        line: 1-based line number, 0 when unknown.
        field: dotted path of the offending field, e.g. ``route[0].http[1].match[0].path.regex``.
    """

    def __init__(self, reason: str, *, file: str = "<input>", line: int = 0, field: str = ""):
        self.reason = reason
        self.file = file
        self.line = line
        self.field = field
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.field}: {self.reason}" if self.field else f"{where}: {self.reason}"

    def to_dict(self) -> dict[str, object]:
        return {"file": self.file, "line": self.line, "field": self.field, "reason": self.reason}


class RuleValidationError(ConfigError):
    """A rule push rejected as a whole; ``errors`` lists every problem found (at least one)."""

    def __init__(self, errors: list[ConfigError]):
        if not errors:
            raise ValueError("RuleValidationError needs at least one error")
        self.errors = list(errors)
        first = errors[0]
        super().__init__(first.reason, file=first.file, line=first.line, field=first.field)

    def __str__(self) -> str:
        return "\n".join(ConfigError.__str__(e) for e in self.errors)


class ProtocolError(MeshError):
    """An HTTP protocol violation. ``status_hint`` is the status to answer with (h11 style)."""

    def __init__(self, msg: str, status_hint: int = 400):
        self.status_hint = status_hint
        super().__init__(msg)


class LocalProtocolError(ProtocolError):
    """We broke the protocol: a bug in meshd."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol: answer ``status_hint`` and close the connection."""


class UpstreamError(MeshError):
    """The selected endpoint failed. ``response_flag`` is Envoy's flag for the access log."""

    response_flag = "UF"
    status = 503


class UpstreamConnectError(UpstreamError):
    response_flag = "UF"
    status = 503


class UpstreamResetError(UpstreamError):
    response_flag = "UC"
    status = 503


class UpstreamTimeoutError(UpstreamError):
    response_flag = "UT"
    status = 504


class NoHealthyUpstream(MeshError):
    response_flag = "UH"
    status = 503


class NoRouteFound(MeshError):
    response_flag = "NR"
    status = 404


class PolicyDenied(MeshError):
    """Traffic refused by mesh policy (egress deny-by-default, later authorization)."""

    response_flag = "NR"
    status = 502  # Istio REGISTRY_ONLY: BlackHoleCluster answers 502


class IdentityError(MeshError):
    """Certificate or SPIFFE identity problem (mTLS arrives in a later issue)."""


class RegistryError(MeshError):
    """A registry source failed. Callers keep the last good data: an error is never 'empty'."""


class RegistryUnavailable(RegistryError):
    pass


class RegistryInconsistent(RegistryError):
    pass

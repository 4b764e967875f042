"""L7 authorization, as pure code over the snapshot's policies (no trio, socket or ssl).

Istio AuthorizationPolicy semantics, evaluated by the inbound sidecar of the protected service::

    1. AUDIT policies that match are noted (``Decision.audited``), nothing else;
    2. any DENY policy matches                  -> denied (403), ``policy`` = the first match;
    3. ALLOW policies exist: one matches        -> allowed, ``policy`` = the first match;
                             none matches       -> denied, ``policy`` = None;
    4. no ALLOW policy                          -> allowed, ``policy`` = None.

A policy matches when any of its rules matches (no rules: never); a rule when its ``source``
AND its ``operation`` match (a missing one matches anything); inside them every field that is
set must match, each list ORed (``not_*`` lists: none may match). ``dry_run`` policies are
evaluated as if enforced and reported in ``Decision.dry_run_denials`` ("would deny"), never
changing the decision: every matching dry-run DENY, and the dry-run ALLOW policies when no
enforced ALLOW applies and none of them matches. An ALLOW policy without rules for host ``"*"``
is the mesh-wide default-deny switch (Istio's ``allow-nothing``).

Matching: principals (the peer's SPIFFE ID from mTLS; ``None`` for plain text), paths and
header values are patterns: exact, ``"pre*"``, ``"*suf"``, or ``"*"`` (principals: any
authenticated peer; headers: present). ``principals = ["*"]`` never matches plain text and
``not_principals = ["*"]`` matches only plain text. Paths are matched after
``normalize_path`` (query dropped; ``\\`` and ``%2F``/``%5C`` to ``/``; escaped unreserved
characters decoded; slashes merged; ``.``/``..`` removed) so that ``/a/../admin``,
``//admin`` or ``/%61dmin`` cannot slip past a policy on ``/admin``; the sidecar should
forward the normalized path. Methods and ports are exact; header names lower case (repeated
headers joined with ``,``). Source IPs are compared as addresses (IPv4-mapped IPv6 as IPv4).

TCP connections (``AuthzRequest.tcp``): HTTP-only conditions (methods, paths, headers and
their ``not_`` forms) make ALLOW and AUDIT rules never match and are ignored in DENY rules, so
a DENY policy denies more rather than less (Istio's rule).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from meshd.snapshot.model import AuthzOperation, AuthzPolicy, AuthzRule, AuthzSource

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset("0123456789abcdefABCDEF")


@dataclass(frozen=True, slots=True)
class AuthzRequest:
    """What authorization looks at. ``principal``: the peer's verified SPIFFE ID (None: plain
    text); ``source_ip``: the connection's source address; ``port``: the destination port;
    ``headers``: lower-case names. For TCP, ``tcp=True`` and method/path are ignored."""

    principal: str | None
    source_ip: str
    method: str
    path: str
    port: int
    headers: Mapping[str, str] = field(default_factory=dict)
    tcp: bool = False


@dataclass(frozen=True, slots=True)
class Decision:
    """``policy``: the policy that decided (None: no policy matched). ``audited``: matching
    AUDIT policies; ``dry_run_denials``: dry-run policies that would have denied."""

    allowed: bool
    policy: str | None
    reason: str
    audited: tuple[str, ...] = ()
    dry_run_denials: tuple[str, ...] = ()


# --------------------------------------------------------------------------- paths


def decode_path(raw: str) -> str:
    """Drop query and fragment, turn ``\\`` and ``%2F``/``%5C`` into ``/``, decode escaped
    unreserved characters (RFC 3986 §2.3) and upper-case the hex of the other escapes."""
    path = raw.partition("?")[0].partition("#")[0]
    if "%" not in path and "\\" not in path:
        return path
    out: list[str] = []
    i, n = 0, len(path)
    while i < n:
        c = path[i]
        if c == "%" and i + 2 < n and path[i + 1] in _HEX and path[i + 2] in _HEX:
            decoded = chr(int(path[i + 1 : i + 3], 16))
            if decoded in _UNRESERVED:
                out.append(decoded)
            elif decoded in "/\\":
                out.append("/")
            else:
                out.append("%" + path[i + 1 : i + 3].upper())
            i += 3
            continue
        out.append("/" if c == "\\" else c)
        i += 1
    return "".join(out)


def normalize_path(raw: str) -> str:
    """``decode_path``, then merge slashes and remove dot segments (RFC 3986 §5.2.4):
    ``"/a//b/./c/../d?x=1"`` -> ``"/a/b/d"``. A path not starting with ``/`` (``*``) is only
    decoded."""
    path = decode_path(raw)
    if not path.startswith("/") or ("//" not in path and "/." not in path):
        return path
    segments = path.split("/")[1:]
    last = len(segments) - 1
    out: list[str] = []
    for i, seg in enumerate(segments):
        if seg == "..":
            if out:
                out.pop()
        elif seg not in (".", ""):
            out.append(seg)
            continue
        if i == last:
            out.append("")  # "/a/." and "/a/b/.." end in a slash; so does "/a/"
    return "/" + "/".join(out)


# --------------------------------------------------------------------------- matchers


class _Patterns:
    """Istio string patterns: exact, ``pre*``, ``*suf``, ``*`` (any value that is present)."""

    __slots__ = ("any", "exact", "prefixes", "suffixes")

    def __init__(self, values: Iterable[str]) -> None:
        self.any = False
        exact: set[str] = set()
        prefixes: list[str] = []
        suffixes: list[str] = []
        for v in values:
            if v == "*":
                self.any = True
            elif v.endswith("*"):
                prefixes.append(v[:-1])
            elif v.startswith("*"):
                suffixes.append(v[1:])
            else:
                exact.add(v)
        self.exact = frozenset(exact)
        self.prefixes = tuple(prefixes)
        self.suffixes = tuple(suffixes)

    def match(self, value: str | None) -> bool:
        if value is None:
            return False
        return (
            self.any
            or value in self.exact
            or (bool(self.prefixes) and value.startswith(self.prefixes))
            or (bool(self.suffixes) and value.endswith(self.suffixes))
        )


def _networks(blocks: Iterable[str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(b, strict=False) for b in blocks)


def parse_ip(text: str) -> IPAddress | None:
    """The address of ``text`` (IPv4-mapped IPv6 as IPv4; brackets allowed), None if not one."""
    try:
        ip = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class _Ctx:
    """One request, prepared once for all policies."""

    __slots__ = ("headers", "ip", "method", "path", "port", "principal", "tcp")

    def __init__(self, req: AuthzRequest) -> None:
        self.principal = req.principal or None
        self.ip = parse_ip(req.source_ip)
        self.tcp = req.tcp
        self.method = req.method
        self.path = "" if req.tcp else normalize_path(req.path)
        self.port = req.port
        self.headers = req.headers


class _Source:
    __slots__ = ("ips", "not_ips", "not_principals", "principals")

    def __init__(self, s: AuthzSource) -> None:
        self.principals = _Patterns(s.principals) if s.principals else None
        self.not_principals = _Patterns(s.not_principals) if s.not_principals else None
        self.ips = _networks(s.ip_blocks) if s.ip_blocks else None
        self.not_ips = _networks(s.not_ip_blocks) if s.not_ip_blocks else None

    def match(self, ctx: _Ctx) -> bool:
        if self.principals is not None and not self.principals.match(ctx.principal):
            return False
        if self.not_principals is not None and self.not_principals.match(ctx.principal):
            return False
        ip = ctx.ip
        if self.ips is not None and (ip is None or not any(ip in n for n in self.ips)):
            return False
        return not (self.not_ips is not None and ip is not None and any(ip in n for n in self.not_ips))


class _Operation:
    __slots__ = ("headers", "http_only", "methods", "not_methods", "not_paths", "not_ports",
                 "paths", "ports")

    def __init__(self, o: AuthzOperation) -> None:
        self.methods = frozenset(o.methods) if o.methods else None
        self.not_methods = frozenset(o.not_methods)
        self.paths = _Patterns(o.paths) if o.paths else None
        self.not_paths = _Patterns(o.not_paths) if o.not_paths else None
        self.ports = frozenset(o.ports) if o.ports else None
        self.not_ports = frozenset(o.not_ports)
        self.headers = tuple((h.name.lower(), _Patterns(h.values)) for h in o.headers)
        self.http_only = bool(o.methods or o.not_methods or o.paths or o.not_paths or o.headers)

    def match(self, ctx: _Ctx, deny: bool) -> bool:
        if self.ports is not None and ctx.port not in self.ports:
            return False
        if ctx.port in self.not_ports:
            return False
        if ctx.tcp:
            return deny or not self.http_only
        if self.methods is not None and ctx.method not in self.methods:
            return False
        if ctx.method in self.not_methods:
            return False
        if self.paths is not None and not self.paths.match(ctx.path):
            return False
        if self.not_paths is not None and self.not_paths.match(ctx.path):
            return False
        return all(p.match(ctx.headers.get(name)) for name, p in self.headers)


class _Rule:
    __slots__ = ("operation", "source")

    def __init__(self, r: AuthzRule) -> None:
        self.source = _Source(r.source) if r.source is not None else None
        self.operation = _Operation(r.operation) if r.operation is not None else None

    def match(self, ctx: _Ctx, deny: bool) -> bool:
        return (self.source is None or self.source.match(ctx)) and (
            self.operation is None or self.operation.match(ctx, deny)
        )


class _Policy:
    __slots__ = ("action", "deny", "dry_run", "name", "rules")

    def __init__(self, p: AuthzPolicy) -> None:
        self.name, self.action, self.dry_run = p.name, p.action, p.dry_run
        self.deny = p.action == "DENY"
        self.rules = tuple(_Rule(r) for r in p.rules)

    def match(self, ctx: _Ctx) -> bool:
        return any(r.match(ctx, self.deny) for r in self.rules)


# --------------------------------------------------------------------------- decisions


def applicable(policies: Iterable[AuthzPolicy], host: str) -> tuple[AuthzPolicy, ...]:
    """The policies enforced by ``host``'s inbound sidecar: its own and those for ``"*"``."""
    host = host.lower()
    return tuple(p for p in policies if p.host == "*" or p.host.lower() == host)


class Authorizer:
    """``policies`` compiled once; ``decide(req)`` per request. With ``host``, only the
    policies for that service and for ``"*"`` are kept (else all of ``policies`` apply).

    Raises ValueError on an invalid IP block (the snapshot is then refused: NACK)."""

    __slots__ = ("_allow", "_audit", "_deny", "_dry", "_dry_allow")

    def __init__(self, policies: Iterable[AuthzPolicy], host: str | None = None) -> None:
        chosen = applicable(policies, host) if host is not None else tuple(policies)
        compiled = [_Policy(p) for p in chosen]
        enforced = [p for p in compiled if not p.dry_run]
        self._audit = tuple(p for p in compiled if p.action == "AUDIT")
        self._deny = tuple(p for p in enforced if p.action == "DENY")
        self._allow = tuple(p for p in enforced if p.action == "ALLOW")
        self._dry = tuple(p for p in compiled if p.dry_run and p.action != "AUDIT")
        self._dry_allow = any(p.action == "ALLOW" for p in self._dry)

    @property
    def empty(self) -> bool:
        """No policy applies: every request is allowed (callers may skip building a request)."""
        return not (self._audit or self._deny or self._allow or self._dry)

    def decide(self, req: AuthzRequest) -> Decision:
        ctx = _Ctx(req)
        audited = tuple(p.name for p in self._audit if p.match(ctx))
        dry = self._dry_run(ctx) if self._dry else ()
        for p in self._deny:
            if p.match(ctx):
                return Decision(False, p.name, f'denied by DENY policy "{p.name}"', audited, dry)
        if not self._allow:
            return Decision(True, None, "allowed: no ALLOW policy applies", audited, dry)
        for p in self._allow:
            if p.match(ctx):
                return Decision(True, p.name, f'allowed by ALLOW policy "{p.name}"', audited, dry)
        return Decision(False, None, "denied: no ALLOW policy matched", audited, dry)

    def _dry_run(self, ctx: _Ctx) -> tuple[str, ...]:
        matched = [p.match(ctx) for p in self._dry]
        allow_denies = (
            self._dry_allow
            and not self._allow
            and not any(m for p, m in zip(self._dry, matched, strict=True) if p.action == "ALLOW")
        )
        return tuple(
            p.name
            for p, m in zip(self._dry, matched, strict=True)
            if (p.deny and m) or (p.action == "ALLOW" and allow_denies)
        )


def decide(policies: Sequence[AuthzPolicy], req: AuthzRequest) -> Decision:
    """One-shot ``Authorizer(policies).decide(req)`` (compile once with ``Authorizer`` instead)."""
    return Authorizer(policies).decide(req)

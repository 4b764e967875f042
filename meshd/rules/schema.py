"""Rules v1: the TOML schema as frozen msgspec structs (shape only; semantics in ``validate``).

A rules file holds any number of three kinds, each an array of tables::

    [[route]]        Istio VirtualService (RouteRule):   host -> ordered HTTP routes
    [[destination]]  Istio DestinationRule (Policy):     subsets by label + load balancer
    [[egress]]       Istio ServiceEntry (EgressRule):    allowed host:ports outside the mesh

Field names follow Istio's (``match``, ``uri``-like ``path``, ``headers``, ``subset``,
``weight``, ``subsets``, ``labels``, ``load_balancer``) in TOML's snake_case. Full reference
with examples: ``docs/rules.md``.
"""

from __future__ import annotations

from typing import Literal

import msgspec

LoadBalancer = Literal["round_robin", "least_request", "random"]
KINDS = ("route", "destination", "egress")


class _Strict(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    pass


class StringMatch(_Strict):
    """Istio StringMatch: exactly one of ``exact``, ``prefix``, ``regex`` (RE2-style, full match)."""

    exact: str | None = None
    prefix: str | None = None
    regex: str | None = None


class HTTPMatch(_Strict):
    """One match block; its conditions are ANDed, blocks of a route are ORed (Istio)."""

    path: StringMatch | None = None
    method: StringMatch | None = None
    headers: dict[str, StringMatch] = {}


class RouteDestination(_Strict):
    """A weighted destination: ``subset`` of ``host`` (default: the rule's host)."""

    subset: str | None = None
    host: str | None = None
    weight: int | None = None


class HTTPRoute(_Strict):
    name: str = ""
    match: list[HTTPMatch] = []
    destinations: list[RouteDestination] = []


class RouteRule(_Strict):
    name: str
    host: str
    http: list[HTTPRoute] = []


class Subset(_Strict):
    name: str
    labels: dict[str, str] = {}


class DestinationRule(_Strict):
    name: str
    host: str
    load_balancer: LoadBalancer = "round_robin"
    subsets: list[Subset] = []


class EgressRule(_Strict):
    """Allow outbound traffic to ``host`` on ``ports``; ``endpoints`` pins addresses
    (``"ip:port"``, ServiceEntry STATIC resolution), otherwise the host is resolved by DNS."""

    name: str
    host: str
    ports: list[int] = msgspec.field(default_factory=lambda: [80])
    endpoints: list[str] = []


class RulesFile(_Strict):
    route: list[RouteRule] = []
    destination: list[DestinationRule] = []
    egress: list[EgressRule] = []


Rule = RouteRule | DestinationRule | EgressRule


def kind_of(rule: Rule) -> str:
    """``"route"``, ``"destination"`` or ``"egress"``."""
    if isinstance(rule, RouteRule):
        return "route"
    if isinstance(rule, DestinationRule):
        return "destination"
    return "egress"


RULE_TYPES: dict[str, type[Rule]] = {
    "route": RouteRule,
    "destination": DestinationRule,
    "egress": EgressRule,
}

"""Rules as operators write them, and per-rule unified diffs between two rule sets.

``rule_toml(kind, rule)`` renders one rule as the ``[[kind]]`` TOML table an operator would
push: fields at their default omitted; short lists and tables inline; long ones, and lists of
tables that hold lists of tables (``http``), as ``[[kind.field]]`` / ``[kind.field]``
sub-tables. The output parses back with ``tomllib`` to the same rule.
``unified(old, new, old_label, new_label)`` is ``difflib.unified_diff`` over each created,
updated or deleted rule, in ``validate.diff`` order::

    --- route/svcb @1
    +++ route/svcb @2
    @@ -2,4 +2,4 @@
     name = "svcb"
     host = "svcb"
     [[route.http]]
    -destinations = [{ subset = "v1" }]
    +destinations = [{ subset = "v2" }]

Pure functions; nothing here raises on a valid ``RulesFile``.
"""

from __future__ import annotations

import difflib
import json
import re

import msgspec

from meshd.rules import validate as rv
from meshd.rules.schema import Rule, RulesFile

INLINE_MAX = 88  # a list of tables or a table longer than this inline becomes sub-tables
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def rule_toml(kind: str, rule: Rule) -> list[str]:
    """``rule`` as the lines of one ``[[kind]]`` table (no trailing newlines)."""
    data = msgspec.to_builtins(rule)
    assert isinstance(data, dict)
    return _table(kind, data, array=True)


def unified(old: RulesFile, new: RulesFile, old_label: str, new_label: str) -> str:
    """Unified diff text of every rule that differs; ``""`` when the sets are equal."""
    out: list[str] = []
    for _, kind, name in rv.diff(old, new):
        before, after = _find(old, kind, name), _find(new, kind, name)
        out += difflib.unified_diff(
            rule_toml(kind, before) if before is not None else [],
            rule_toml(kind, after) if after is not None else [],
            f"{kind}/{name} @{old_label}", f"{kind}/{name} @{new_label}", lineterm="")
    return "".join(f"{line}\n" for line in out)


def _find(rules: RulesFile, kind: str, name: str) -> Rule | None:
    return next((r for r in getattr(rules, kind) if r.name == name), None)


def _table(header: str, data: dict[str, object], array: bool) -> list[str]:
    lines = [f"[[{header}]]" if array else f"[{header}]"]
    nested: list[str] = []  # TOML: a table's own keys must come before its sub-tables
    for key, value in data.items():
        if value is None:
            continue
        inline = _inline(value)
        sub = f"{header}.{_key(key)}"
        if _tables(value) and (len(inline) > INLINE_MAX or any(_has_tables(v) for v in value)):
            for item in value:  # type: ignore[union-attr]
                nested += _table(sub, item, array=True)
        elif len(inline) > INLINE_MAX and isinstance(value, dict) and value:
            nested += _table(sub, value, array=False)
        else:
            lines.append(f"{_key(key)} = {inline}")
    return lines + nested


def _tables(value: object) -> bool:
    """A non-empty list of tables (TOML's array of tables)."""
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _has_tables(value: object) -> bool:
    """Holds an array of tables at any depth (then it is itself written as sub-tables)."""
    if isinstance(value, dict):
        return any(_tables(v) or _has_tables(v) for v in value.values())
    return isinstance(value, list) and any(_has_tables(v) for v in value)


def _key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _string(key)


def _string(s: str) -> str:
    # a JSON string is a TOML basic string, except that TOML also wants DEL escaped
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


def _inline(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)  # inf, -inf, nan and 1e-05 are TOML too
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_inline(v) for v in value if v is not None) + "]"
    if isinstance(value, dict):
        items = [f"{_key(k)} = {_inline(v)}" for k, v in value.items() if v is not None]
        return "{ " + ", ".join(items) + " }" if items else "{}"
    raise TypeError(f"cannot render {type(value).__name__} as TOML")

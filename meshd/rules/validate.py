"""Parse and validate rules files; merge, remove and diff rule sets (pure: text in, structs out).

Pipeline of a push (``validate_push``)::

    text --tomllib--> dict --msgspec.convert--> RulesFile --check_file--> semantic problems
                                                   |
                           merge(existing, pushed) +--check_references--> subset / host problems

Error handling: every failure is a ``RuleValidationError`` (a ``ConfigError``) whose ``errors``
render as ``file:line: field: reason``. A TOML syntax or schema (shape/type) error stops at the
first one, as tomllib and msgspec do; semantic and reference errors are all reported, sorted by
line. Nothing here raises anything else on any input text.
"""

from __future__ import annotations

import re
import tomllib
import types
import typing

import msgspec

from meshd.errors import ConfigError, RuleValidationError
from meshd.rules.checks import Path, Problem, check_file, dotted, host_taken
from meshd.rules.checks_security import references as security_references
from meshd.rules.checks_traffic import unreachable
from meshd.rules.locate import line_of
from meshd.rules.schema import KINDS, Rule, RulesFile

Sources = dict[tuple[str, str], str]


def parse_rules(text: str, file: str = "<input>") -> RulesFile:
    """Decode and check one rules file on its own (no cross-rule references).

    Raises:
        RuleValidationError: TOML syntax, schema, or every semantic problem of the file.
    """
    rules = decode(text, file)
    errors = _located(check_file(rules), text, file)
    if errors:
        raise RuleValidationError(errors)
    return rules


def validate_push(
    text: str, file: str, existing: RulesFile, existing_sources: Sources | None = None
) -> tuple[RulesFile, RulesFile]:
    """Validate a push of ``text`` onto the stored ``existing`` rules: ``(pushed, merged)``.

    ``existing_sources`` maps ``(kind, name)`` of stored rules to the file they came from, for
    errors that a push causes in stored rules (e.g. a subset they use was removed).

    Raises:
        RuleValidationError: parse, schema, semantic and reference errors, all of them (a
        syntax or schema error alone stops before the other checks).
    """
    pushed = decode(text, file)
    merged = merge(existing, pushed)
    errors = _located(check_file(pushed), text, file)
    errors += check_references(merged, text=text, file=file, existing_sources=existing_sources)
    if errors:
        raise RuleValidationError(_unique_sorted(errors, file))
    return pushed, merged


def check_references(
    rules: RulesFile,
    *,
    text: str | None = None,
    file: str = "<input>",
    existing_sources: Sources | None = None,
) -> list[ConfigError]:
    """Cross-rule checks of a merged rule set: used subsets exist (destinations and mirrors;
    a mirror's host defaults to the rule's host); one route rule per host; a rate limit's
    ``route`` names an http route of its host's route rule.

    A rule defined in ``text`` (matched by kind and name) is reported as ``file:line`` with its
    index in ``text``; any other rule as ``existing_sources[(kind, name)]`` (else ``file`` when
    ``text`` is None, else ``"<stored>"``), line 0, and its field named ``route["name"]...``.
    """
    origin = _Origin(text, file, existing_sources or {})
    subsets = {(d.host, s.name) for d in rules.destination for s in d.subsets}
    errors: list[ConfigError] = []
    for i, route in enumerate(rules.route):
        used: list[tuple[Path, str | None, str | None]] = []
        for j, http in enumerate(route.http):
            used += [(("http", j, "destinations", k, "subset"), dest.host, dest.subset)
                     for k, dest in enumerate(http.destinations)]
            if http.mirror is not None:
                used.append((("http", j, "mirror", "subset"), http.mirror.host, http.mirror.subset))
        used += [(("tcp", t, "destinations", k, "subset"), dest.host, dest.subset)
                 for t, tcp in enumerate(route.tcp) for k, dest in enumerate(tcp.destinations)]
        for rest, dest_host, subset in used:
            host = dest_host or route.host
            if subset is not None and (host, subset) not in subsets:
                reason = f'subset "{subset}" is not defined by any destination rule for host "{host}"'
                errors.append(origin.error("route", route.name, i, rest, reason))
    errors += _host_conflicts(rules, origin)
    errors += [origin.error(kind, name, i, rest, reason)
               for kind, name, i, rest, reason in security_references(rules)]
    return errors


def warnings(rules: RulesFile, text: str, file: str) -> list[ConfigError]:
    """Problems that do not reject a push but surely are mistakes, for ``rule push --dry-run``:
    routes after a catch-all route of the same rule and match blocks identical to an earlier
    one (first match wins, so they never decide a request). Sorted by line.

    ``rules`` is the file's own ``RulesFile`` (as ``parse_rules(text)`` or ``validate_push``'s
    ``pushed`` returns it), so indices and lines refer to ``text``.
    """
    return _located(unreachable(rules), text, file)


def merge(existing: RulesFile, pushed: RulesFile) -> RulesFile:
    """Upsert every pushed rule by (kind, name): replaced in place, new ones appended."""
    kinds: dict[str, list[Rule]] = {}
    for kind in KINDS:
        rules: list[Rule] = list(getattr(existing, kind))
        where = {rule.name: i for i, rule in enumerate(rules)}
        for rule in getattr(pushed, kind):
            if rule.name in where:
                rules[where[rule.name]] = rule
            else:
                where[rule.name] = len(rules)
                rules.append(rule)
        kinds[kind] = rules
    return RulesFile(**kinds)  # type: ignore[arg-type]


def remove(existing: RulesFile, kind: str, name: str) -> RulesFile:
    """``existing`` without the rule ``(kind, name)``.

    Raises:
        KeyError: unknown kind, or no such rule.
    """
    if kind not in KINDS:
        raise KeyError(f"unknown rule kind {kind!r}, expected one of {', '.join(KINDS)}")
    rules: list[Rule] = list(getattr(existing, kind))
    kept = [rule for rule in rules if rule.name != name]
    if len(kept) == len(rules):
        raise KeyError(f"no {kind} rule named {name!r}")
    kinds = {k: (kept if k == kind else list(getattr(existing, k))) for k in KINDS}
    return RulesFile(**kinds)  # type: ignore[arg-type]


def diff(old: RulesFile, new: RulesFile) -> list[tuple[str, str, str]]:
    """``(action, kind, name)`` for every rule that differs, action in create/update/delete.

    Order: kinds as in ``KINDS``; per kind the rules of ``new`` in order, then deleted ones.
    """
    out: list[tuple[str, str, str]] = []
    for kind in KINDS:
        before: dict[str, Rule] = {rule.name: rule for rule in getattr(old, kind)}
        after = {rule.name: rule for rule in getattr(new, kind)}
        for name, rule in after.items():
            if name not in before:
                out.append(("create", kind, name))
            elif before[name] != rule:
                out.append(("update", kind, name))
        out += [("delete", kind, name) for name in before if name not in after]
    return out


def _host_conflicts(rules: RulesFile, origin: _Origin) -> list[ConfigError]:
    """One route and one destination rule per host; blame the pushed rule, not the stored one."""
    errors: list[ConfigError] = []
    for kind in ("route", "destination"):
        items = getattr(rules, kind)
        by_host: dict[str, list[int]] = {}
        for i, rule in enumerate(items):
            by_host.setdefault(rule.host, []).append(i)
        for host, indices in by_host.items():
            stored = [i for i in indices if not origin.is_pushed(kind, items[i].name)]
            owner = (stored or indices)[0]
            for i in indices:
                if i != owner:
                    reason = host_taken(host, items[owner].name, kind)
                    errors.append(origin.error(kind, items[i].name, i, ("host",), reason))
    return errors


class _Origin:
    """Where a rule of the merged set came from: the pushed ``text`` or a stored file."""

    def __init__(self, text: str | None, file: str, sources: Sources) -> None:
        self.text, self.file, self.sources = text, file, sources
        self.index = _file_index(text) if text is not None else {}

    def is_pushed(self, kind: str, name: str) -> bool:
        return self.text is None or (kind, name) in self.index

    def error(
        self, kind: str, name: str, merged_index: int, rest: Path, reason: str
    ) -> ConfigError:
        if self.text is not None and (kind, name) in self.index:
            path = (kind, self.index[kind, name], *rest)
            return ConfigError(
                reason, file=self.file, line=line_of(self.text, path), field=dotted(path)
            )
        if (kind, name) not in self.sources and self.text is None:
            return ConfigError(reason, file=self.file, field=dotted((kind, merged_index, *rest)))
        source = self.sources.get((kind, name), "<stored>")
        return ConfigError(reason, file=source, field=f'{kind}["{name}"].{dotted(rest)}')


def _file_index(text: str) -> dict[tuple[str, str], int]:
    """``(kind, name) -> index`` of the rules defined in ``text`` (first definition wins)."""
    try:
        data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, RecursionError):
        return {}
    index: dict[tuple[str, str], int] = {}
    for kind in KINDS:
        items = data.get(kind)
        for i, item in enumerate(items if isinstance(items, list) else []):
            if isinstance(item, dict) and isinstance(item.get("name"), str):
                index.setdefault((kind, item["name"]), i)
    return index


def _located(problems: list[Problem], text: str, file: str) -> list[ConfigError]:
    errors = [
        ConfigError(r, file=file, line=line_of(text, p), field=dotted(p)) for p, r in problems
    ]
    return sorted(errors, key=lambda e: e.line)


def _unique_sorted(errors: list[ConfigError], file: str) -> list[ConfigError]:
    """Drop repeats (a host clash is found per file and on the merged set); this file first."""
    seen: set[tuple[str, int, str, str]] = set()
    unique = []
    for e in errors:
        if (e.file, e.line, e.field, e.reason) not in seen:
            seen.add((e.file, e.line, e.field, e.reason))
            unique.append(e)
    return sorted(unique, key=lambda e: (e.file != file, e.file, e.line))


def decode(text: str, file: str = "<input>") -> RulesFile:
    """TOML text -> ``RulesFile`` checked for shape and types only (no semantic checks).

    Raises:
        RuleValidationError: one error, the first TOML syntax or schema error.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RuleValidationError([_toml_error(str(exc), text, file)]) from None
    except RecursionError:
        error = ConfigError("invalid TOML: nesting too deep", file=file)
        raise RuleValidationError([error]) from None
    try:
        return msgspec.convert(data, RulesFile)
    except msgspec.ValidationError as exc:
        raise RuleValidationError([_schema_error(str(exc), data, text, file)]) from None


_TOML_AT = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")
_TOML_END = " (at end of document)"


def _toml_error(message: str, text: str, file: str) -> ConfigError:
    """``"Invalid value (at line 3, column 5)"`` -> ``file:3: invalid TOML: invalid value
    (column 5)``; a message "at end of document" gets the last line."""
    line, where = 0, ""
    found = _TOML_AT.search(message)
    if found:
        line, where = int(found[1]), f" (column {found[2]})"
        message = message[: found.start()]
    elif message.endswith(_TOML_END):
        line, where = text.count("\n") + 1, " (at end of document)"
        message = message[: -len(_TOML_END)]
    return ConfigError(
        f"invalid TOML: {message[:1].lower()}{message[1:]}{where}", file=file, line=line
    )


_SCHEMA_AT = re.compile(r"(?s)(?P<msg>.*?)(?: - at `\$(?P<at>[^`]*)`)?")
_PATH_PART = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]|\[\.\.\.\]")
_TOML_TYPES = {
    "object": "table",
    "array": "array",
    "str": "string",
    "int": "integer",
    "float": "float",
    "bool": "boolean",
}


def _schema_error(message: str, data: dict[str, object], text: str, file: str) -> ConfigError:
    """Map a msgspec message (``Expected `int`, got `str` - at `$.route[0].name```) to an error."""
    found = _SCHEMA_AT.fullmatch(message)
    assert found is not None  # the pattern matches any string
    msg, path = found["msg"], _schema_path(found["at"] or "", data)
    reason = _schema_reason(msg, path)
    unknown = re.fullmatch(r"Object (?:contains unknown|missing required) field `(.*)`", msg)
    if unknown:
        path += (unknown[1],)
    return ConfigError(reason, file=file, line=line_of(text, path), field=dotted(path))


def _schema_reason(msg: str, path: Path) -> str:
    if found := re.fullmatch(r"Object contains unknown field `(.*)`", msg):
        typ = _type_at(path)
        if not (isinstance(typ, type) and issubclass(typ, msgspec.Struct)):
            return f'unknown field "{found[1]}"'
        fields = ", ".join(f.encode_name for f in msgspec.structs.fields(typ))
        return f'unknown field "{found[1]}", expected one of: {fields}'
    if found := re.fullmatch(r"Object missing required field `(.*)`", msg):
        return f'missing required field "{found[1]}"'
    if found := re.fullmatch(r"Expected `(.*)`, got `(.*)`", msg):
        expected = " or ".join(_TOML_TYPES.get(t, t) for t in found[1].split(" | ") if t != "null")
        reason = f"expected {expected}, got {_TOML_TYPES.get(found[2], found[2])}"
        if len(path) == 1 and found[2] == "object":
            reason += f"; write [[{path[0]}]] for each rule"
        return reason
    if found := re.fullmatch(r"Invalid enum value (.*)", msg):
        value = found[1]
        if len(value) >= 2 and value[0] == value[-1] == "'":
            value = '"' + value[1:-1] + '"'
        choices = ", ".join(str(c) for c in typing.get_args(_type_at(path)))
        return (
            f"invalid value {value}, expected one of: {choices}"
            if choices
            else f"invalid value {value}"
        )
    return msg[:1].lower() + msg[1:]


def _schema_path(at: str, data: object) -> Path:
    """``".route[0].headers[...]"`` -> ``("route", 0, "headers", "user-agent")``.

    msgspec hides dict keys as ``[...]``: the key is the first whose value fails to convert.
    """
    path: Path = ()
    node = data
    for part in _PATH_PART.finditer(at):
        key: str | int = part[1] if part[1] is not None else int(part[2]) if part[2] else "..."
        if part[0] == "[...]" and isinstance(node, dict):
            key = _bad_key(node, _type_at((*path, "*")))
        path += (key,)
        try:
            node = node[key]  # type: ignore[index]
        except (KeyError, IndexError, TypeError):
            node = None
    return path


def _bad_key(node: dict[str, object], value_type: object) -> str:
    for key, value in node.items():
        try:
            msgspec.convert(value, value_type)
        except msgspec.ValidationError:
            return key
    return next(iter(node), "...")


def _type_at(path: Path) -> typing.Any:
    """The schema type at a data path; any key of a dict gives its value type."""
    typ: typing.Any = RulesFile
    for part in path:
        typ = _unwrap(typ)
        if isinstance(typ, type) and issubclass(typ, msgspec.Struct):
            names = {f.encode_name: f.name for f in msgspec.structs.fields(typ)}
            typ = typing.get_type_hints(typ).get(names.get(str(part), str(part)), object)
        elif typing.get_origin(typ) in (list, dict):
            typ = typing.get_args(typ)[-1]
        else:
            return object
    return _unwrap(typ)


def _unwrap(typ: typing.Any) -> typing.Any:
    """``X | None`` -> ``X``; anything else unchanged."""
    args = [a for a in typing.get_args(typ) if a is not type(None)]
    if typing.get_origin(typ) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return typ

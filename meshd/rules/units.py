"""Units in rules: durations (``"250ms"``, ``"2s"``, ``"1.5m"``, ``"1h"``) and percentages.

``duration(text) -> float`` seconds; raises ``ValueError`` with a reason naming the accepted
forms (Istio/protobuf Duration style, plus ``m`` and ``h`` as Envoy's YAML allows).
"""

from __future__ import annotations

import re

_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_SCALE = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
MAX_DURATION = 30 * 24 * 3600.0  # 30 days: anything longer is surely a typo


def duration(text: str) -> float:
    """``"250ms"`` -> 0.25; raises ValueError for anything else or beyond MAX_DURATION."""
    m = _DURATION.fullmatch(text.strip()) if isinstance(text, str) else None
    if m is None:
        raise ValueError(f'"{text}" is not a duration like "250ms", "2s", "1.5m" or "1h"')
    seconds = float(m.group(1)) * _SCALE[m.group(2)]
    if seconds > MAX_DURATION:
        raise ValueError(f'"{text}" is longer than 30 days')
    return seconds


def optional_duration(text: str | None) -> float | None:
    return None if text is None else duration(text)


def percentage_ok(value: float) -> bool:
    """True for 0 <= value <= 100 (Istio Percent)."""
    return 0.0 <= value <= 100.0

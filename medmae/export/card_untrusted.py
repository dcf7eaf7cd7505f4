"""Reading untrusted values: the one-line :class:`~medmae.export.card.CardError` of a bad field, short
``repr`` of hostile values, JSON parsed only after a depth scan, and the typed field readers of a record.

Split out of :mod:`medmae.export.card` (issue 19): these primitives are shared by the card loader, the
encoder-section checks, the preprocessing checks and the fine-tuning record checks, and hold no
knowledge of what a card contains. Import the public names from :mod:`medmae.export.card`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from medmae.export.card_types import MAX_JSON_DEPTH, CardError


def _bad(where: str, field: str, why: str) -> CardError:
    return CardError(f"{where}: field '{field}' {why}")


def _int(value: Any, where: str, field: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _bad(where, field, f"must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def _number(value: Any, where: str, field: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (math.isfinite(value) and lo < value <= hi):
        raise _bad(where, field, f"must be a number in ({lo:g}, {hi:g}], got {value!r}")
    return float(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _short(value: Any, limit: int = 80) -> str:
    """``repr`` of an untrusted value, cut to one short line."""
    text = " ".join(_limited_repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _limited_repr(value: Any) -> str:
    import reprlib

    r = reprlib.Repr()
    r.maxlist = r.maxtuple = r.maxdict = 6
    r.maxstring = r.maxother = 60
    r.maxlevel = 3
    return r.repr(value)


def _some(keys: Sequence[str], shown: int = 5) -> str:
    return f"[{', '.join(keys[:shown])}{f', ... ({len(keys)} in all)' if len(keys) > shown else ''}]"


# ----------------------------------------------------------------------------- untrusted JSON

_JSON_SPECIAL = re.compile(r'[\[\]{}"\\]')


def json_too_deep(text: str, limit: int = MAX_JSON_DEPTH) -> int | None:
    """Offset of the first bracket that nests deeper than ``limit`` (brackets inside strings do not
    count), or ``None``: a scan that needs no recursion, run before ``json.loads`` (which recurses)."""
    depth, in_string, skip = 0, False, -1
    for match in _JSON_SPECIAL.finditer(text):
        i = match.start()
        if i == skip:  # the character after a backslash inside a string
            continue
        c = text[i]
        if in_string:
            if c == "\\":
                skip = i + 1
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
            if depth > limit:
                return i
        elif c in "]}":
            depth -= 1
    return None


def parse_json(text: str, where: str) -> Any:
    """``json.loads`` of an untrusted document: nesting beyond :data:`MAX_JSON_DEPTH` and every parse
    error (bad syntax, a 5,000-digit number) are one :class:`CardError` line."""
    deep = json_too_deep(text)
    if deep is not None:
        raise CardError(f"{where}: unreadable card (JSON nested deeper than {MAX_JSON_DEPTH} levels at offset {deep})")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise CardError(f"{where}: unreadable card ({e.__class__.__name__}: {first})") from None


def check_depth(obj: Any, where: str, field: str, limit: int = MAX_JSON_DEPTH) -> None:
    """A record (dicts and lists) nests at most ``limit`` levels; walked without recursion."""
    stack = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list | tuple):
            if depth > limit:
                raise _bad(where, field, f"nests deeper than {limit} levels")
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))


# ----------------------------------------------------------------------------- typed fields of a record

_REQUIRED = object()


def _value(d: Mapping[str, Any], key: str, where: str, section: str, default: Any) -> Any:
    if key in d:
        return d[key]
    if default is _REQUIRED:
        raise _bad(where, f"{section}.{key}" if section else key, "is missing")
    return default


def read_int(
    d: Mapping[str, Any],
    key: str,
    where: str,
    lo: int,
    hi: int,
    *,
    section: str = "hyper_parameters",
    default: Any = _REQUIRED,
) -> int:
    """An int field of an untrusted record in ``[lo, hi]``; :class:`CardError` names it."""
    return _int(_value(d, key, where, section, default), where, f"{section}.{key}", lo, hi)


def read_bool(d: Mapping[str, Any], key: str, where: str, *, section: str = "hyper_parameters",
              default: Any = _REQUIRED) -> bool:  # fmt: skip
    """A true/false field of an untrusted record; :class:`CardError` names it."""
    value = _value(d, key, where, section, default)
    if not isinstance(value, bool):
        raise _bad(where, f"{section}.{key}", f"must be true or false, got {_short(value)}")
    return value


def read_choice(d: Mapping[str, Any], key: str, where: str, choices: Sequence[str], *,
                section: str = "hyper_parameters", default: Any = _REQUIRED) -> str:  # fmt: skip
    """One of ``choices`` from an untrusted record; :class:`CardError` names the field."""
    value = _value(d, key, where, section, default)
    if not isinstance(value, str) or value not in choices:
        raise _bad(where, f"{section}.{key}", f"must be one of {tuple(choices)}, got {_short(value)}")
    return value

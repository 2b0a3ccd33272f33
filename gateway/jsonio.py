"""JSON on the request path: orjson where its answer is the standard library's, else ``json``.

Each request body and each answer is parsed once, and an answer re-encoded once to add
``tool_tokens``; ``json`` spends several microseconds on each, orjson under one. orjson
differs in a few places, and those inputs go to ``json``, so the result is always what
``json.loads`` gives (or the error it raises):

- it reads integers beyond 64 bits as floats (silently): any run of 19 digits, in a number or
  not, sends the document to ``json``;
- it refuses ``NaN``/``Infinity``, a UTF-8 BOM, other encodings, lone surrogates and very deep
  nesting, all of which ``json`` accepts or words its own error for.

A document ``json`` had to read may hold what orjson cannot write (NaN, big integers), so
:func:`decode` says which parser read it and :func:`encode` writes it back with the same one.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

__all__ = ["decode", "encode", "loads"]

# Every digit becomes "0" and every other byte "x": a run of 19 digits is then a plain substring
# search, ten times faster than a regular expression (which, on a 40 KB body, costs more than
# parsing it).
_DIGITS = bytes(48 if 48 <= b <= 57 else 120 for b in range(256))
_LONG_NUMBER = b"0" * 19
# Any run of 19 bytes holds two consecutive multiples of 9: only where two bytes 9 apart (at
# multiples of 9) are both digits can a run be, and only there is the body looked at whole.
_STEP = 9
_CLOSE_LOOKS = 16  # then one pass over the whole body (digit-dense bodies: arrays of numbers)
# Below this, one pass over the whole costs what the sample does, and an answer's ids and
# timestamps would send the sample to look closely several times (three times the cost).
_WHOLE_BELOW = 1024


def has_long_number(data: bytes) -> bool:
    """Whether ``data`` holds a run of 19 ASCII digits (what orjson might read as a float).

    Translating every byte of a 40 KB body cost a seventh of the gateway's own work on it; this
    translates a ninth of them, then looks closely at the few places a run could be."""
    if len(data) < _WHOLE_BELOW:
        return data.translate(_DIGITS).find(_LONG_NUMBER) >= 0
    sample = data[::_STEP].translate(_DIGITS)
    at = sample.find(b"00")
    for _ in range(_CLOSE_LOOKS):
        if at < 0:
            return False
        start = at * _STEP  # a run holding bytes start and start + 9 begins at start - 9 or later
        if data[max(0, start - _STEP) : start + 2 * _STEP + 19].translate(_DIGITS).find(_LONG_NUMBER) >= 0:
            return True
        at = sample.find(b"00", at + 1)
    return at >= 0 and data.translate(_DIGITS).find(_LONG_NUMBER) >= 0


def decode(data: bytes) -> tuple[Any, bool]:
    """``(json.loads(data), whether orjson read it)``; raises what ``json.loads`` raises."""
    if not has_long_number(data):
        try:
            return orjson.loads(data), True
        except orjson.JSONDecodeError:
            pass  # json decides, and words the error
    return json.loads(data), False


def loads(data: bytes) -> Any:
    """Exactly ``json.loads(data)``, faster."""
    return decode(data)[0]


def encode(obj: Any, fast: bool) -> bytes:
    """Compact UTF-8 JSON of what :func:`decode` read (``fast``: its second answer)."""
    if fast:
        return orjson.dumps(obj)
    # ASCII escapes: a lone surrogate that json read must be written back as one, not crash.
    return json.dumps(obj, separators=(",", ":")).encode()

"""The fast JSON path gives exactly what the standard library gives, or hands over to it."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import jsonio
from tests.conftest import CORPUS


def _same(a: Any, b: Any) -> bool:
    """Equal, with types compared too (1 == 1.0 == True in Python, not in JSON)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return type(a) is type(b) and a == b


def test_every_corpus_tool_reads_the_same_and_round_trips() -> None:
    lines = CORPUS.read_bytes().splitlines()
    assert len(lines) > 4000
    for line in lines:
        obj, fast = jsonio.decode(line)
        assert fast and _same(obj, json.loads(line))
        assert _same(json.loads(jsonio.encode(obj, fast)), obj)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"seed": 123456789012345678901234567890}',  # orjson would read a float
        b'{"n": -18446744073709551616}',
        b'{"n": 9223372036854775807}',  # 19 digits: json reads it, to be safe
        b'{"t": NaN, "u": Infinity, "v": -Infinity}',
        b'{"x": 1e400}',
        b'\xef\xbb\xbf{"bom": 1}',
        '{"utf16": "é"}'.encode("utf-16"),
        b'{"lone": "\\ud800"}',
        b'{"dup": 1, "dup": 2}',
    ],
)
def test_what_orjson_reads_differently_goes_to_json(raw: bytes) -> None:
    obj, fast = jsonio.decode(raw)
    assert _same(obj, json.loads(raw))
    written = jsonio.encode(obj, fast)
    assert written.decode("utf-8") and _same(json.loads(written), obj)  # valid UTF-8, and the same


@pytest.mark.parametrize("raw", [b"", b"{", b'{"a": 1,}', b"\xff\xfe\xfd", b'"\x01"', b"nul"])
def test_errors_are_jsons_own(raw: bytes) -> None:
    with pytest.raises(ValueError) as expected:
        json.loads(raw)
    with pytest.raises(
        type(expected.value), match=str(expected.value).replace("(", r"\(").replace(")", r"\)")
    ):
        jsonio.decode(raw)


def test_too_deep_for_either_raises_what_json_raises() -> None:
    raw = b"[" * 5000 + b"]" * 5000
    with pytest.raises(RecursionError):
        json.loads(raw)
    with pytest.raises(RecursionError):
        jsonio.decode(raw)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None)
@given(json_values, st.booleans())
def test_any_document_reads_as_json_reads_it(value: Any, ascii_only: bool) -> None:
    raw = json.dumps(value, ensure_ascii=ascii_only).encode()
    obj, fast = jsonio.decode(raw)
    assert _same(obj, json.loads(raw))
    assert _same(json.loads(jsonio.encode(obj, fast)), obj)


def _full_scan(data: bytes) -> bool:
    return any(data[i : i + 19].isdigit() and len(data[i : i + 19]) == 19 for i in range(len(data)))


def test_the_sampled_scan_finds_every_run_of_19_digits_and_no_other() -> None:
    """Runs of 17 to 21 digits at every offset, in sparse and digit-dense bodies (the latter
    past the close looks, down to the whole-body pass), against a byte-by-byte reference."""
    import random

    rng = random.Random(19)
    for _ in range(4000):
        density = rng.choice([0.0, 0.05, 0.3, 0.6, 0.9])
        size = rng.choice([0, 5, 18, 19, 40, 200, 1023, 1024, 2000])  # both sides of the whole pass
        body = bytearray(
            rng.choice(b"0123456789") if rng.random() < density else rng.choice(b'ab ",:{}[]-.')
            for _ in range(size)
        )
        if rng.random() < 0.5 and size:
            length = rng.randint(17, 21)
            at = rng.randrange(size)
            body[at : at + length] = bytes(rng.choice(b"0123456789") for _ in range(length))
        data = bytes(body)
        assert jsonio.has_long_number(data) is _full_scan(data), data


def test_a_long_number_anywhere_goes_to_the_standard_library() -> None:
    for pad in range(40):
        raw = b'{"a": "' + b"x" * pad + b'", "n": 12345678901234567890123}'
        obj, fast = jsonio.decode(raw)
        assert not fast and obj["n"] == 12345678901234567890123

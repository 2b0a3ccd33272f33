from __future__ import annotations

import json

from gateway.sse import StreamMeter


def _event(obj: object) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


CHUNKS = [
    _event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}),
    _event({"choices": [{"index": 0, "delta": {"content": "Hel"}}]}),
    _event({"choices": [{"index": 0, "delta": {"content": "lo"}}]}),
    _event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
    _event({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}),
    b"data: [DONE]\n\n",
]


def _run(meter: StreamMeter, data: bytes, size: int) -> bytes:
    out = b"".join(meter.feed(data[i : i + size]) for i in range(0, len(data), size))
    return out + meter.flush()


def test_passes_everything_through_whatever_the_chunking() -> None:
    data = b"".join(CHUNKS)
    for size in (1, 7, 64, len(data)):
        meter = StreamMeter()
        assert _run(meter, data, size) == data
        assert meter.usage == {"prompt_tokens": 5, "completion_tokens": 2}
        assert meter.text() == "Hello"


def test_strips_the_usage_chunk_the_client_did_not_ask_for() -> None:
    data = b"".join(CHUNKS)
    meter = StreamMeter(strip_usage_chunk=True)
    out = _run(meter, data, 13)
    assert out == b"".join(c for i, c in enumerate(CHUNKS) if i != 4)
    assert meter.usage == {"prompt_tokens": 5, "completion_tokens": 2}


def test_keeps_usage_inside_a_content_chunk() -> None:
    chunk = _event({"choices": [{"index": 0, "delta": {"content": "x"}}], "usage": {"prompt_tokens": 1}})
    meter = StreamMeter(strip_usage_chunk=True)
    assert meter.feed(chunk) == chunk
    assert meter.usage == {"prompt_tokens": 1}


def test_forwards_complete_events_at_once() -> None:
    meter = StreamMeter()
    assert meter.feed(CHUNKS[0] + CHUNKS[1][:10]) == CHUNKS[0]
    assert meter.feed(CHUNKS[1][10:]) == CHUNKS[1]


def test_crlf_framing_is_not_held_back() -> None:
    meter = StreamMeter()
    out = meter.feed(b'data: {"choices": []}\r\n\r\n')
    assert out == b'data: {"choices": []}\n\n'

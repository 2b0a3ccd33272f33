"""Metering a server-sent-events stream as it passes through, without holding it back.

Complete events are forwarded as soon as they arrive; only a trailing partial event waits
for its end. The usage the backend reports is picked out of the events that mention it, and
a usage-only chunk the client did not ask for is dropped. The raw events are kept so that,
if no usage ever arrives, the streamed text can be counted afterwards.
"""

from __future__ import annotations

from typing import Any

from gateway import jsonio

__all__ = ["StreamMeter"]


class StreamMeter:
    def __init__(self, *, strip_usage_chunk: bool = False) -> None:
        self.strip_usage_chunk = strip_usage_chunk
        self.usage: dict[str, Any] | None = None
        self.events = 0
        self._buf = b""
        self._seen: list[bytes] = []

    def feed(self, chunk: bytes) -> bytes:
        """Take bytes from the backend; return the bytes to send to the client now."""
        data = self._buf + chunk if self._buf else chunk
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        end = data.rfind(b"\n\n")
        if end < 0:
            self._buf = data
            return b""
        complete, self._buf = data[: end + 2], data[end + 2 :]
        self._seen.append(complete)
        if b'"usage"' not in complete:
            self.events += complete.count(b"\n\n")
            return complete
        out: list[bytes] = []
        for event in complete.split(b"\n\n")[:-1]:
            self.events += 1
            if b'"usage"' in event and self._take_usage(event) and self.strip_usage_chunk:
                continue
            out.append(event + b"\n\n")
        return b"".join(out)

    def flush(self) -> bytes:
        """Whatever partial event is left when the backend closes the stream."""
        rest, self._buf = self._buf, b""
        return rest

    def _take_usage(self, event: bytes) -> bool:
        """Record the event's usage; True if the event is a usage-only chunk."""
        obj = _event_json(event)
        if not isinstance(obj, dict):
            return False
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
            return not obj.get("choices")
        return False

    def text(self) -> str:
        """The content and tool-call arguments streamed so far (for counting without usage)."""
        parts: list[str] = []
        for block in self._seen:
            for event in block.split(b"\n\n"):
                obj = _event_json(event)
                if not isinstance(obj, dict):
                    continue
                for choice in obj.get("choices") or ():
                    delta = choice.get("delta") or {} if isinstance(choice, dict) else {}
                    if isinstance(delta.get("content"), str):
                        parts.append(delta["content"])
                    for call in delta.get("tool_calls") or ():
                        fn = call.get("function") or {} if isinstance(call, dict) else {}
                        for field in ("name", "arguments"):
                            if isinstance(fn.get(field), str):
                                parts.append(fn[field])
                    if isinstance(choice.get("text"), str):
                        parts.append(choice["text"])
        return "".join(parts)


def _event_json(event: bytes) -> Any:
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            payload = line[5:].strip()
            if payload and payload != b"[DONE]":
                try:
                    return jsonio.loads(payload)
                except (ValueError, RecursionError):
                    return None
    return None

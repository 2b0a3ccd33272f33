"""A budget for counting on the event loop: long requests are counted there while it stays cheap.

A long request is counted in a worker thread, so that tokenizing it never stalls the event loop.
The hand-off costs about 0.4 ms, more than counting a long prompt whose segments the tokenizer
has seen before, which is the usual case: agents resend the same history and tools turn after
turn. So a format that counts piece by piece (without rendering the whole prompt first) counts
a long request on the loop under a budget: each message costs ``MESSAGE_COST`` up front (the
format's own Python work), and each segment the tokenizer has to read, and each tool list not
memoised, costs its length when it is met. Once the budget is spent, :class:`OverBudget` stops
the count, and the caller counts again in a thread. Segments counted before the stop stay
cached, so the second count reuses them.

The budget is per thread, so counts that already run in worker threads never see it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

__all__ = ["MESSAGE_COST", "OverBudget", "budget", "spend"]

# A message's Python work in a format (a few microseconds, its segments cached or not), in
# characters' worth: with a 32K budget, a conversation of 512 messages or more goes to a thread.
MESSAGE_COST = 64


class OverBudget(Exception):
    """The count would take too long for the event loop; count again off it."""


_state = threading.local()


@contextlib.contextmanager
def budget(chars: int) -> Iterator[None]:
    """Counts in this thread may spend ``chars`` within the block; :func:`spend` raises past it."""
    _state.left = chars
    try:
        yield
    finally:
        _state.left = None


def spend(chars: int) -> None:
    """Take ``chars`` from this thread's budget (no budget set: no limit)."""
    left = getattr(_state, "left", None)
    if left is None:
        return
    left -= chars
    _state.left = left
    if left < 0:
        raise OverBudget

"""The segment-count cache in front of a tokenizer: exact, bounded, safe across threads."""

from __future__ import annotations

import random
import threading
from typing import Any

from gateway.accounting.encoders import CountingEncoder
from gateway.accounting.registry import Registry

V3 = "mistralai/Mistral-7B-Instruct-v0.3"


def _inner() -> Any:
    profile = Registry.load().profile(V3)
    assert profile is not None
    return profile.format.encoder.inner


def _texts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    words = ["tool", "call", "weather", "Paris", "températures", "東京", "42", "{", "}", "the"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(8, 60))) for _ in range(n)]


def test_counts_through_the_cache_equal_the_tokenizer_and_the_cache_stays_bounded() -> None:
    inner = _inner()
    cache = CountingEncoder(inner, size=16)
    texts = _texts(1, 200)
    for _ in range(3):
        for text in texts:
            assert cache.count(text) == inner.count(text)
            assert len(cache._counts) <= 16
    # The newest entries are the ones kept.
    assert set(cache._counts) == {(len(t), hash(t)) for t in texts[-16:]}


def test_threads_sharing_the_cache_get_exact_counts() -> None:
    inner = _inner()
    cache = CountingEncoder(inner, size=32)
    texts = _texts(2, 120)
    expected = {t: inner.count(t) for t in texts}
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(3000):
                text = rng.choice(texts)
                assert cache.count(text) == expected[text]
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(cache._counts) <= 32

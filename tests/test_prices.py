"""Prices: integer micro-units, effective dates, the default for unlisted models."""

from __future__ import annotations

import pytest

from gateway.db import open_db
from gateway.prices import DEFAULT_MODEL, FREE, Price, PriceBook, PriceError
from tests.conftest import ENGINES


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    """Every test here runs on SQLite and on PostgreSQL."""
    return str(request.param)


def test_cost_is_integer_and_bills_tools_at_the_tool_price() -> None:
    price = Price(200_000, 400_000, 800_000)
    assert price.cost(input_tokens=1000, tool_tokens=200, output_tokens=50) == 280
    assert price.cost(input_tokens=1, tool_tokens=0, output_tokens=0) == 0  # 0.2 rounds down
    assert Price(500_000, 0, 0).cost(input_tokens=1, tool_tokens=0, output_tokens=0) == 1  # 0.5 rounds up
    assert isinstance(price.cost(input_tokens=10**9, tool_tokens=10**8, output_tokens=10**9), int)


def test_effective_dates_and_default(db_path: str) -> None:
    book = PriceBook(open_db(db_path))
    assert book.at("m", 100.0) == FREE
    book.set(DEFAULT_MODEL, Price(1, 1, 1), effective_from=10)
    book.set("m", Price(2, 2, 2), effective_from=50)
    book.set("m", Price(3, 3, 3), effective_from=100)
    assert book.at("other", 60).input_per_m == 1
    assert book.at("m", 20).input_per_m == 1  # before m had a price of its own
    assert book.at("m", 60).input_per_m == 2
    assert book.at("m", 100).input_per_m == 3
    assert [p.input_per_m for p in book.current(75)] == [1, 2]
    with pytest.raises(PriceError, match="already has a price"):
        book.set("m", Price(4, 4, 4), effective_from=100)
    with pytest.raises(PriceError, match="negative"):
        book.set("m", Price(-1, 0, 0))

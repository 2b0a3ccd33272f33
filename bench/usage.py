"""Benchmark: usage queries on a big ledger (1,000,000 rows by default).

Builds a ledger of N requests over 60 days for a few keys and models (with the daily rollup the
ledger writer keeps), then times, for one key: a 30-day daily usage query (the target: under
50 ms), the same grouped by model, and a 7-day hourly query (read from the ledger rows).

    python -m bench.usage [--rows 1000000] [--keys 10] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from gateway.db import SQLiteDatabase, open_db
from gateway.usage import Query, buckets

DAY = 86400
MODELS = [
    "mistralai/Mistral-7B-Instruct-v0.3",
    "mistralai/Mistral-Nemo-Instruct-2407",
    "gpt-4",
    "meta-llama/Meta-Llama-3.1-8B-Instruct",
]


def build(path: str, rows: int, keys: int, now: float, progress: object) -> None:
    db = open_db(path)
    assert isinstance(db, SQLiteDatabase)  # bulk inserts through sqlite3's executemany
    for k in range(1, keys + 1):
        db.execute(
            "INSERT INTO keys (id, name, prefix, hash, created_at) VALUES (?, ?, 'p', ?, 0)",
            [k, f"k{k}", f"h{k}"],
        )
    rng = random.Random(7)
    batch = 50_000
    for start in range(0, rows, batch):
        data = []
        for i in range(start, min(rows, start + batch)):
            prompt = rng.randint(10, 4000)
            data.append(
                (
                    f"req_{i:08d}",
                    rng.randint(1, keys),
                    rng.choice(MODELS),
                    "/chat/completions",
                    "settled",
                    200,
                    now - rng.random() * 60 * DAY,
                    prompt,
                    rng.randint(0, prompt // 2),
                    rng.randint(1, 800),
                    rng.randint(0, 5000),
                )
            )
        with db.conn:
            db.conn.execute("BEGIN")
            db.conn.executemany(
                "INSERT INTO requests (id, key_id, model, route, state, status, started_at, prompt_tokens, "
                "tool_tokens, completion_tokens, cost_micros) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                data,
            )
        progress(f"{min(rows, start + batch):>9} rows written")  # type: ignore[operator]
    with db.conn:
        db.conn.execute("BEGIN")
        db.conn.execute(
            """INSERT INTO usage_daily
               SELECT key_id, strftime('%Y-%m-%d', started_at, 'unixepoch'), coalesce(model, ''), count(*),
                      sum(prompt_tokens), sum(tool_tokens), sum(completion_tokens), sum(cost_micros)
               FROM requests GROUP BY 1, 2, 3"""
        )
    db.execute("ANALYZE")
    db.close()


def timed(path: str, params: dict[str, str], now: float, repeat: int) -> tuple[float, int]:
    db = open_db(path, migrate=False)
    q = Query.parse(params, now=now)
    samples, results = [], 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        page = buckets(db, 3, q, currency="USD")
        samples.append(time.perf_counter() - t0)
        results = sum(len(b["results"]) for b in page["data"])
    db.close()
    return statistics.median(samples) * 1000, results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--keys", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    now = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/ledger.db"
        t0 = time.perf_counter()
        build(path, args.rows, args.keys, now, lambda line: print(line, flush=True))
        built = time.perf_counter() - t0
        month = {
            "start_time": str(int(now - 30 * DAY)),
            "end_time": str(int(now)),
            "bucket_width": "1d",
            "limit": "31",
        }
        cases = {
            "30 days, daily": month,
            "30 days, daily, by model": {**month, "group_by": "model"},
            "7 days, hourly, by model": {
                "start_time": str(int(now - 7 * DAY)),
                "end_time": str(int(now)),
                "bucket_width": "1h",
                "limit": "168",
                "group_by": "model",
            },
        }
        figures = {}
        for name, params in cases.items():
            ms, results = timed(path, params, now, args.repeat)
            figures[name] = {"median_ms": ms, "results": results}
            print(f"{name:<28} {ms:8.2f} ms  ({results} results)", flush=True)
    result = {"rows": args.rows, "keys": args.keys, "build_s": built, "queries": figures}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "usage.json").write_text(json.dumps(result, indent=2))
    md = [
        f"# Usage queries on a {args.rows:,}-row ledger ({args.keys} keys, 60 days)",
        "",
        "| query (one key) | median ms | results |",
        "|---|---:|---:|",
    ]
    md += [f"| {name} | {f['median_ms']:.2f} | {f['results']} |" for name, f in figures.items()]
    (out / "usage.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()

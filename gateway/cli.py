"""The ``gateway`` command: parses arguments and turns library errors into clean messages.

The work is done by the library (``gateway.keys``, ``gateway.app``, ...); nothing here is
needed to use the gateway as a library.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import socket
import sys
import threading
from collections.abc import Sequence
from typing import Any

from gateway.db import open_db
from gateway.errors import InvalidRequest
from gateway.keys import KeyError_, KeyInfo, KeyStore, load_key_secret
from gateway.limits import LIMIT_NAMES, PlanError, PlanStore, format_money, parse_limit, parse_money
from gateway.prices import DEFAULT_MODEL, Price, PriceBook, PriceError
from gateway.settings import ConfigError, Settings

__all__ = ["main"]

DEMO_KEY_NAME = "demo"


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        result: int = args.run(args)
        return result
    except ConfigError as exc:
        print(f"gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    except (KeyError_, PlanError, PriceError, InvalidRequest) as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway", description="Usage-metering gateway for LLM function calling."
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the gateway")
    _common(serve)
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8080)")
    serve.add_argument(
        "--upstream",
        help="backend base URL, e.g. https://api.deepinfra.com/v1/openai "
        "(default: the bundled emulator, for a demo)",
    )
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="default info")
    serve.add_argument(
        "--redis", help="redis:// URL for quota counters shared by replicas (env GATEWAY_REDIS_URL)"
    )
    serve.set_defaults(run=_serve)

    keys = sub.add_parser("keys", help="manage customer API keys")
    keys_sub = keys.add_subparsers(title="keys commands", metavar="ACTION")
    create = keys_sub.add_parser("create", help="create a key and print its secret once (last line)")
    _common(create)
    create.add_argument("--name", required=True, help="customer name, unique")
    create.add_argument("--plan", help="a plan whose limits apply where the key sets none")
    _limit_flags(create)
    create.add_argument("--json", action="store_true", help="print the key's details as JSON")
    create.set_defaults(run=_keys_create)
    update = keys_sub.add_parser("update", help="change a key's plan or limits (from the next request)")
    _common(update)
    update.add_argument("key", metavar="ID", help="key id or name")
    update.add_argument("--plan", help="move the key to this plan")
    update.add_argument("--no-plan", action="store_true", help="take the key off its plan")
    _limit_flags(update)
    update.add_argument("--json", action="store_true", help="print JSON")
    update.set_defaults(run=_keys_update)
    list_ = keys_sub.add_parser("list", help="list keys (never their secrets)")
    _common(list_)
    list_.add_argument("--json", action="store_true", help="print JSON")
    list_.set_defaults(run=_keys_list)
    revoke = keys_sub.add_parser("revoke", help="revoke a key; effective from the next request")
    _common(revoke)
    revoke.add_argument("key", metavar="ID", help="key id or name")
    revoke.add_argument("--json", action="store_true", help="print JSON")
    revoke.set_defaults(run=_keys_revoke)
    rotate = keys_sub.add_parser("rotate", help="give a key a new secret (the old one stops working)")
    _common(rotate)
    rotate.add_argument("key", metavar="ID", help="key id or name")
    rotate.add_argument("--json", action="store_true", help="print JSON")
    rotate.set_defaults(run=_keys_rotate)
    keys.set_defaults(run=lambda a: _help(keys))

    plans = sub.add_parser("plans", help="manage plans: named sets of limits that keys share")
    plans_sub = plans.add_subparsers(title="plans commands", metavar="ACTION")
    for action, helptext in (("create", "create a plan"), ("update", "change a plan's limits")):
        p = plans_sub.add_parser(action, help=helptext)
        _common(p)
        p.add_argument("name", metavar="NAME")
        _limit_flags(p)
        p.add_argument("--json", action="store_true", help="print JSON")
        p.set_defaults(run=_plans_create if action == "create" else _plans_update)
    plist = plans_sub.add_parser("list", help="list plans")
    _common(plist)
    plist.add_argument("--json", action="store_true", help="print JSON")
    plist.set_defaults(run=_plans_list)
    pdel = plans_sub.add_parser("delete", help="delete a plan no key uses")
    _common(pdel)
    pdel.add_argument("name", metavar="NAME")
    pdel.set_defaults(run=_plans_delete)
    plans.set_defaults(run=lambda a: _help(plans))

    prices = sub.add_parser("prices", help="manage prices per model (per million tokens)")
    prices_sub = prices.add_subparsers(title="prices commands", metavar="ACTION")
    pset = prices_sub.add_parser("set", help="set a model's price from now (or --effective)")
    _common(pset)
    pset.add_argument("model", metavar="MODEL", help="a model id, or 'default' for unlisted models")
    pset.add_argument("--input", required=True, help="price per million input (message) tokens, e.g. 0.20")
    pset.add_argument("--tool", help="price per million tool tokens (default: the input price)")
    pset.add_argument("--output", required=True, help="price per million output tokens")
    pset.add_argument("--effective", help="when it applies: YYYY-MM-DD (UTC), an ISO time or unix seconds")
    pset.set_defaults(run=_prices_set)
    prlist = prices_sub.add_parser("list", help="prices in force now (--history: every price)")
    _common(prlist)
    prlist.add_argument("--history", action="store_true", help="every price, past and future")
    prlist.add_argument("--json", action="store_true", help="print JSON")
    prlist.set_defaults(run=_prices_list)
    prices.set_defaults(run=lambda a: _help(prices))

    usage = sub.add_parser("usage", help="usage from the ledger: requests, tokens (tool tokens apart), cost")
    _common(usage)
    usage.add_argument("--key", help="one key (name or id); default: every key")
    usage.add_argument("--since", default="7d", help="how far back: e.g. 30m, 24h, 7d (default 7d)")
    usage.add_argument(
        "--by", choices=["model", "key", "day"], default="day", help="rows per ... (default day)"
    )
    fmt = usage.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print JSON")
    fmt.add_argument("--csv", action="store_true", help="print CSV")
    usage.set_defaults(run=_usage)

    emulator = sub.add_parser("emulator", help="run the bundled backend emulator")
    emulator.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1")
    emulator.add_argument("--port", type=int, default=9000, help="default 9000")
    emulator.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    emulator.add_argument("--token-latency", type=float, default=0.0, help="seconds between streamed tokens")
    emulator.set_defaults(run=_emulator)
    return parser


def _limit_flags(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("limits (a number, or 'none' to clear)")
    group.add_argument("--tokens-per-day", metavar="N", help="tokens per UTC day")
    group.add_argument("--tokens-per-month", metavar="N", help="tokens per UTC calendar month")
    group.add_argument(
        "--spend-per-month", metavar="AMOUNT", help="spend per month in currency units, e.g. 50.00"
    )
    group.add_argument("--rpm", metavar="N", help="requests per minute (sliding)")
    group.add_argument("--tpm", metavar="N", help="tokens per minute (sliding)")
    group.add_argument("--max-concurrent", metavar="N", help="requests in flight at once")


def _limits_from(args: argparse.Namespace) -> dict[str, int | None]:
    values = {}
    for name in LIMIT_NAMES:
        raw = getattr(args, name, None)
        if raw is not None:
            values[name] = parse_limit(name, raw)
    return values


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", help="SQLite file or postgresql:// URL (default gateway.db; env GATEWAY_DB)")
    p.add_argument("--config", help="TOML settings file (env GATEWAY_CONFIG)")


def _help(p: argparse.ArgumentParser) -> int:
    p.print_help()
    return 2


def _settings(args: argparse.Namespace, **overrides: Any) -> Settings:
    return Settings.load(config_file=args.config, overrides={"db": args.db, **overrides})


def _store(settings: Settings) -> KeyStore:
    return KeyStore(open_db(settings.db), load_key_secret(settings))


def _print_key(info: KeyInfo, secret: str, as_json: bool, verb: str) -> None:
    if as_json:
        print(json.dumps({**info.as_dict(), "key": secret}))
        return
    print(f"{verb} key {info.id} ({info.name}). Keep the secret now: it is not shown again.")
    print(secret)


def _keys_create(args: argparse.Namespace) -> int:
    info, secret = _store(_settings(args)).create(args.name, plan=args.plan, limits=_limits_from(args))
    _print_key(info, secret, args.json, "Created")
    return 0


def _keys_update(args: argparse.Namespace) -> int:
    info = _store(_settings(args)).update(
        args.key, plan=args.plan, clear_plan=args.no_plan, limits=_limits_from(args)
    )
    if args.json:
        print(json.dumps(info.as_dict()))
    else:
        print(
            f"Updated key {info.id} ({info.name}): plan {info.plan or '-'}; "
            f"{_describe(info.limits.as_dict())}"
        )
    return 0


def _describe(limits: dict[str, int | None]) -> str:
    parts = []
    for name, value in limits.items():
        if value is not None:
            shown = format_money(value) if name == "spend_per_month" else str(value)
            parts.append(f"{name.replace('_', '-')} {shown}")
    return ", ".join(parts) or "no limits"


def _plan_store(args: argparse.Namespace) -> PlanStore:
    return PlanStore(open_db(_settings(args).db))


def _plans_create(args: argparse.Namespace) -> int:
    plan = _plan_store(args).create(args.name, _limits_from(args))
    print(json.dumps(plan) if args.json else f"Created plan {plan['name']}: {_describe(_limits_of(plan))}")
    return 0


def _plans_update(args: argparse.Namespace) -> int:
    plan = _plan_store(args).update(args.name, _limits_from(args))
    print(json.dumps(plan) if args.json else f"Updated plan {plan['name']}: {_describe(_limits_of(plan))}")
    return 0


def _plans_list(args: argparse.Namespace) -> int:
    plans = _plan_store(args).list()
    if args.json:
        print(json.dumps(plans))
    elif not plans:
        print("No plans yet: create one with `gateway plans create NAME --tokens-per-day N ...`.")
    else:
        for plan in plans:
            print(f"{plan['name']:<20} {_describe(_limits_of(plan))}")
    return 0


def _plans_delete(args: argparse.Namespace) -> int:
    _plan_store(args).delete(args.name)
    print(f"Deleted plan {args.name}.")
    return 0


def _limits_of(plan: dict[str, Any]) -> dict[str, int | None]:
    return {n: plan[n] for n in LIMIT_NAMES}


def _prices_set(args: argparse.Namespace) -> int:
    model = DEFAULT_MODEL if args.model == "default" else args.model
    input_price = parse_money(args.input)
    price = Price(input_price, parse_money(args.tool) if args.tool else input_price, parse_money(args.output))
    settings = _settings(args)
    saved = PriceBook(open_db(settings.db)).set(model, price, _when(args.effective))
    print(
        f"Price for {args.model} from {_utc(saved.effective_from)} UTC, per million tokens: "
        f"input {format_money(saved.input_per_m)}, tool {format_money(saved.tool_per_m)}, "
        f"output {format_money(saved.output_per_m)} {settings.currency}"
    )
    return 0


def _prices_list(args: argparse.Namespace) -> int:
    settings = _settings(args)
    book = PriceBook(open_db(settings.db))
    prices = book.history() if args.history else book.current()
    if args.json:
        print(json.dumps([p.as_dict() for p in prices]))
        return 0
    if not prices:
        print(
            "No prices yet: every request costs 0. "
            "Set one with `gateway prices set default --input ... --output ...`."
        )
        return 0
    print(
        f"{'MODEL':<44} {'INPUT':>10} {'TOOL':>10} {'OUTPUT':>10}  FROM (UTC)"
        f"   per million tokens, {settings.currency}"
    )
    for p in prices:
        name = "default" if p.model == DEFAULT_MODEL else p.model
        print(
            f"{name:<44} {format_money(p.input_per_m):>10} {format_money(p.tool_per_m):>10} "
            f"{format_money(p.output_per_m):>10}  {_utc(p.effective_from)}"
        )
    return 0


def _usage(args: argparse.Namespace) -> int:
    import time

    from gateway.usage import Query, buckets, to_csv

    settings = _settings(args)
    db = open_db(settings.db)
    key_id = None
    if args.key:
        key_id = KeyStore(db, load_key_secret(settings)).get(args.key).id
    now = time.time()
    params = {
        "start_time": str(int(now - _duration(args.since))),
        "end_time": str(int(now) + 1),
        "bucket_width": "1h" if args.since.endswith(("m", "h")) and _duration(args.since) <= 86400 else "1d",
        "group_by": {"model": "model", "key": "key", "day": ""}[args.by],
    }
    params["limit"] = "168" if params["bucket_width"] == "1h" else "31"
    data: list[dict[str, Any]] = []
    while True:
        page = buckets(
            db, key_id, Query.parse(params, now=now, allow_key_group=True), currency=settings.currency
        )
        data += page["data"]
        if not page["has_more"]:
            break
        params["page"] = page["next_page"]
    if args.json:
        print(json.dumps({"object": "page", "data": data, "has_more": False, "next_page": None}))
        return 0
    if args.csv:
        print(to_csv({"data": data}), end="")
        return 0
    totals: dict[str, list[int]] = {}
    for bucket in data:
        for r in bucket["results"]:
            if args.by == "day":
                label = _utc(bucket["start_time"])[: 10 if params["bucket_width"] == "1d" else 16]
            elif args.by == "model":
                label = r["model"] or "-"
            else:
                label = r.get("key_name") or str(r.get("key_id"))
            row = totals.setdefault(label, [0, 0, 0, 0, 0])
            for i, field in enumerate(("num_model_requests", "input_tokens", "tool_tokens", "output_tokens")):
                row[i] += r[field]
            row[4] += r["cost"]["value_micros"]
    header = args.by.upper()
    print(f"{header:<44} {'REQUESTS':>9} {'INPUT':>12} {'(TOOLS)':>12} {'OUTPUT':>12} {'COST':>14}")
    grand = [0, 0, 0, 0, 0]
    for label in sorted(totals):
        row = totals[label]
        grand = [a + b for a, b in zip(grand, row, strict=True)]
        print(f"{label:<44} {row[0]:>9} {row[1]:>12} {row[2]:>12} {row[3]:>12} {format_money(row[4]):>14}")
    print(
        f"{'TOTAL (' + settings.currency + ')':<44} {grand[0]:>9} {grand[1]:>12} {grand[2]:>12} "
        f"{grand[3]:>12} {format_money(grand[4]):>14}"
    )
    return 0


def _duration(text: str) -> float:
    units = {"m": 60, "h": 3600, "d": 86400}
    try:
        value = float(text[:-1])
        unit = units[text[-1]]
    except (ValueError, KeyError, IndexError):
        raise PlanError(f"--since: {text!r} is not a duration like 30m, 24h or 7d") from None
    if value <= 0:
        raise PlanError("--since must be positive")
    return value * unit


def _when(text: str | None) -> float | None:
    if text is None:
        return None
    import datetime as dt

    try:
        return float(text)
    except ValueError:
        pass
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError:
        raise PlanError(
            f"--effective: {text!r} is not a date (YYYY-MM-DD), an ISO time or unix seconds"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.timestamp()


def _keys_rotate(args: argparse.Namespace) -> int:
    info, secret = _store(_settings(args)).rotate(args.key)
    _print_key(info, secret, args.json, "Rotated")
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    keys = _store(_settings(args)).list()
    if args.json:
        print(json.dumps([k.as_dict() for k in keys]))
        return 0
    if not keys:
        print("No keys yet: create one with `gateway keys create --name NAME`.")
        return 0
    print(f"{'ID':>4}  {'NAME':<24} {'PREFIX':<11} {'STATUS':<8} CREATED (UTC)")
    for k in keys:
        status = "active" if k.active else "revoked"
        print(f"{k.id:>4}  {k.name:<24} {k.prefix:<11} {status:<8} {_utc(k.created_at)}")
    return 0


def _keys_revoke(args: argparse.Namespace) -> int:
    info = _store(_settings(args)).revoke(args.key)
    if args.json:
        print(json.dumps(info.as_dict()))
    else:
        print(f"Revoked key {info.id} ({info.name}); it is refused from the next request on.")
    return 0


def _utc(ts: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import create_app
    from gateway.gc_policy import GcPolicy

    settings = _settings(
        args,
        host=args.host,
        port=args.port,
        upstream_url=args.upstream,
        log_level=args.log_level,
        redis_url=args.redis,
    )
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    demo = not settings.upstream_url
    if demo:
        port = _start_emulator_thread(settings.emulator_latency)
        settings = dataclasses.replace(settings, upstream_url=f"http://127.0.0.1:{port}/v1/openai")
    # Built before the demo's key is rotated and shown: a configuration error stops here.
    app = GcPolicy(create_app(settings), threshold=settings.gc_threshold, freeze=settings.gc_freeze)
    if demo:
        _print_demo(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        server_header=False,
        proxy_headers=bool(settings.trusted_proxies),
        forwarded_allow_ips=settings.trusted_proxies or None,
        **_fast_server(),
    )
    return 0


def _fast_server() -> dict[str, Any]:
    """uvloop and httptools when installed: the cheapest event loop and HTTP parser uvicorn has."""
    options: dict[str, Any] = {}
    try:
        import uvloop  # noqa: F401

        options["loop"] = "uvloop"
    except ImportError:
        pass
    try:
        import httptools  # noqa: F401

        options["http"] = "httptools"
    except ImportError:
        pass
    return options


def _start_emulator_thread(latency: float) -> int:
    """Run the emulator on a free loopback port in a daemon thread; return the port."""
    import uvicorn

    from gateway.emulator.app import create_emulator_app

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    config = uvicorn.Config(create_emulator_app(latency=latency), log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="emulator", daemon=True).start()
    return port


def _print_demo(settings: Settings) -> None:
    store = _store(settings)
    try:
        _, secret = store.rotate(DEMO_KEY_NAME)
    except KeyError_:
        _, secret = store.create(DEMO_KEY_NAME)
    base = f"http://{settings.host}:{settings.port}/v1/openai"
    print(
        f"""
No upstream configured: serving the bundled backend emulator (demo mode).
Ledger: {settings.db}
Demo key (rotated at every demo start): {secret}

Try it, from another terminal:
  curl -s {base}/chat/completions -H "Authorization: Bearer {secret}" \\
    -H "Content-Type: application/json" \\
    -d '{{"model": "mistralai/Mistral-7B-Instruct-v0.1", "tool_choice": "auto",
         "messages": [{{"role": "user", "content": "What is the weather in San Francisco?"}}],
         "tools": [{{"type": "function", "function": {{"name": "get_current_weather",
           "description": "Get the current weather in a given location",
           "parameters": {{"type": "object", "properties": {{"location": {{"type": "string"}}}},
                          "required": ["location"]}}}}}}]}}'
""",
        flush=True,
    )


def _emulator(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.emulator.app import create_emulator_app

    app = create_emulator_app(latency=args.latency, token_latency=args.token_latency)
    print(f"Emulated backend on http://{args.host}:{args.port}/v1/openai", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False, **_fast_server())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

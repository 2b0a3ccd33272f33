"""Benchmark: what tool-token accounting costs per request, beside the raw tokenizer (the floor).

For each model family, 1, 8 and 32 corpus tools, and a short (the seed's) or an ~8k-token
conversation, it measures:
- cold: the first count of those tools (tokenizer loaded, nothing cached),
- warm: the same request counted again (the tools block cached where the format delimits it),
- raw: the tokenizer alone on the same text (the prompt's segments, or the rendered template),
and the seed request's warm accounting time. Writes bench/results/accounting.{json,md}.

    python -m bench.accounting [--repeat 200] [--out bench/results]
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.accounting.accountant import Accountant
from gateway.accounting.chat_template import ChatTemplateFormat
from gateway.accounting.mistral import MistralFormat, tools_json
from gateway.accounting.registry import Registry
from gateway.accounting.types import text_of
from gateway.emulator.seed import SEED_MESSAGES, SEED_MODEL, SEED_TOOLS

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpora" / "seal_tools.jsonl"
MODELS = {
    "mistral-v3 (sentencepiece)": "mistralai/Mistral-7B-Instruct-v0.3",
    "mistral-v3 (tekken)": "mistralai/Mistral-Nemo-Instruct-2407",
    "llama-3.1 (chat template)": "meta-llama/Meta-Llama-3.1-8B-Instruct",
    "gpt-4 (openai formula)": "gpt-4",
}


def corpus_tools(n: int, offset: int) -> list[dict[str, Any]]:
    lines = CORPUS.read_text().splitlines()
    return [json.loads(lines[(offset + i) % len(lines)]) for i in range(n)]


def long_conversation(target_chars: int = 32_000) -> list[dict[str, Any]]:
    """About 8k tokens of real-looking text: corpus descriptions as a long chat."""
    lines = CORPUS.read_text().splitlines()
    messages: list[dict[str, Any]] = [{"role": "system", "content": "You are a careful assistant."}]
    i, size = 0, 0
    while size < target_chars:
        texts = [json.loads(lines[i + k])["function"]["description"] for k in range(6)]
        role = "user" if len(messages) % 2 == 1 else "assistant"
        content = " ".join(texts)
        messages.append({"role": role, "content": content})
        size += len(content)
        i += 6
    if messages[-1]["role"] != "user":
        messages.append({"role": "user", "content": "Summarize the above."})
    return messages


def timed(fn: Callable[[], object], repeat: int) -> float:
    """Median seconds of ``fn`` over ``repeat`` runs."""
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def raw_text_counter(accountant: Accountant, model: str, messages: Any, tools: Any) -> Callable[[], object]:
    """The floor: the bare tokenizer (no cache) on the text the format tokenizes, already built."""
    profile = accountant.registry.profile(model)
    assert profile is not None
    fmt: Any = profile.format
    inner = fmt.encoder.inner
    if isinstance(fmt, ChatTemplateFormat):
        rendered = fmt.render(messages, tools)
        specials = "|".join(re.escape(s) for s in sorted(inner.specials, key=len, reverse=True))
        segments = re.split(specials, rendered)
    else:
        segments = [text_of(m.get("content")) for m in messages]
        if tools:
            segments.append(tools_json(tools) if isinstance(fmt, MistralFormat) else json.dumps(tools))
    return lambda: [inner.count(s) for s in segments]


def run(repeat: int, progress: Callable[[str], None]) -> dict[str, Any]:
    registry = Registry.load()
    accountant = Accountant(registry)
    t0 = time.perf_counter()
    registry.warm()
    load_s = time.perf_counter() - t0
    conversations = {"short": SEED_MESSAGES, "8k": long_conversation()}
    rows = []
    offset = 0
    for family, model in MODELS.items():
        for n_tools in (1, 8, 32):
            for conv_name, messages in conversations.items():
                offset += 97  # fresh tools per case: the cold count really is cold
                tools = corpus_tools(n_tools, offset)
                t = time.perf_counter()
                counted = accountant.count(model, messages, tools)
                cold = time.perf_counter() - t
                warm = timed(functools.partial(accountant.count, model, messages, tools), repeat)
                raw = timed(raw_text_counter(accountant, model, messages, tools), repeat)
                rows.append(
                    {
                        "family": family,
                        "model": model,
                        "tools": n_tools,
                        "conversation": conv_name,
                        "prompt_tokens": counted.prompt_tokens,
                        "tool_tokens": counted.tool_tokens,
                        "cold_us": cold * 1e6,
                        "warm_us": warm * 1e6,
                        "raw_us": raw * 1e6,
                        "warm_over_raw": warm / raw if raw else None,
                    }
                )
                progress(
                    f"{family:28} {n_tools:>2} tools {conv_name:>5}: warm {warm * 1e6:9.1f} us, "
                    f"raw {raw * 1e6:9.1f} us, cold {cold * 1e6:9.1f} us"
                )
    seed = {}
    for family, model in {"the seed's model (mistral-v1)": SEED_MODEL, **MODELS}.items():
        accountant.count(model, SEED_MESSAGES, SEED_TOOLS)
        count_seed = functools.partial(accountant.count, model, SEED_MESSAGES, SEED_TOOLS)
        seed[family] = timed(count_seed, repeat * 5) * 1e6
    return {
        "machine": {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
        },
        "repeat": repeat,
        "tokenizer_load_s": load_s,
        "rows": rows,
        "seed_request_warm_us": seed,
    }


def markdown(result: dict[str, Any]) -> str:
    out = [
        "# Tool-token accounting cost",
        "",
        f"Python {result['machine']['python']} on {result['machine']['platform']}; median of "
        f"{result['repeat']} runs; all tokenizers loaded in {result['tokenizer_load_s']:.2f} s.",
        "",
        "| model | tools | conversation | prompt tokens | cold µs | warm µs | raw tokenizer µs "
        "| warm / raw |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        out.append(
            f"| {r['family']} | {r['tools']} | {r['conversation']} | {r['prompt_tokens']} "
            f"| {r['cold_us']:.0f} | {r['warm_us']:.1f} | {r['raw_us']:.1f} | {r['warm_over_raw']:.2f} |"
        )
    out += ["", "Seed request (1 tool, one user message), warm:", ""]
    out += [f"- {family}: {us:.1f} µs" for family, us in result["seed_request_warm_us"].items()]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    result = run(args.repeat, lambda line: print(line, flush=True))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "accounting.json").write_text(json.dumps(result, indent=2))
    (out / "accounting.md").write_text(markdown(result))
    print(f"\nwrote {out / 'accounting.json'} and {out / 'accounting.md'}")


if __name__ == "__main__":
    main()

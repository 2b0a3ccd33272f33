"""Meta's reference Llama 3.1 JSON tool prompt: exact against Meta's own reference encoder."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

from gateway.accounting.accountant import Accountant
from gateway.accounting.registry import Registry
from tests.accounting import conversations as conv
from tests.conftest import SEED_MESSAGES, SEED_TOOLS

ROOT = Path(__file__).resolve().parents[2]
ORACLE_RELEASE = "0.1.0"  # the last llama-models release with the reference prompt templates
MODEL = "test/llama-3.1-reference"


@pytest.fixture(scope="module")
def oracle_path() -> Path:
    """llama-models 0.1.0, unpacked once into .cache/ (fetched from PyPI by pip if missing)."""
    target = ROOT / ".cache" / "oracles" / f"llama_models-{ORACLE_RELEASE}"
    if not (target / "llama_models").is_dir():
        wheels = ROOT / ".cache" / "oracles" / "wheels"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "-d",
                str(wheels),
                f"llama-models=={ORACLE_RELEASE}",
            ],
            check=True,
        )
        (wheel,) = wheels.glob(f"llama_models-{ORACLE_RELEASE}-*.whl")
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(target)
    return target


def oracle(path: Path, cases: list[tuple[Any, Any]]) -> list[int]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(path), str(ROOT)])}
    done = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("llama_reference_oracle.py"))],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return list(json.loads(done.stdout))


@pytest.fixture(scope="module")
def accountant() -> Accountant:
    operator = {"models": [{"match": MODEL, "tokenizer": "llama3", "format": "llama3-reference"}]}
    return Accountant(Registry.load(operator=operator))


def test_measured_facts_from_the_design_notes(accountant: Accountant, oracle_path: Path) -> None:
    without = accountant.count(MODEL, SEED_MESSAGES, None).prompt_tokens
    counted = accountant.count(MODEL, SEED_MESSAGES, SEED_TOOLS)
    assert oracle(oracle_path, [(SEED_MESSAGES, None), (SEED_MESSAGES, SEED_TOOLS)]) == [
        without,
        counted.prompt_tokens,
    ]
    # 43 and 201 on the day the design notes were measured; the date's length can shift them by one.
    assert abs(without - 43) <= 1 and counted.prompt_tokens - without == 158


def test_zero_difference_over_generated_conversations(accountant: Accountant, oracle_path: Path) -> None:
    rng = random.Random("llama-reference")
    cases = []
    for _ in range(150):
        tools = conv.tools(rng, rng.choice([0, 1, 4, 12, 32])) or None
        cases.append((conv.conversation(rng, tools), tools))
    want = oracle(oracle_path, [c for case in cases for c in (case, (case[0], None))])
    for i, (messages, tools) in enumerate(cases):
        got = accountant.count(MODEL, messages, tools)
        assert got.prompt_tokens == want[2 * i], (messages, tools)
        assert got.tool_tokens == want[2 * i] - want[2 * i + 1]

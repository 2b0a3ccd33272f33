"""The README documents every command and setting (a new one without docs fails here)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from gateway.cli import _parser
from gateway.settings import Settings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _commands(parser: argparse.ArgumentParser, prefix: str = "gateway") -> list[str]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.append(f"{prefix} {name}")
                found += _commands(sub, f"{prefix} {name}")
    return found


def test_every_cli_command_is_documented() -> None:
    commands = _commands(_parser())
    assert "gateway keys create" in commands
    missing = [c for c in commands if c not in README]
    assert not missing, f"undocumented commands: {missing}"


def test_every_setting_is_documented() -> None:
    names = [f.name for f in dataclasses.fields(Settings) if f.name not in ("config_file", "registry")]
    missing = [n for n in names if f"`{n}`" not in README or f"`GATEWAY_{n.upper()}`" not in README]
    assert not missing, f"undocumented settings: {missing}"


def test_readme_starts_with_the_two_commands() -> None:
    blocks = README.split("```sh\n")
    serve = "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/gateway serve"
    assert blocks[1].startswith(serve)
    assert blocks[2].startswith("bash scripts/test")
    assert "bash scripts/test" in (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()

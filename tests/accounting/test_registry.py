"""The registry: defaults, operator overrides without code changes, file checks, fallback."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from gateway.accounting.accountant import Accountant, UnknownModel
from gateway.accounting.encoders import TokenizerFileError, resolve_file
from gateway.accounting.registry import Registry, RegistryError
from gateway.settings import Settings
from tests.conftest import SEED_MESSAGES, SEED_TOOLS

REQUIRED_DEFAULTS = [
    "mistralai/Mistral-7B-Instruct-v0.1",
    "mistralai/Mistral-7B-Instruct-v0.3",
    "mistralai/Mixtral-8x7B-Instruct-v0.1",
    "mistralai/Mixtral-8x22B-Instruct-v0.1",
    "mistralai/Mistral-Nemo-Instruct-2407",
    "meta-llama/Meta-Llama-3.1-8B-Instruct",
    "meta-llama/Meta-Llama-3.1-70B-Instruct",
    "meta-llama/Llama-3.3-70B-Instruct",
    "gpt-4",
    "gpt-3.5-turbo",
]


def test_every_required_model_has_a_profile_that_counts() -> None:
    registry = Registry.load()
    for model in REQUIRED_DEFAULTS:
        profile = registry.profile(model)
        assert profile is not None, model
        assert profile.format.count(SEED_MESSAGES, SEED_TOOLS).tool_tokens > 0
    assert registry.profile("nobody/unknown") is None


def test_warm_builds_the_named_models_profiles_once_and_refuses_unknown_ones() -> None:
    registry = Registry.load()
    llama = "meta-llama/Meta-Llama-3.1-8B-Instruct"  # matched by a pattern entry
    assert not registry.ready(llama) and registry.knows(llama) and not registry.knows("nobody/unknown")
    assert registry.warm([llama, "meta-llama/Meta-Llama-3.1-70B-Instruct"]) == [
        "meta-llama/Meta-Llama-3.1-*-Instruct"
    ]
    assert registry.ready(llama) and not registry.ready("gpt-4")
    assert registry.warm([llama]) == []  # built already
    with pytest.raises(RegistryError, match="'nobody/unknown' is not in the model registry"):
        registry.warm(["gpt-4", "nobody/unknown"])
    assert not registry.ready("gpt-4")  # every name is checked before any is loaded
    everything = registry.warm()
    assert len(everything) == len(registry.models()) - 1  # all but the llama pattern
    assert all(registry.ready(m) for m in REQUIRED_DEFAULTS)


def test_operator_adds_a_model_with_a_file_path_and_a_builtin_format(tmp_path: Path) -> None:
    source = resolve_file("mistral_common:data/mistral_instruct_tokenizer_240323.model.v3")
    (tmp_path / "my.model").write_bytes(source.read_bytes())
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    config = tmp_path / "gateway.toml"
    config.write_text(
        f"""
upstream_url = "http://x/v1"
[tokenizers.mine]
kind = "sentencepiece"
file = "my.model"
sha256 = "{digest}"

[[models]]
match = "acme/*"
tokenizer = "mine"
format = "mistral-v3"
"""
    )
    settings = Settings.load(config_file=str(config), env={})
    registry = Registry.load(operator=settings.registry, operator_base=tmp_path)
    counted = Accountant(registry).count("acme/custom-7b", SEED_MESSAGES, SEED_TOOLS)
    assert (counted.prompt_tokens, counted.tool_tokens, counted.tokenizer) == (95, 84, "mine")


def test_operator_entries_override_defaults_and_take_a_jinja_template(tmp_path: Path) -> None:
    (tmp_path / "t.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>"
        "{{ m.content }}<|eot_id|>{% endfor %}{% if tools %}{{ tools | tojson }}{% endif %}"
    )
    operator: dict[str, Any] = {
        "models": [
            {
                "match": "gpt-4",
                "tokenizer": "llama3",
                "format": "chat-template",
                "template": "t.jinja",
                "bos_token": "<|begin_of_text|>",
            }
        ]
    }
    registry = Registry.load(operator=operator, operator_base=tmp_path)
    counted = Accountant(registry).count("gpt-4", SEED_MESSAGES, SEED_TOOLS)
    assert counted.tokenizer == "llama3" and counted.format == "chat-template:t.jinja"
    from gateway.accounting.encoders import EncoderCache, EncoderSpec

    enc = EncoderCache().get(
        EncoderSpec("tiktoken", "llama_models:llama3/tokenizer.model", pattern="llama3", specials="llama3")
    )
    import json

    assert counted.tool_tokens == enc.count(json.dumps(SEED_TOOLS, ensure_ascii=False))


def test_a_tokenizer_file_with_the_wrong_hash_is_refused(tmp_path: Path) -> None:
    operator = {
        "tokenizers": {
            "bad": {
                "kind": "sentencepiece",
                "file": "mistral_common:data/tokenizer.model.v1",
                "sha256": "0" * 64,
            }
        },
        "models": [{"match": "bad/model", "tokenizer": "bad", "format": "mistral-v3"}],
    }
    accountant = Accountant(Registry.load(operator=operator))
    with pytest.raises(TokenizerFileError, match="sha256"):
        accountant.count("bad/model", SEED_MESSAGES, None)


@pytest.mark.parametrize(
    ("operator", "message"),
    [
        ({"models": [{"match": "x", "tokenizer": "nope", "format": "mistral-v3"}]}, "unknown tokenizer"),
        ({"models": [{"match": "x", "tokenizer": "cl100k", "format": "gemma"}]}, "unknown format"),
        (
            {"models": [{"match": "x", "tokenizer": "cl100k", "format": "chat-template"}]},
            "needs a 'template'",
        ),
        ({"models": [{"match": "x"}]}, "needs 'match', 'tokenizer' and 'format'"),
        (
            {"models": [{"match": "x", "tokenizer": "cl100k", "format": "openai-functions", "colour": 1}]},
            "unknown key",
        ),
        ({"tokenizers": {"t": {"file": "x"}}}, "needs 'kind' and 'file'"),
    ],
)
def test_inconsistent_registry_is_a_clear_error(operator: dict[str, Any], message: str) -> None:
    with pytest.raises(RegistryError, match=message):
        Registry.load(operator=operator)


def test_missing_package_file_is_a_clear_error() -> None:
    with pytest.raises(TokenizerFileError, match="not installed"):
        resolve_file("no_such_package_xyz:data/file")


def test_unknown_models_are_refused_or_counted_by_the_fallback_as_estimates() -> None:
    registry = Registry.load()
    with pytest.raises(UnknownModel, match="no tokenizer"):
        Accountant(registry).count("nobody/unknown", SEED_MESSAGES, SEED_TOOLS)
    fallback = Accountant(registry, fallback_model="mistralai/Mistral-7B-Instruct-v0.3")
    counted = fallback.count("nobody/unknown", SEED_MESSAGES, SEED_TOOLS)
    assert (counted.prompt_tokens, counted.exact) == (95, False)

"""The model registry: which tokenizer and tool format a model's backend uses.

Built from ``tokenizers/models.toml`` (the shipped defaults) and the operator's entries (the
same tables in the gateway's config file), operator entries first. Profiles are built on first
use and kept; tokenizer files are loaded once per process by :class:`EncoderCache`.
"""

from __future__ import annotations

import fnmatch
import sys
import threading
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.accounting.chat_template import ChatTemplateFormat
from gateway.accounting.encoders import EncoderCache, EncoderSpec, TokenizerFileError, resolve_file
from gateway.accounting.llama_reference import LlamaReferenceFormat
from gateway.accounting.mistral import MistralFormat, MistralV1Format
from gateway.accounting.openai_functions import OpenAIFunctionsFormat
from gateway.accounting.types import Format

__all__ = ["DEFAULT_REGISTRY", "ModelProfile", "Registry", "RegistryError"]


def _default_registry() -> Path:
    """``tokenizers/models.toml`` of the source tree, or the copy a wheel installs under share/."""
    source = Path(__file__).resolve().parents[2] / "tokenizers" / "models.toml"
    if source.exists():
        return source
    return Path(sys.prefix) / "share" / "llm-metering-gateway" / "tokenizers" / "models.toml"


DEFAULT_REGISTRY = _default_registry()
FORMATS = (
    "mistral-v1",
    "mistral-v2",
    "mistral-v3",
    "mistral-v7",
    "chat-template",
    "llama3-reference",
    "openai-functions",
)


MATCH_CACHE_SIZE = 4096


class RegistryError(Exception):
    """The registry data is inconsistent (unknown tokenizer or format, missing template...)."""


@dataclass(frozen=True)
class ModelProfile:
    match: str
    tokenizer: str
    format_name: str
    format: Format
    exact: bool


@dataclass(frozen=True)
class _Entry:
    match: str
    tokenizer: str
    format: str
    base: Path
    template: str | None = None
    bos_token: str = ""
    eos_token: str = ""
    exact: bool | None = None


class Registry:
    def __init__(
        self,
        tokenizers: dict[str, EncoderSpec],
        entries: list[_Entry],
        cache: EncoderCache | None = None,
    ) -> None:
        self._tokenizers = tokenizers
        self._entries = entries
        self._cache = cache or EncoderCache()
        self._profiles: dict[int, ModelProfile] = {}
        self._matches: dict[str, int | None] = {}
        self._lock = threading.Lock()
        for entry in entries:
            if entry.tokenizer not in tokenizers:
                raise RegistryError(f"model {entry.match!r}: unknown tokenizer {entry.tokenizer!r}")
            if entry.format not in FORMATS:
                raise RegistryError(
                    f"model {entry.match!r}: unknown format {entry.format!r} ({', '.join(FORMATS)})"
                )
            if entry.format == "chat-template" and not entry.template:
                raise RegistryError(f"model {entry.match!r}: format chat-template needs a 'template' file")

    @classmethod
    def load(
        cls,
        *,
        default: Path | None = DEFAULT_REGISTRY,
        operator: dict[str, Any] | None = None,
        operator_base: Path | None = None,
    ) -> Registry:
        """Shipped defaults plus operator tables (``tokenizers`` and ``models``, as in models.toml)."""
        tokenizers: dict[str, EncoderSpec] = {}
        entries: list[_Entry] = []
        sources: list[tuple[dict[str, Any], Path]] = []
        if operator:
            sources.append((operator, operator_base or Path.cwd()))
        if default is not None:
            try:
                with default.open("rb") as fh:
                    sources.append((tomllib.load(fh), default.parent))
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise RegistryError(f"cannot read the model registry {default}: {exc}") from None
        for data, base in sources:
            for name, spec in (data.get("tokenizers") or {}).items():
                tokenizers.setdefault(name, _tokenizer_spec(name, spec, base))
            for raw in data.get("models") or []:
                entries.append(_entry(raw, base))
        return cls(tokenizers, entries)

    def _index(self, model: str) -> int | None:
        """The first entry matching ``model``, remembered: every request asks for its model."""
        if model in self._matches:
            return self._matches[model]
        found = next(
            (
                i
                for i, e in enumerate(self._entries)
                if e.match == model or fnmatch.fnmatchcase(model, e.match)
            ),
            None,
        )
        if len(self._matches) < MATCH_CACHE_SIZE:  # model names come from clients: bounded
            self._matches[model] = found
        return found

    def profile(self, model: str) -> ModelProfile | None:
        """The profile for ``model``: the first entry whose id or pattern matches, or None."""
        index = self._index(model)
        return None if index is None else self._profile(index, self._entries[index])

    def ready(self, model: str) -> bool:
        """True when ``model``'s profile is built (its tokenizer loaded): counting it is cheap."""
        index = self._index(model)
        return index is None or index in self._profiles

    def models(self) -> list[str]:
        return [e.match for e in self._entries]

    def knows(self, model: str) -> bool:
        """Whether an entry matches ``model`` (without loading its tokenizer)."""
        return self._index(model) is not None

    def warm(self, models: Iterable[str] | None = None) -> list[str]:
        """Load the tokenizers of ``models`` (every registered model's when None), so that
        their first requests count at once. Returns the entries built (their ids or patterns)."""
        indexes: list[int] = []
        for model in self.models() if models is None else models:
            index = self._index(model)
            if index is None:
                raise RegistryError(f"model {model!r} is not in the model registry")
            indexes.append(index)
        built = []
        for index in dict.fromkeys(indexes):
            entry = self._entries[index]
            if index not in self._profiles:
                self._profile(index, entry)
                built.append(entry.match)
        return built

    def _profile(self, index: int, entry: _Entry) -> ModelProfile:
        profile = self._profiles.get(index)
        if profile is None:
            with self._lock:
                profile = self._profiles.get(index) or self._build(entry)
                self._profiles[index] = profile
        return profile

    def _build(self, entry: _Entry) -> ModelProfile:
        encoder = self._cache.get(self._tokenizers[entry.tokenizer])
        fmt: Format
        exact = True
        if entry.format == "mistral-v1":
            fmt, exact = MistralV1Format(encoder), False
        elif entry.format.startswith("mistral-v"):
            fmt = MistralFormat(int(entry.format[len("mistral-v") :]), encoder)
        elif entry.format == "openai-functions":
            fmt = OpenAIFunctionsFormat(encoder)
        elif entry.format == "llama3-reference":
            fmt = LlamaReferenceFormat(encoder)
        else:
            assert entry.template is not None
            path = resolve_file(entry.template, entry.base)
            try:
                source = path.read_text()
            except OSError as exc:
                raise TokenizerFileError(f"cannot read chat template {path}: {exc.strerror}") from None
            fmt = ChatTemplateFormat(
                f"chat-template:{path.name}",
                source,
                encoder,
                bos_token=entry.bos_token,
                eos_token=entry.eos_token,
            )
        if entry.exact is not None:
            exact = exact and entry.exact
        return ModelProfile(entry.match, entry.tokenizer, fmt.name, fmt, exact)


def _tokenizer_spec(name: str, raw: Any, base: Path) -> EncoderSpec:
    if not isinstance(raw, dict) or "kind" not in raw or "file" not in raw:
        raise RegistryError(f"tokenizer {name!r} needs 'kind' and 'file'")
    file = str(raw["file"])
    if ":" not in file and not Path(file).is_absolute():
        file = str(base / file)
    return EncoderSpec(
        kind=str(raw["kind"]),
        file=file,
        sha256=raw.get("sha256"),
        pattern=raw.get("pattern"),
        specials=raw.get("specials"),
    )


def _entry(raw: Any, base: Path) -> _Entry:
    if not isinstance(raw, dict) or not {"match", "tokenizer", "format"} <= set(raw):
        raise RegistryError(f"a [[models]] entry needs 'match', 'tokenizer' and 'format': {raw!r}")
    unknown = set(raw) - {"match", "tokenizer", "format", "template", "bos_token", "eos_token", "exact"}
    if unknown:
        raise RegistryError(f"model {raw['match']!r}: unknown key(s) {', '.join(sorted(unknown))}")
    return _Entry(
        match=str(raw["match"]),
        tokenizer=str(raw["tokenizer"]),
        format=str(raw["format"]),
        base=base,
        template=raw.get("template"),
        bos_token=str(raw.get("bos_token", "")),
        eos_token=str(raw.get("eos_token", "")),
        exact=raw.get("exact"),
    )

"""Tokenizer files, loaded once per process and verified by sha256, behind one small interface.

Kinds:
- ``sentencepiece``: a SentencePiece model (Mistral v1/v2/v3/v7).
- ``tekken``: Mistral's tekken JSON (a tiktoken BPE with special tokens kept apart).
- ``tiktoken``: a ``.tiktoken`` rank file (cl100k_base; Llama 3's ``tokenizer.model``), with the
  split pattern named by ``pattern`` (``cl100k`` or ``llama3``).

File references are paths, or ``package:relative/path`` to a file shipped inside an installed
PyPI package (e.g. ``mistral_common:data/tokenizer.model.v1``). Nothing is ever downloaded.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from gateway.accounting.inline import spend

__all__ = ["Encoder", "EncoderCache", "TokenizerFileError", "resolve_file"]


class TokenizerFileError(Exception):
    """A tokenizer file is missing, unreadable or not the file it should be."""


class Encoder(Protocol):
    name: str

    def count(self, text: str) -> int:
        """Tokens in ``text``, encoded as ordinary text (no special tokens recognised)."""
        ...

    def count_rendered(self, text: str) -> int:
        """Tokens in a rendered prompt: the tokenizer's special tokens count as one token each."""
        ...

    def encode(self, text: str) -> list[int]: ...


# The split patterns tiktoken's own cl100k_base and Meta's Llama 3 tokenizer use.
CL100K_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""  # noqa: E501
LLAMA3_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"  # noqa: E501
PATTERNS = {"cl100k": CL100K_PATTERN, "llama3": LLAMA3_PATTERN}


def _llama3_specials(first_id: int) -> dict[str, int]:
    names = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
        "<|step_id|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
        "<|image|>",
    ]
    names += [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(names))]
    return {name: first_id + i for i, name in enumerate(names)}


def _cl100k_specials(first_id: int) -> dict[str, int]:
    return {
        "<|endoftext|>": 100257,
        "<|fim_prefix|>": 100258,
        "<|fim_middle|>": 100259,
        "<|fim_suffix|>": 100260,
        "<|endofprompt|>": 100276,
    }


SPECIALS = {"llama3": _llama3_specials, "cl100k": _cl100k_specials}


def resolve_file(ref: str, base: Path | None = None) -> Path:
    """A tokenizer file reference as a path (``package:path`` looks inside an installed package)."""
    if ":" in ref and not Path(ref).is_absolute():
        package, _, rel = ref.partition(":")
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise TokenizerFileError(
                f"tokenizer file {ref!r}: the package {package!r} is not installed (pip install it)"
            )
        # Namespace packages (tiktoken_ext) can span several folders: take the one holding the file.
        candidates = [Path(loc) / rel for loc in spec.submodule_search_locations]
        return next((c for c in candidates if c.exists()), candidates[0])
    path = Path(ref)
    if not path.is_absolute() and base is not None:
        path = base / path
    return path


def _read_verified(path: Path, sha256: str | None) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TokenizerFileError(f"cannot read tokenizer file {path}: {exc.strerror}") from None
    if sha256 is not None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256.lower():
            raise TokenizerFileError(f"tokenizer file {path} has sha256 {digest}, expected {sha256}")
    return data


class SentencePieceEncoder:
    def __init__(self, name: str, data: bytes) -> None:
        import sentencepiece

        self.name = name
        self._sp = sentencepiece.SentencePieceProcessor(model_proto=data)
        pieces = (self._sp.id_to_piece(i) for i in range(self._sp.get_piece_size()) if self._sp.is_control(i))
        self.specials = frozenset(p for p in pieces if p)

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def count(self, text: str) -> int:
        return len(self._sp.encode(text)) if text else 0


class TiktokenEncoder:
    def __init__(
        self, name: str, ranks: dict[bytes, int], pattern: str, specials: dict[str, int] | None = None
    ) -> None:
        import tiktoken

        self.name = name
        self.specials = frozenset(specials or ())
        # Special tokens are split off by CountingEncoder: the BPE core never needs them.
        self._enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens={})

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def count(self, text: str) -> int:
        return len(self._enc.encode_ordinary(text)) if text else 0


# Anything shaped like a special token; a match counts as one only if the tokenizer has it.
_SPECIAL_SHAPE = re.compile(r"<\|[^|<>\s]{1,64}\|>|\[/?[A-Za-z_0-9]{1,40}\]|</?s>|<unk>")
_PIPE_SHAPE = re.compile(r"<\|[^|<>\s]{1,64}\|>")  # tiktoken's <|...|> specials only: a faster scan
SEGMENT_CACHE_SIZE = 16384
SEGMENT_CACHE_MIN_CHARS = 32


class CountingEncoder:
    """A tokenizer with a cache of segment counts, and the count of a rendered prompt.

    Prompts are tokenized segment by segment (Mistral encodes each part on its own; a rendered
    template splits at its special tokens, as tokenizers do), and agents resend the same history
    and tools turn after turn: a repeated segment is counted once. Keys are (length, hash) of
    the text, so the cache holds no text; its size is bounded.
    """

    def __init__(self, inner: SentencePieceEncoder | TiktokenEncoder, size: int = SEGMENT_CACHE_SIZE) -> None:
        self.inner = inner
        self.name = inner.name
        self._size = size
        # Read without the lock (a dict lookup is atomic under the GIL; counts run in worker
        # threads too), written under it; the oldest entry goes first. A microsecond cheaper per
        # lookup than an ordered dict behind a lock, and an 80-message prompt makes 80 of them.
        self._counts: dict[tuple[int, int], int] = {}
        self._lock = threading.Lock()
        pipes_only = all(t.startswith("<|") and t.endswith("|>") for t in inner.specials)
        self._shape = _PIPE_SHAPE if pipes_only else _SPECIAL_SHAPE

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text)

    def count(self, text: str) -> int:
        if len(text) < SEGMENT_CACHE_MIN_CHARS:
            return self.inner.count(text)
        key = (len(text), hash(text))
        cached = self._counts.get(key)
        if cached is not None:
            return cached
        spend(len(text))  # may stop a count on the event loop: see inline.py
        count = self.inner.count(text)
        with self._lock:
            counts = self._counts
            counts[key] = count
            if len(counts) > self._size:
                del counts[next(iter(counts))]
        return count

    def count_rendered(self, text: str) -> int:
        specials = self.inner.specials
        total, start = 0, 0
        for match in self._shape.finditer(text):
            if match.group() in specials:
                total += self.count(text[start : match.start()]) + 1
                start = match.end()
        return total + self.count(text[start:])


def _tiktoken_ranks(data: bytes) -> dict[bytes, int]:
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _tekken_ranks(data: bytes) -> tuple[dict[bytes, int], str]:
    spec = json.loads(data)
    config = spec["config"]
    inner = config["default_vocab_size"] - config["default_num_special_tokens"]
    ranks = {base64.b64decode(t["token_bytes"]): t["rank"] for t in spec["vocab"][:inner]}
    return ranks, config["pattern"]


@dataclass(frozen=True)
class EncoderSpec:
    kind: str  # sentencepiece | tekken | tiktoken
    file: str
    sha256: str | None = None
    pattern: str | None = None  # tiktoken only: cl100k | llama3
    specials: str | None = None  # tiktoken only: the special-token set, cl100k | llama3


class EncoderCache:
    """Loads each tokenizer file once per process; thread-safe (loads may run off the event loop)."""

    def __init__(self, base: Path | None = None) -> None:
        self._base = base
        self._encoders: dict[EncoderSpec, CountingEncoder] = {}
        self._lock = threading.Lock()

    def get(self, spec: EncoderSpec) -> CountingEncoder:
        encoder = self._encoders.get(spec)
        if encoder is not None:
            return encoder
        with self._lock:
            encoder = self._encoders.get(spec)
            if encoder is None:
                encoder = CountingEncoder(self._load(spec))
                self._encoders[spec] = encoder
        return encoder

    def loaded(self, spec: EncoderSpec) -> bool:
        return spec in self._encoders

    def _load(self, spec: EncoderSpec) -> SentencePieceEncoder | TiktokenEncoder:
        path = resolve_file(spec.file, self._base)
        data = _read_verified(path, spec.sha256)
        name = path.name
        if spec.kind == "sentencepiece":
            return SentencePieceEncoder(name, data)
        if spec.kind == "tekken":
            ranks, pattern = _tekken_ranks(data)
            return TiktokenEncoder(name, ranks, pattern)
        if spec.kind == "tiktoken":
            found = PATTERNS.get(spec.pattern or "cl100k")
            if found is None:
                raise TokenizerFileError(f"unknown tiktoken pattern {spec.pattern!r} (cl100k or llama3)")
            ranks = _tiktoken_ranks(data)
            make_specials = SPECIALS.get(spec.specials or "")
            if spec.specials and make_specials is None:
                raise TokenizerFileError(f"unknown special-token set {spec.specials!r} (cl100k or llama3)")
            specials = make_specials(len(ranks)) if make_specials else None
            return TiktokenEncoder(name, ranks, found, specials)
        raise TokenizerFileError(f"unknown tokenizer kind {spec.kind!r} (sentencepiece, tekken or tiktoken)")

"""The real CLIP BPE tokenizer, built offline from the vocab file inside the open_clip_torch wheel.

The wheel is installed with --no-deps and never imported (open_clip needs torchvision); the gzip file is
found through importlib.metadata. Building the vocab follows CLIP's own SimpleTokenizer: 256 byte
symbols, the same with `</w>`, then one token per merge, then the two special tokens.
"""

from __future__ import annotations

import gzip
import importlib.metadata
from functools import lru_cache
from pathlib import Path

import numpy as np

from .errors import RuntimeUnavailableError

CLIP_MAX_LENGTH = 77
ALL_MERGES = 48_894  # the full CLIP vocab has 49,408 tokens


def padded_ids(tokenizer, texts: list[str]) -> np.ndarray:
    """int64 [N, L]: `texts` as the pipelines feed their text encoders (padded and truncated to the tokenizer's
    model_max_length)."""
    ids = tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
    return np.asarray(ids, dtype=np.int64)


def clip_bpe_path() -> Path:
    try:
        dist = importlib.metadata.distribution("open_clip_torch")
    except importlib.metadata.PackageNotFoundError as e:
        raise RuntimeUnavailableError(
            "tokenizer: the CLIP BPE vocab comes from the open_clip_torch wheel; "
            "install it with `pip install --no-deps open_clip_torch==3.3.0`"
        ) from e
    path = Path(dist.locate_file("open_clip/bpe_simple_vocab_16e6.txt.gz"))
    if not path.exists():
        raise RuntimeUnavailableError(f"tokenizer: {path} is missing from the open_clip_torch wheel")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


@lru_cache(maxsize=4)
def clip_vocab(num_merges: int = ALL_MERGES) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) with 512 + num_merges + 2 tokens: num_merges=486 gives exactly 1000."""
    lines = gzip.open(clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + min(num_merges, ALL_MERGES)]]
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def build_clip_tokenizer(vocab_size: int = 49_408):
    """A transformers CLIPTokenizer over the first `vocab_size` CLIP tokens (>= 514)."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab(vocab_size - 514)
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=CLIP_MAX_LENGTH,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )

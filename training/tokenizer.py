"""A CLIP tokenizer for the demo model, built in code: OpenAI CLIP's byte-level BPE over a tiny vocabulary.

Every byte is a token (alone and word-final), so any text still tokenizes; each word of the scene
grammar gets merges that make it a single token, so a prompt is one id per word. The result is a
plain ``CLIPTokenizer`` that ``save_pretrained`` writes and ``from_pretrained`` reads back.
"""

from __future__ import annotations

from functools import cache
from itertools import pairwise

from transformers import CLIPTokenizer

from training.scenes import vocabulary

MAX_TOKENS = 32  # a two-object prompt is under 30 words; 32 positions keep cross-attention small


@cache
def _byte_chars() -> tuple[str, ...]:
    """The 256 printable stand-ins byte-level BPE uses for raw bytes (the GPT-2 / CLIP table)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in kept}
    shifted = 256
    for b in range(256):
        if b not in table:
            table[b] = chr(shifted)
            shifted += 1
    return tuple(table[b] for b in range(256))


def _split(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encode ``pieces`` with the merges so far: join the lowest-ranked adjacent pair until none applies."""
    while len(pieces) > 1:
        rank, i = min((ranks.get(pair, len(ranks)), i) for i, pair in enumerate(pairwise(pieces)))
        if rank == len(ranks):
            break
        pieces = [*pieces[:i], pieces[i] + pieces[i + 1], *pieces[i + 2 :]]
    return pieces


def build_tokenizer(words: tuple[str, ...] = vocabulary(), max_length: int = MAX_TOKENS) -> CLIPTokenizer:
    """CLIP tokenizer whose vocabulary is the bytes, one token per word of ``words``, and the specials last.

    A word's merges are added after the shorter words' ("in" inside "pink"), joining what is left
    left to right, so each word ends as a single token whatever hides inside it.
    """
    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for char in _byte_chars():
            vocab[char + suffix] = len(vocab)
    ranks: dict[tuple[str, str], int] = {}
    for word in sorted(words, key=len):
        pieces = _split([*word[:-1], word[-1] + "</w>"], ranks)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            ranks.setdefault(pair, len(ranks))
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            pieces = [pair[0] + pair[1], *pieces[2:]]
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=list(ranks), pad_token="<|endoftext|>", model_max_length=max_length)

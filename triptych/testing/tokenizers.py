"""Tiny CLIP, T5, Gemma, Qwen and Mistral tokenizers, built in code from small vocabularies.

Each keeps its family's layout (special tokens, byte fallback, space marks, chat format) so the
pipelines treat it as the real one, while common prompt words get whole-word tokens: prompts
tokenize into a handful of ids, and nothing is ever downloaded.
"""

from __future__ import annotations

from functools import cache
from itertools import pairwise

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import CLIPTokenizer, GemmaTokenizer, Qwen2Tokenizer, T5Tokenizer, TokenizersBackend

# Words that get whole-word tokens, so common prompts tokenize into a handful of ids
# rather than one id per character (any other text still tokenizes, just longer).
_WORDS = tuple(
    word
    for line in (
        "a an the of in on at with and or to by for from is are",
        "photo picture painting drawing portrait landscape render image art style",
        "cat dog bird horse fish tree flower forest mountain river lake sea sky sun moon",
        "city street house car boat man woman child astronaut robot",
        "red green blue yellow black white dark light bright",
        "big small old new beautiful detailed high quality low blurry ugly",
    )
    for word in line.split()
)
# The characters the SentencePiece-style vocabularies spell other words with.
_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()&/"


@cache
def _byte_chars() -> tuple[str, ...]:
    """The 256 printable stand-ins byte-level BPE uses for raw bytes (GPT-2 / CLIP table)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in kept}
    shifted = 256
    for b in range(256):
        if b not in table:
            table[b] = chr(shifted)
            shifted += 1
    return tuple(table[b] for b in range(256))


def _apply_merges(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encode ``pieces``: repeatedly join the adjacent pair of lowest rank."""
    while len(pieces) > 1:
        rank, i = min((ranks.get(pair, len(ranks)), i) for i, pair in enumerate(pairwise(pieces)))
        if rank == len(ranks):
            break
        pieces = [*pieces[:i], pieces[i] + pieces[i + 1], *pieces[i + 2 :]]
    return pieces


def _add_word_merges(pieces: list[str], vocab: dict[str, int], ranks: dict[tuple[str, str], int]) -> None:
    """Add the merges (and merged tokens) that turn ``pieces`` into one token.

    The word is first split as the merges so far would split it, then what is left is
    joined left to right with new, lowest-priority merges; so each word ends as a single
    token even when shorter words ("to", "at") hide inside it.
    """
    pieces = _apply_merges(pieces, ranks)
    while len(pieces) > 1:
        pair = (pieces[0], pieces[1])
        ranks.setdefault(pair, len(ranks))
        vocab.setdefault(pair[0] + pair[1], len(vocab))
        pieces = [pair[0] + pair[1], *pieces[2:]]


def _byte_level_merges(vocab: dict[str, int], words: tuple[str, ...]) -> list[tuple[str, str]]:
    """Merges making each word one token after a space ("Ġ") and at the start of a line, as
    byte-level BPE without end-of-word marks (GPT-2, Qwen, Tekken) splits text."""
    space = _byte_chars()[ord(" ")]
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        _add_word_merges([space, *word], vocab, ranks)
        _add_word_merges(list(word), vocab, ranks)
    return list(ranks)


def clip_tokenizer(max_length: int = 77, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """Byte-level BPE CLIP tokenizer: every byte (alone and word-final), plus whole words.

    Laid out like OpenAI's vocab: byte tokens, then merges, then the two specials last.
    """
    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for char in _byte_chars():
            vocab[char + suffix] = len(vocab)
    ranks: dict[tuple[str, str], int] = {}
    for word in _WORDS:
        _add_word_merges([*word[:-1], word[-1] + "</w>"], vocab, ranks)
    for special in ("<|startoftext|>", "<|endoftext|>", pad_token):
        vocab.setdefault(special, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=list(ranks), pad_token=pad_token, model_max_length=max_length)


def t5_tokenizer() -> T5Tokenizer:
    """Unigram T5 tokenizer: specials first as in T5, then characters, then whole words.

    Scores are log-probabilities; whole words score higher than their spelled-out
    characters so the Viterbi split prefers them.
    """
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -4.0)]
    pieces += [(char, -8.0) for char in _CHARS]
    pieces += [("▁" + char, -7.0) for char in _CHARS]
    pieces += [("▁" + word, -3.0) for word in _WORDS]
    # extra_ids=0: the sentinel tokens are only for T5's span-corruption pretraining.
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def gemma_tokenizer() -> GemmaTokenizer:
    """SentencePiece-style BPE Gemma tokenizer with byte fallback, so any text encodes.

    Gemma marks spaces with "▁" (no dummy prefix) and prepends <bos>; ids follow Gemma's
    layout (pad, eos, bos, unk, mask, then the 256 byte tokens).
    """
    vocab = {token: i for i, token in enumerate(("<pad>", "<eos>", "<bos>", "<unk>", "<mask>"))}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for char in "▁" + _CHARS + "\n":
        vocab.setdefault(char, len(vocab))
    ranks: dict[tuple[str, str], int] = {}
    for word in _WORDS:
        _add_word_merges(["▁", *word], vocab, ranks)
    return GemmaTokenizer(vocab=vocab, merges=list(ranks), add_bos_token=True, model_max_length=8192)


# Words of QwenImagePipeline's fixed system prompt. The pipeline drops the first 34 token
# positions as "the template", counted for Qwen's real tokenizer; giving each word its own
# token here keeps that count right, so the prompt's own tokens are what remains.
_QWEN_TEMPLATE_WORDS = (
    *("system", "user", "assistant", "Describe", "the", "image", "by", "detailing", "color", "shape"),
    *("size", "texture", "quantity", "text", "spatial", "relationships", "of", "objects", "and", "background"),
)
_QWEN_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<think>",
    "</think>",
)
# Qwen3's chat format, reduced to what text-to-image pipelines render: a user turn, then
# the assistant header (with an empty think block when thinking is switched off).
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and not enable_thinking -%}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif -%}"
    "{%- endif -%}"
)


def qwen_tokenizer(chat_template: str | None = None) -> Qwen2Tokenizer:
    """Byte-level BPE Qwen2 tokenizer (no end-of-word marks; "Ġ" stands for a space)."""
    vocab = {char: i for i, char in enumerate(_byte_chars())}
    merges = _byte_level_merges(vocab, (*_QWEN_TEMPLATE_WORDS, *_WORDS))
    for token in _QWEN_SPECIALS:
        vocab.setdefault(token, len(vocab))
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
        chat_template=chat_template,
    )
    # Special tokens must not be split by the byte-level pre-tokenizer.
    tokenizer.add_special_tokens({"additional_special_tokens": list(_QWEN_SPECIALS)})
    return tokenizer


# Mistral's control tokens, in Tekken's id order (a prefix of its 1000 reserved ids).
_MISTRAL_SPECIALS = (
    "<unk>",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
    "[TOOL_CALLS]",
    "[IMG]",
    "<pad>",
    "[IMG_BREAK]",
    "[IMG_END]",
    "[PREFIX]",
    "[MIDDLE]",
    "[SUFFIX]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "[TOOL_CONTENT]",
)
# Mistral Small 3.1's chat format for text turns (content may be a string or a list of
# {"type": "text"} parts, as Flux2Pipeline sends).
_MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
    "{%- else -%}{%- set text = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') -%}{%- endif -%}"
    "{%- if message['role'] == 'system' -%}{{ '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' -%}{{ '[INST]' + text + '[/INST]' }}"
    "{%- else -%}{{ text + eos_token }}{%- endif -%}"
    "{%- endfor -%}"
)


def mistral_tokenizer() -> TokenizersBackend:
    """Byte-level BPE tokenizer laid out like Mistral's Tekken (controls, bytes, merges).

    A plain tokenizer with a chat template: the released FLUX.2 checkpoint ships a
    PixtralProcessor here, which needs torchvision; for text prompts the processor only
    forwards to its tokenizer, so the pipeline behaves the same.
    """
    vocab = {token: i for i, token in enumerate(_MISTRAL_SPECIALS)}
    for char in _byte_chars():
        vocab[char] = len(vocab)
    merges = _byte_level_merges(vocab, _WORDS)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return TokenizersBackend(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens=[t for t in _MISTRAL_SPECIALS if t.startswith("[")],
        chat_template=_MISTRAL_CHAT_TEMPLATE,
        model_max_length=131072,
    )

"""Map the words of a prompt to token positions of a CLIP BPE tokenizer.

Stable Diffusion encodes a prompt as ``tokenizer(prompt, padding="max_length",
max_length=tokenizer.model_max_length, truncation=True).input_ids``: position 0 holds BOS, the
prompt's tokens follow from position 1, then EOS and padding, ``model_max_length`` (normally 77)
positions in all. Cross-attention maps are indexed by these positions, so explaining "where does
the model look for *circle*" needs the positions of the word ``circle`` in that sequence.

CLIP's pre-tokenizer lowercases the prompt and cuts it into pieces with the regex
``'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+``; byte-pair encoding then turns
every piece into one or more tokens, independently of its neighbours. [`split_words`] reproduces
the pre-tokenizer, so each of its words owns a run of consecutive tokens. [`word_tokens`] checks
that the words' tokens, put end to end, are exactly the tokenizer's own ids for the prompt, and
raises otherwise: positions are never silently wrong.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field

_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


@dataclass
class WordTokens:
    """The tokens of one word of a prompt.

    Args:
        word: The word, lowercased, as returned by [`split_words`].
        occurrence: 0 the first time this word appears in the prompt, 1 the second time, ...
        index: Index of the word in `split_words(prompt)`.
        positions: Token positions of the word in the padded `input_ids` (BOS at 0, so the first
            word starts at 1), one per token, increasing by 1.
        tokens: The BPE token strings, e.g. `["d", "o", "g</w>"]`, one per position.
        truncated: True when some of the word's tokens lie at position `model_max_length - 1` or
            later, i.e. were cut off by the text encoder's limit (the positions are then where the
            tokens would have been).
    """

    word: str
    occurrence: int
    index: int
    positions: list[int] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    truncated: bool = False


def validate_prompt(prompt: str) -> str:
    """Return `prompt` unchanged; raise `ValueError` if it is not a string or is empty/whitespace only."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
    return prompt


def _char_kind(char: str) -> str:
    """'space', 'letter' (Unicode L*), 'number' (Unicode N*) or 'other', as CLIP's regex sees `char`."""
    if char.isspace():
        return "space"
    category = unicodedata.category(char)
    if category.startswith("L"):
        return "letter"
    if category.startswith("N"):
        return "number"
    return "other"


def split_words(prompt: str) -> list[str]:
    """Split `prompt` into words the way CLIP's pre-tokenizer does.

    The prompt is NFC-normalised and lowercased, then cut into: the contractions `'s 't 're 've 'm
    'll 'd`, runs of letters, single digits (CLIP encodes "12" as "1", "2"), and runs of other
    non-space characters (so `","` and `"!"` are words of their own, and `"!!"` is one word).

    Example: `"A red circle, and a box!"` -> `["a", "red", "circle", ",", "and", "a", "box", "!"]`.

    Args:
        prompt: Any string.

    Returns:
        The words in order; `[]` for an empty or whitespace-only prompt.
    """
    text = unicodedata.normalize("NFC", prompt).lower()
    words = []
    i = 0
    while i < len(text):
        kind = _char_kind(text[i])
        if kind == "space":
            i += 1
            continue
        contraction = next((c for c in _CONTRACTIONS if text.startswith(c, i)), None)
        if contraction is not None:
            end = i + len(contraction)
        elif kind == "number":
            end = i + 1
        else:
            end = i + 1
            while end < len(text) and _char_kind(text[end]) == kind:
                end += 1
        words.append(text[i:end])
        i = end
    return words


def word_tokens(tokenizer, prompt: str) -> list[WordTokens]:
    """The token positions of every word of `prompt`.

    Args:
        tokenizer: A CLIP BPE tokenizer (`transformers.CLIPTokenizer` or `CLIPTokenizerFast`), as
            `pipe.tokenizer` of a Stable Diffusion pipeline.
        prompt: The prompt, a non-empty string.

    Returns:
        One [`WordTokens`] per word of `split_words(prompt)`, in order. Positions index the padded
        `input_ids` of length `tokenizer.model_max_length`.

    Raises:
        ValueError: If `prompt` is not a non-empty string.
        RuntimeError: If the words' tokens, concatenated, differ from the tokenizer's ids for the
            whole prompt (a tokenizer that does not pre-tokenize like CLIP, or special-token text
            such as `<|endoftext|>` inside the prompt).
    """
    validate_prompt(prompt)
    words = split_words(prompt)
    per_word = tokenizer(words, add_special_tokens=False).input_ids
    whole = list(tokenizer(prompt, add_special_tokens=False).input_ids)
    joined = [token_id for ids in per_word for token_id in ids]
    if joined != whole:
        raise RuntimeError(
            f"cannot map the words of prompt {prompt!r} to tokens: tokenizing its words {words} one by one "
            f"gives ids {joined}, tokenizing the whole prompt gives {whole}; "
            f"{type(tokenizer).__name__} does not split text like CLIP's pre-tokenizer"
        )

    last_kept = tokenizer.model_max_length - 2  # the last position before EOS
    seen: dict[str, int] = {}
    result = []
    start = 1  # position 0 is BOS
    for index, (word, ids) in enumerate(zip(words, per_word)):
        positions = list(range(start, start + len(ids)))
        result.append(
            WordTokens(
                word=word,
                occurrence=seen.get(word, 0),
                index=index,
                positions=positions,
                tokens=list(tokenizer.convert_ids_to_tokens(list(ids))),
                truncated=bool(positions) and positions[-1] > last_kept,
            )
        )
        seen[word] = seen.get(word, 0) + 1
        start += len(ids)
    return result


def _find_phrase(words: list[str], phrase: list[str]) -> list[int]:
    """Start indices of the non-overlapping occurrences of `phrase` in `words`, left to right."""
    starts = []
    i = 0
    while i + len(phrase) <= len(words):
        if words[i : i + len(phrase)] == phrase:
            starts.append(i)
            i += len(phrase)
        else:
            i += 1
    return starts


def find_word(tokenizer, prompt: str, word: str, occurrence: int | None = None) -> list[int]:
    """The token positions of `word` in the padded `input_ids` of `prompt`.

    Args:
        tokenizer: A CLIP BPE tokenizer, see [`word_tokens`].
        prompt: The prompt, a non-empty string.
        word: A word of the prompt, or a phrase of consecutive words such as `"red circle"`;
            case-insensitive, split like the prompt by [`split_words`].
        occurrence: Which occurrence of `word` to take, 0 for the first; `None` takes all of them.
            Occurrences of a phrase are counted left to right without overlap.

    Returns:
        The positions of every token of the selected occurrence(s), increasing (for a phrase, the
        positions of its words in order).

    Raises:
        ValueError: If `word` is not in the prompt, `occurrence` is out of range, or the tokens of a
            selected occurrence were cut off by the text encoder's limit of
            `tokenizer.model_max_length` tokens.
    """
    words = word_tokens(tokenizer, prompt)
    if not isinstance(word, str) or not split_words(word):
        raise ValueError(f"word must be a non-empty string, got {word!r}")
    if occurrence is not None and (
        isinstance(occurrence, bool) or not isinstance(occurrence, int) or occurrence < 0
    ):
        raise ValueError(f"occurrence must be None (all occurrences) or an int >= 0, got {occurrence!r}")

    phrase = split_words(word)
    starts = _find_phrase([w.word for w in words], phrase)
    if not starts:
        raise ValueError(
            f"word {word!r} is not in prompt {prompt!r}; words: {', '.join(w.word for w in words)}"
        )
    if occurrence is not None:
        if occurrence >= len(starts):
            raise ValueError(
                f"occurrence {occurrence} of word {word!r} requested but prompt {prompt!r} has "
                f"{len(starts)} occurrence{'s' if len(starts) > 1 else ''} (0-{len(starts) - 1})"
            )
        starts = [starts[occurrence]]

    max_length = tokenizer.model_max_length
    positions = []
    for start in starts:
        span = words[start : start + len(phrase)]
        if any(w.truncated for w in span):
            cut = [p for w in span for p in w.positions if p > max_length - 2]
            raise ValueError(
                f"word {word!r} in prompt {prompt!r} falls at token positions {cut}, after position "
                f"{max_length - 2}, beyond the text encoder's limit of {max_length} tokens "
                f"(BOS+{max_length - 2}+EOS); shorten the prompt"
            )
        positions += [p for w in span for p in w.positions]
    return positions


def check_same_positions(tokenizers, prompt: str) -> list[WordTokens]:
    """Check that several tokenizers put every word of `prompt` at the same positions.

    SDXL encodes the prompt with two tokenizers (`pipe.tokenizer` and `pipe.tokenizer_2`) that share
    one BPE but differ in their pad token; word positions must agree for the attention maps of both
    text encoders to be read at the same indices.

    Args:
        tokenizers: A sequence of CLIP BPE tokenizers, e.g. `[pipe.tokenizer, pipe.tokenizer_2]`.
        prompt: The prompt, a non-empty string.

    Returns:
        The [`WordTokens`] of the first tokenizer.

    Raises:
        ValueError: If `tokenizers` is empty, or if any tokenizer gives some word other positions,
            another truncation, or another `model_max_length` than the first tokenizer.
    """
    tokenizers = list(tokenizers)
    if not tokenizers:
        raise ValueError("tokenizers must hold at least one tokenizer, got none")
    reference = word_tokens(tokenizers[0], prompt)
    for i, tokenizer in enumerate(tokenizers[1:], start=1):
        if tokenizer.model_max_length != tokenizers[0].model_max_length:
            raise ValueError(
                f"tokenizer {i} has model_max_length {tokenizer.model_max_length} but tokenizer 0 has "
                f"{tokenizers[0].model_max_length}"
            )
        for ours, theirs in zip(reference, word_tokens(tokenizer, prompt)):
            if ours.positions != theirs.positions or ours.truncated != theirs.truncated:
                raise ValueError(
                    f"tokenizers disagree on word {ours.word!r} (word {ours.index}) of prompt {prompt!r}: "
                    f"tokenizer 0 puts it at positions {ours.positions} as {ours.tokens}, tokenizer {i} at "
                    f"{theirs.positions} as {theirs.tokens}"
                )
    return reference

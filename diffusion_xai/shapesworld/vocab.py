"""Build the ShapesWorld CLIP tokenizer files (vocab.json, merges.txt).

The vocabulary holds every byte symbol (alone and word-final, as CLIP's does), so any word,
also one outside ShapesWorld, still tokenises into pieces; byte-pair merges are learned on the
ShapesWorld words until every one of them is a single token.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from .scene import vocabulary

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_symbols() -> list[str]:
    """The printable stand-in for every byte, in CLIP's (GPT-2's) byte-to-unicode order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(
        range(ord("\xae"), ord("\xff") + 1))
    codes = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Greedy BPE on ``words`` until each word is one symbol (ties broken alphabetically)."""
    seqs = [list(w[:-1]) + [w[-1] + "</w>"] for w in words]
    merges: list[tuple[str, str]] = []
    while True:
        pairs = Counter((s[i], s[i + 1]) for s in seqs for i in range(len(s) - 1))
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        for s in seqs:
            i = 0
            while i < len(s) - 1:
                if (s[i], s[i + 1]) == best:
                    s[i:i + 2] = [joined]
                i += 1


def write_tokenizer_files(folder: str | Path, extra_words: list[str] | None = None) -> Path:
    """Write vocab.json, merges.txt and the tokenizer configs into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    words = sorted(set(vocabulary()) | set(extra_words or []) | {","})
    merges = learn_merges(words)
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols]
    for a, b in merges:
        tokens.append(a + b)
    tokens += [BOS, EOS]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
        "bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS,
        "clean_up_tokenization_spaces": False}))
    return folder

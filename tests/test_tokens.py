"""Word -> token position mapping, checked against a real (small) CLIP BPE tokenizer."""

import json

import pytest
from transformers import CLIPTokenizer

from diffusion_xai.shapesworld.vocab import write_tokenizer_files
from diffusion_xai.tokens import (
    WordTokens,
    check_same_positions,
    find_word,
    split_words,
    validate_prompt,
    word_tokens,
)


def _write(folder, pad_token=None, extra_words=None):
    write_tokenizer_files(folder, extra_words=extra_words)
    if pad_token is not None:
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            config = json.loads((folder / name).read_text())
            config["pad_token"] = pad_token
            (folder / name).write_text(json.dumps(config))
    return CLIPTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def sdxl_tokenizers(tmp_path_factory):
    """Two tokenizers with one BPE, the second with pad token "!" as SDXL's tokenizer_2."""
    first = _write(tmp_path_factory.mktemp("clip_1"))
    second = _write(tmp_path_factory.mktemp("clip_2"), pad_token="!")
    assert second.pad_token == "!" and first.pad_token == "<|endoftext|>"
    return first, second


@pytest.fixture(scope="module")
def sdxl_tokenizers_bang(tmp_path_factory):
    """As `sdxl_tokenizers`, with "!!" merged into one token: the second tokenizer splits it at its pad "!"."""
    first = _write(tmp_path_factory.mktemp("clip_bang_1"), extra_words=["!!"])
    second = _write(tmp_path_factory.mktemp("clip_bang_2"), pad_token="!", extra_words=["!!"])
    return first, second


def _padded_ids(tokenizer, prompt):
    """The ids Stable Diffusion feeds its text encoder."""
    return tokenizer(
        prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True
    ).input_ids


def _token_at(tokenizer, prompt, positions):
    ids = _padded_ids(tokenizer, prompt)
    return tokenizer.convert_ids_to_tokens([ids[p] for p in positions])


# split_words / validate_prompt


@pytest.mark.parametrize(
    "prompt, words",
    [
        ("a red circle, and a box!", ["a", "red", "circle", ",", "and", "a", "box", "!"]),
        ("A  Red\tCIRCLE", ["a", "red", "circle"]),
        ("the dog's box", ["the", "dog", "'s", "box"]),
        ("red-circle!!", ["red", "-", "circle", "!!"]),
        ("12 boxes", ["1", "2", "boxes"]),
        ("café2x", ["café", "2", "x"]),
        ("   ", []),
    ],
)
def test_split_words(prompt, words):
    assert split_words(prompt) == words


def test_validate_prompt():
    assert validate_prompt("a red circle") == "a red circle"
    with pytest.raises(ValueError, match=r"prompt must be a non-empty string, got ''"):
        validate_prompt("")
    with pytest.raises(ValueError, match=r"prompt must be a non-empty string, got '  \\n'"):
        validate_prompt("  \n")
    with pytest.raises(ValueError, match=r"prompt must be a non-empty string, got None"):
        validate_prompt(None)
    with pytest.raises(ValueError, match=r"prompt must be a non-empty string, got \['a'\]"):
        validate_prompt(["a"])


# word_tokens


def test_single_token_words(tokenizer):
    prompt = "a red circle on the left square"
    words = word_tokens(tokenizer, prompt)
    assert [w.word for w in words] == ["a", "red", "circle", "on", "the", "left", "square"]
    assert [w.positions for w in words] == [[1], [2], [3], [4], [5], [6], [7]]
    assert [w.index for w in words] == list(range(7))
    assert [w.tokens for w in words] == [[f"{w.word}</w>"] for w in words]
    assert not any(w.truncated for w in words)
    ids = _padded_ids(tokenizer, prompt)
    assert ids[0] == tokenizer.bos_token_id and ids[8] == tokenizer.eos_token_id
    for w in words:
        assert _token_at(tokenizer, prompt, w.positions) == w.tokens


def test_word_outside_vocabulary_splits_and_shifts(tokenizer):
    prompt = "a dog and a red circle"
    words = word_tokens(tokenizer, prompt)
    dog = words[1]
    assert dog == WordTokens(word="dog", occurrence=0, index=1, positions=[2, 3, 4], tokens=["d", "o", "g</w>"])
    assert [w.positions for w in words] == [[1], [2, 3, 4], [5], [6], [7], [8]]
    assert _token_at(tokenizer, prompt, [2, 3, 4]) == ["d", "o", "g</w>"]
    assert _token_at(tokenizer, prompt, find_word(tokenizer, prompt, "circle")) == ["circle</w>"]
    assert find_word(tokenizer, prompt, "circle") == [8]
    assert _padded_ids(tokenizer, prompt)[9] == tokenizer.eos_token_id


def test_punctuation(tokenizer):
    prompt = "a red circle, and a box!"
    words = word_tokens(tokenizer, prompt)
    assert [(w.word, w.positions) for w in words] == [
        ("a", [1]), ("red", [2]), ("circle", [3]), (",", [4]), ("and", [5]), ("a", [6]), ("box", [7]), ("!", [8]),
    ]
    assert _token_at(tokenizer, prompt, [4, 8]) == [",</w>", "!</w>"]
    assert find_word(tokenizer, prompt, ",") == [4]
    assert find_word(tokenizer, prompt, "box!") == [7, 8]


def test_contraction_and_digits(tokenizer):
    prompt = "the dog's 12 boxes"
    words = word_tokens(tokenizer, prompt)
    assert [(w.word, w.positions) for w in words] == [
        ("the", [1]), ("dog", [2, 3, 4]), ("'s", [5, 6]), ("1", [7]), ("2", [8]), ("boxes", words[-1].positions),
    ]
    assert words[-1].positions[0] == 9
    for w in words:
        assert _token_at(tokenizer, prompt, w.positions) == w.tokens


def test_repeated_words_occurrence(tokenizer):
    prompt = "a red circle and a blue circle and a square"
    words = word_tokens(tokenizer, prompt)
    assert [(w.word, w.occurrence) for w in words] == [
        ("a", 0), ("red", 0), ("circle", 0), ("and", 0), ("a", 1), ("blue", 0), ("circle", 1), ("and", 1),
        ("a", 2), ("square", 0),
    ]
    assert find_word(tokenizer, prompt, "circle") == [3, 7]
    assert find_word(tokenizer, prompt, "circle", occurrence=0) == [3]
    assert find_word(tokenizer, prompt, "circle", occurrence=1) == [7]
    assert find_word(tokenizer, prompt, "a") == [1, 5, 9]
    assert find_word(tokenizer, prompt, "a", occurrence=2) == [9]


def test_case_insensitive(tokenizer):
    prompt = "A Red CIRCLE"
    assert [w.word for w in word_tokens(tokenizer, prompt)] == ["a", "red", "circle"]
    assert find_word(tokenizer, prompt, "circle") == [3]
    assert find_word(tokenizer, prompt, "Circle") == [3]
    assert find_word(tokenizer, "a red circle", "RED") == [2]


def test_phrases(tokenizer):
    prompt = "a red circle and a red dog and a red circle"
    assert find_word(tokenizer, prompt, "red circle") == [2, 3, 12, 13]
    assert find_word(tokenizer, prompt, "red circle", occurrence=1) == [12, 13]
    assert find_word(tokenizer, prompt, "Red  Dog") == [6, 7, 8, 9]
    with pytest.raises(ValueError, match=r"word 'circle red' is not in prompt"):
        find_word(tokenizer, prompt, "circle red")


# limits of the text encoder


def test_long_prompt(tokenizer):
    assert tokenizer.model_max_length == 77
    # 74 "a" fill positions 1-74; "circle" is at 75, the last one kept before EOS; the rest is cut off.
    prompt = "a " * 74 + "circle square dog"
    words = word_tokens(tokenizer, prompt)
    assert [(w.word, w.positions, w.truncated) for w in words[-3:]] == [
        ("circle", [75], False), ("square", [76], True), ("dog", [77, 78, 79], True),
    ]
    ids = _padded_ids(tokenizer, prompt)
    assert len(ids) == 77 and ids[76] == tokenizer.eos_token_id
    assert find_word(tokenizer, prompt, "a", occurrence=0) == [1]
    assert find_word(tokenizer, prompt, "circle") == [75]
    assert _token_at(tokenizer, prompt, [75]) == ["circle</w>"]
    message = (
        r"word 'square' in prompt 'a a .* square dog' falls at token positions \[76\], after position 75, "
        r"beyond the text encoder's limit of 77 tokens \(BOS\+75\+EOS\); shorten the prompt"
    )
    with pytest.raises(ValueError, match=message):
        find_word(tokenizer, prompt, "square")
    with pytest.raises(ValueError, match=r"word 'dog' .* falls at token positions \[77, 78, 79\]"):
        find_word(tokenizer, prompt, "dog")
    with pytest.raises(ValueError, match=r"word 'circle square' .* falls at token positions \[76\]"):
        find_word(tokenizer, prompt, "circle square")


def test_word_partly_cut_off(tokenizer):
    # "dog" takes positions 75, 76, 77: only its first piece is kept, so it is cut off.
    prompt = "a " * 74 + "dog"
    dog = word_tokens(tokenizer, prompt)[-1]
    assert dog.positions == [75, 76, 77] and dog.truncated
    with pytest.raises(ValueError, match=r"word 'dog' .* falls at token positions \[76, 77\], after position 75"):
        find_word(tokenizer, prompt, "dog")


def test_all_occurrences_with_one_cut_off(tokenizer):
    prompt = "circle " + "a " * 74 + "circle"
    assert find_word(tokenizer, prompt, "circle", occurrence=0) == [1]
    with pytest.raises(ValueError, match=r"falls at token positions \[76\]"):
        find_word(tokenizer, prompt, "circle")


# errors


def test_unknown_word_error(tokenizer):
    with pytest.raises(ValueError) as error:
        find_word(tokenizer, "a red circle", "dog")
    assert str(error.value) == "word 'dog' is not in prompt 'a red circle'; words: a, red, circle"


def test_bad_occurrence_error(tokenizer):
    prompt = "a red circle and a square"
    with pytest.raises(ValueError) as error:
        find_word(tokenizer, prompt, "a", occurrence=2)
    assert str(error.value) == (
        "occurrence 2 of word 'a' requested but prompt 'a red circle and a square' has 2 occurrences (0-1)"
    )
    with pytest.raises(ValueError, match=r"occurrence 1 of word 'red' .* has 1 occurrence \(0-0\)"):
        find_word(tokenizer, prompt, "red", occurrence=1)
    with pytest.raises(ValueError, match=r"occurrence must be None \(all occurrences\) or an int >= 0, got -1"):
        find_word(tokenizer, prompt, "a", occurrence=-1)
    with pytest.raises(ValueError, match=r"got True"):
        find_word(tokenizer, prompt, "a", occurrence=True)


def test_empty_prompt_and_word_errors(tokenizer):
    with pytest.raises(ValueError, match=r"prompt must be a non-empty string, got ''"):
        word_tokens(tokenizer, "")
    with pytest.raises(ValueError, match=r"prompt must be a non-empty string, got ' '"):
        find_word(tokenizer, " ", "a")
    with pytest.raises(ValueError, match=r"word must be a non-empty string, got ''"):
        find_word(tokenizer, "a red circle", "")


def test_mismatch_raises(tokenizer):
    # Special-token text is one token for the tokenizer but three words for CLIP's pre-tokenizer.
    with pytest.raises(RuntimeError, match=r"cannot map the words of prompt 'a <\|endoftext\|> circle'"):
        word_tokens(tokenizer, "a <|endoftext|> circle")


# SDXL: two tokenizers


def test_check_same_positions_agree(sdxl_tokenizers):
    first, second = sdxl_tokenizers
    prompt = "a red circle, and a dog!"
    # The pad token "!" of the second tokenizer changes the id of "!" but not any position.
    assert first(prompt).input_ids != second(prompt).input_ids
    words = check_same_positions([first, second], prompt)
    assert [w.positions for w in words] == [[1], [2], [3], [4], [5], [6], [7, 8, 9], [10]]
    assert words == word_tokens(first, prompt)
    assert find_word(second, prompt, "dog") == find_word(first, prompt, "dog") == [7, 8, 9]


def test_check_same_positions_disagree(sdxl_tokenizers_bang):
    first, second = sdxl_tokenizers_bang
    # "!!" is one token for the first tokenizer, two pad tokens "!" for the second.
    assert first.convert_ids_to_tokens(first("!!", add_special_tokens=False).input_ids) == ["!!</w>"]
    assert second.convert_ids_to_tokens(second("!!", add_special_tokens=False).input_ids) == ["!", "!"]
    assert check_same_positions([first, second], "a red circle!")[3].positions == [4]
    message = (
        r"tokenizers disagree on word '!!' \(word 3\) of prompt 'a red circle!! and a square': "
        r"tokenizer 0 puts it at positions \[4\] as \['!!</w>'\], tokenizer 1 at \[4, 5\] as \['!', '!'\]"
    )
    with pytest.raises(ValueError, match=message):
        check_same_positions([first, second], "a red circle!! and a square")
    with pytest.raises(ValueError, match=r"tokenizers must hold at least one tokenizer"):
        check_same_positions([], "a red circle")

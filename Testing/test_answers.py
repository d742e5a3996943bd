"""Reading answers at the token level: P(yes) over every single-token spelling, box confidence over numbers."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from backend.answers import to_slice_result, yes_no_token_ids, yes_probability
from backend.tiny import build_tiny_sentencepiece
from backend.tokenizer import UpstreamLlamaTokenizer


@pytest.fixture(scope="module")
def rich_tokenizer(tmp_path_factory):
    """A tiny LLaMA-like tokenizer with room for whole-word pieces: '▁yes', '▁Yes', 'Yes', '▁no', 'no', ..."""
    return UpstreamLlamaTokenizer(build_tiny_sentencepiece(tmp_path_factory.mktemp("rich"), vocab_size=800))


@pytest.fixture(scope="module")
def split_word_tokenizer(tmp_path_factory):
    """A LLaMA-like SentencePiece model that never saw "yes" or "no" as words: it spells both in several pieces."""
    import io

    import sentencepiece as spm

    from backend.tiny import _DETERMINISM_OPTIONS, _LLAMA_LIKE_OPTIONS

    corpus = ["give me the location of the pancreas", "you yet young", "not new now", "$$ $$ 0123456789 {<>}"] * 20
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=model, vocab_size=300,
                                   hard_vocab_limit=False, **_LLAMA_LIKE_OPTIONS, **_DETERMINISM_OPTIONS)
    path = tmp_path_factory.mktemp("split") / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return UpstreamLlamaTokenizer(path)


@pytest.fixture(scope="module")
def demo_tokenizer():
    from pathlib import Path
    return UpstreamLlamaTokenizer(Path(__file__).parents[1] / "backend" / "demo_model" / "model" /
                                  "tokenizer.model")


def _logits(tokenizer, probabilities: dict[str, float]) -> torch.Tensor:
    """First-token logits [V] giving each named piece its probability, the rest spread over the vocabulary."""
    rest = (1.0 - sum(probabilities.values())) / (tokenizer.vocab_size - len(probabilities))
    p = torch.full((tokenizer.vocab_size,), rest)
    for piece, value in probabilities.items():
        p[tokenizer.piece_to_id(piece)] = value
    return p.log()


def test_p_yes_sums_every_single_token_spelling_of_yes_and_of_no(rich_tokenizer):
    yes_ids, no_ids = yes_no_token_ids(rich_tokenizer)
    pieces = {word: {rich_tokenizer.id_to_piece(i) for i in ids} for word, ids in (("yes", yes_ids), ("no", no_ids))}
    assert pieces == {"yes": {"\u2581yes", "\u2581Yes", "Yes"}, "no": {"\u2581no", "no", "\u2581No", "No", "NO"}}
    # the model says "Yes" (capitalised) with 0.5 and "▁no" with 0.2: P(yes) = (0.1 + 0.4) / (0.1 + 0.4 + 0.2),
    # where reading "▁yes" against "▁no" alone gave 0.1 / 0.3 = 0.33: a yes read as a no
    # (the rest on "▁", which starts neither word)
    logits = _logits(rich_tokenizer, {"\u2581yes": 0.1, "\u2581Yes": 0.3, "Yes": 0.1, "\u2581no": 0.2,
                                      "\u2581": 0.2999})
    assert yes_probability(logits, yes_ids, no_ids) == pytest.approx(0.5 / 0.7, abs=1e-4)


def test_the_demo_model_reads_yes_and_no_as_whole_words(demo_tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="backend.answers"):
        yes_ids, no_ids = yes_no_token_ids(demo_tokenizer)
    assert [demo_tokenizer.id_to_piece(i) for i in yes_ids] == ["\u2581yes"]
    assert {demo_tokenizer.id_to_piece(i) for i in no_ids} == {"\u2581no", "no"}
    assert "single token" not in caplog.text


def test_a_word_of_several_pieces_is_read_from_its_first_piece_with_a_warning(split_word_tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="backend.answers"):
        yes_ids, no_ids = yes_no_token_ids(split_word_tokenizer)
    first = [split_word_tokenizer.id_to_piece(split_word_tokenizer.encode(word)[0]) for word in ("yes", "no")]
    assert [split_word_tokenizer.id_to_piece(i) for i in yes_ids + no_ids] == first
    assert "'no' is no single token of this tokenizer" in caplog.text and "approximate" in caplog.text


def test_box_confidence_is_read_from_the_number_tokens_only(demo_tokenizer):
    answer = "{<12><34><56><78>}"
    ids = demo_tokenizer.encode(" " + answer) + [demo_tokenizer.eos_id]
    pieces = [demo_tokenizer.id_to_piece(i) for i in ids]
    # structural pieces ("{", "<", ">", "}", EOS) near certain, every digit at probability 0.5
    logprobs = [math.log(0.5) if piece.strip("\u2581").isdigit() else math.log(0.999) for piece in pieces]
    assert sum(piece.strip("\u2581").isdigit() for piece in pieces) == 8  # split digits: one piece per digit
    result = to_slice_result(answer, ids, logprobs, demo_tokenizer, 200, 100)
    # over every token of the box the structural ones pulled it to about 0.7; over the numbers it is 0.5
    assert result.boxes[0].confidence == pytest.approx(0.5)

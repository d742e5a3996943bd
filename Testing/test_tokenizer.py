"""The upstream (transformers 4.30 slow, legacy) LLaMA tokenizer on a tiny real SentencePiece model."""

from __future__ import annotations

import numpy as np
import pytest
import sentencepiece as spm

from backend import prompts
from backend.tiny import build_tiny_sentencepiece
from backend.tokenizer import MODEL_FILE_NAME, TokenizerError, UpstreamLlamaTokenizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    build_tiny_sentencepiece(folder)
    return folder


@pytest.fixture(scope="module")
def tok(tiny_dir) -> UpstreamLlamaTokenizer:
    return UpstreamLlamaTokenizer.from_dir(tiny_dir)


def pieces(tok: UpstreamLlamaTokenizer, ids: list[int]) -> list[str]:
    return [tok.id_to_piece(i) for i in ids]


def test_special_ids_and_pad_piece(tok):
    assert (tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.id_to_piece(tok.pad_id) == "$$"
    assert tok.pad_id not in (0, 1, 2)
    assert tok.vocab_size == 400
    # "$$" is an ordinary piece: SentencePiece itself produces it inside text.
    assert tok.pad_id in tok.sp.encode("1$$2")


def test_inference_segment_zero_has_two_bos_and_prefixed_bracket(tok):
    segment0, _ = prompts.split_on_image(prompts.inference_prompt("[refer] where is the pancreas ?"))
    assert segment0 == "<s>[INST] <Img>"
    ids = tok.encode(segment0, add_bos=True)
    assert ids[:2] == [1, 1]
    assert ids[2:] == tok.sp.encode("[INST] <Img>")
    # The piece after the BOS pair carries the dummy prefix, as 4.30 gave it ("▁[" = 518 in LLaMA-2).
    assert pieces(tok, ids[2:]) == ["▁[", "INST", "]", "▁<", "Img", ">"]


def test_every_chunk_gets_its_own_dummy_prefix(tok):
    ids = tok.encode("</s><s>[INST] q2")
    assert ids == [2, 1] + tok.sp.encode("[INST] q2")
    assert tok.id_to_piece(ids[2]) == "▁["
    # Text on both sides of a special token is encoded separately: "a" and "b" each get a "▁".
    assert tok.encode("a</s>b") == tok.sp.encode("a") + [2] + tok.sp.encode("b")
    assert "".join(pieces(tok, tok.encode("a</s>b"))) == "▁a</s>▁b"


def test_space_after_special_token_is_kept_legacy_style(tok):
    ids = tok.encode("a<s> b")
    assert ids == tok.sp.encode("a") + [1] + tok.sp.encode(" b")
    # The chunk " b" is dummy prefix + the space itself: two "▁" before "b".
    assert "".join(pieces(tok, ids[ids.index(1) + 1 :])) == "▁▁b"
    # No whitespace is stripped on either side of a special token (AddedToken lstrip/rstrip False).
    assert tok.encode("x </s> y") == tok.sp.encode("x ") + [2] + tok.sp.encode(" y")


def test_literal_specials_and_pad_text(tok):
    assert tok.encode("<unk>") == [0]
    assert tok.encode("<s>", add_bos=True) == [1, 1]
    assert tok.encode("") == [] and tok.encode("", add_bos=True) == [1]
    # "$$" is not split out: it became the pad after loading, so SentencePiece segments it in context.
    assert tok.encode("1$$2") == tok.sp.encode("1$$2")
    answer_ids = tok.encode(prompts.training_answer("{<12><34><56><78>}"))
    assert answer_ids[-1] == 2 and answer_ids[:-1] == tok.sp.encode("{<12><34><56><78>}")


def test_decode_skipping_special_tokens(tok):
    ids = [1, 1] + tok.encode("[INST] hi there") + [2, tok.pad_id, 0]
    assert tok.decode(ids) == "[INST] hi there"
    assert tok.decode(tok.encode("{<5><60><7><99>}</s>")) == "{<5><60><7><99>}"
    assert tok.decode(np.array([2, 2], dtype=np.int64)) == ""


def test_decode_without_skipping_uses_the_4_30_spacing_rule(tok):
    hi = tok.encode("hi")
    assert tok.decode([1] + hi + [2], skip_special_tokens=False) == "<s> hi</s>"
    assert tok.decode([1, 1] + tok.encode("[INST]"), skip_special_tokens=False) == "<s><s>[INST]"
    assert tok.decode(tok.encode("a") + [2, 1] + tok.encode("b"), skip_special_tokens=False) == " a</s><s>b"
    assert tok.decode(tok.encode("1$$2"), skip_special_tokens=False) == " 1$$2"


@pytest.mark.parametrize("text", ["é", "😀", "pancréas 😀 tumor"])
def test_byte_fallback_round_trip(tok, text):
    ids = tok.encode(text)
    assert any(tok.sp.is_byte(i) for i in ids)
    assert tok.decode(ids) == text


def test_byte_run_is_decoded_as_one_even_across_skipped_specials(tok):
    c3, a9 = tok.piece_to_id("<0xC3>"), tok.piece_to_id("<0xA9>")
    assert tok.decode([c3, 1, a9]) == "é"


def test_prompt_text_round_trips(tok):
    for text in (prompts.training_instruction(prompts.TC_EVAL_PROMPT), prompts.refer_eval_instruction("liver")):
        assert tok.decode(tok.encode(text)) == text


def test_right_padded_answer_batch(tok):
    texts = ["yes</s>", "{<12><34><56><78>}</s>"]
    ids, attention = tok.encode_batch_right_padded(texts, max_length=1024)
    rows = [tok.encode(t) for t in texts]
    width = max(len(r) for r in rows)
    assert ids.shape == attention.shape == (2, width)
    assert ids[0].tolist() == rows[0] + [tok.pad_id] * (width - len(rows[0]))
    assert attention[0].tolist() == [1] * len(rows[0]) + [0] * (width - len(rows[0]))
    assert ids[1].tolist() == rows[1] and attention[1].all()


def test_right_padded_batch_truncates_and_counts_bos(tok):
    ids, attention = tok.encode_batch_right_padded(["{<12><34><56><78>}</s>", "no"], max_length=3)
    assert ids.shape == (2, 3)
    assert ids[0].tolist() == tok.encode("{<12><34><56><78>}")[:3]
    ids_bos, _ = tok.encode_batch_right_padded(["{<12><34><56><78>}"], max_length=3, add_bos=True)
    assert ids_bos[0].tolist() == [1] + tok.encode("{<12><34><56><78>}")[:2]
    with pytest.raises(TokenizerError):
        tok.encode_batch_right_padded([], max_length=4)
    with pytest.raises(TokenizerError):
        tok.encode_batch_right_padded(["a"], max_length=0)


def test_save_copies_the_model_exactly(tok, tiny_dir, tmp_path):
    saved = tok.save(tmp_path / "out")
    assert saved.read_bytes() == (tiny_dir / MODEL_FILE_NAME).read_bytes()
    again = UpstreamLlamaTokenizer.from_dir(tmp_path / "out")
    assert again.encode("<s>[INST] x") == tok.encode("<s>[INST] x")


def test_tiny_model_is_deterministic(tiny_dir, tmp_path):
    rebuilt = build_tiny_sentencepiece(tmp_path)
    assert rebuilt.read_bytes() == (tiny_dir / MODEL_FILE_NAME).read_bytes()


def test_clear_errors_for_bad_folders_and_files(tmp_path, tok):
    with pytest.raises(TokenizerError, match=str(tmp_path)):
        UpstreamLlamaTokenizer.from_dir(tmp_path)
    (tmp_path / MODEL_FILE_NAME).write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        UpstreamLlamaTokenizer.from_dir(tmp_path)
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


def test_model_without_pad_piece_pads_with_unk_as_upstream(tmp_path):
    model_file = tmp_path / MODEL_FILE_NAME
    lines = ["the pancreas is here", "where is the liver", "give me the location"] * 5
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(tmp_path / "m"), vocab_size=30, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
    )
    (tmp_path / "m.model").rename(model_file)
    with pytest.warns(UserWarning, match=r"\$\$"):
        tok = UpstreamLlamaTokenizer(model_file)
    # transformers 4.30: `pad_token = "$$"` on such a vocabulary gives pad_token_id 0 (<unk>), checked by hand.
    assert tok.pad_id == tok.unk_id == 0
    ids, attention = tok.encode_batch_right_padded(["the liver", "the pancreas is here"], max_length=64)
    assert ids[0, attention[0] == 0].tolist() == [0] * int((attention[0] == 0).sum())


def test_tiny_vocab_size_out_of_range_is_refused(tmp_path):
    with pytest.raises(ValueError, match="between"):
        build_tiny_sentencepiece(tmp_path, vocab_size=100)
    assert not (tmp_path / MODEL_FILE_NAME).exists()


def test_transformers_legacy_tokenizer_agrees_where_it_should(tok, tiny_dir):
    """transformers' LlamaTokenizer(legacy=True) matches 4.30 on upstream segments whose chunks do not start with
    whitespace. Known differences (docs/upstream.md 9.1), not tested here: chunks that start with whitespace (at
    the start, or right after a literal <s>/</s>), and decoding of broken byte-fallback runs."""
    transformers = pytest.importorskip("transformers")
    try:
        # add_bos_token=True is what a LLaMA-2 folder's tokenizer_config.json says; the tiny folder has none.
        reference = transformers.LlamaTokenizer.from_pretrained(str(tiny_dir), legacy=True, add_bos_token=True)
    except Exception as error:  # construction API differs between versions: skip, do not fail
        pytest.skip(f"transformers LlamaTokenizer could not be built from tokenizer.model: {error}")
    chat = prompts.chat_prompt(["[refer] where is the pancreas ?", "[vqa] is it there?"])
    # Inference tokenizes segment 0 with special tokens (BOS added); training adds the BOS as an embedding.
    segment_sets = [
        (prompts.split_on_image(prompts.inference_prompt(prompts.refer_eval_instruction("pancreas"))), True),
        (prompts.split_on_image(chat), True),
        (prompts.split_on_image(prompts.training_instruction(prompts.TC_EVAL_PROMPT)), False),
    ]
    for (first, rest), add_bos in segment_sets:
        assert reference(first, add_special_tokens=add_bos)["input_ids"] == tok.encode(first, add_bos=add_bos)
        assert reference(rest, add_special_tokens=False)["input_ids"] == tok.encode(rest)
    for answer in ("{<0><19><28><37>}", "yes", "no"):
        text = prompts.training_answer(answer)
        assert reference(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
        assert reference.decode(tok.encode(text), skip_special_tokens=True) == tok.decode(tok.encode(text))

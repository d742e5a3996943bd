"""Tiny real artefacts for tests and benchmarks (no test framework here).

`build_tiny_sentencepiece` trains a small, real SentencePiece BPE model with LLaMA-2's settings (ids 0/1/2 =
<unk>/<s>/</s>, byte fallback, split digits, dummy prefix, identity normalisation, whitespace kept) on the
upstream prompt vocabulary, so the real tokenizer code runs on it exactly as on the 32k LLaMA-2 model.
"""

from __future__ import annotations

import io
import os
import re
import string
from pathlib import Path

import sentencepiece as spm

from backend import prompts
from backend.tokenizer import MODEL_FILE_NAME, PAD_TEXT, UpstreamLlamaTokenizer
from SlicerMiniGPTPancreas.atomic import atomic_write_bytes

DEFAULT_TINY_VOCAB_SIZE = 400  # 3 specials + 256 byte pieces + 86 characters + 55 merges
# 345 pieces are required (specials, bytes, characters); above ~850 the corpus runs out of merges.
TINY_VOCAB_SIZE_RANGE = (360, 800)

# LLaMA-2's trainer/normaliser settings that change how text is cut (its tokenizer.model `trainer_spec`).
_LLAMA_LIKE_OPTIONS = dict(
    model_type="bpe",
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    byte_fallback=True,
    split_digits=True,
    split_by_number=True,
    split_by_whitespace=True,
    split_by_unicode_script=True,
    allow_whitespace_only_pieces=True,
    add_dummy_prefix=True,
    remove_extra_whitespaces=False,
    normalization_rule_name="identity",
    character_coverage=1.0,
    max_sentencepiece_length=16,
)
# Determinism: one thread, every sentence used in the given order, no sampling.
_DETERMINISM_OPTIONS = dict(num_threads=1, input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2)

_SPECIAL_TEXT = re.compile(r"<s>|</s>|<unk>")


def _box(numbers: tuple[int, int, int, int]) -> str:
    return "{{<{}><{}><{}><{}>}}".format(*numbers)


def tiny_corpus_lines() -> list[str]:
    """The training text: upstream prompts, answers, box strings with every digit, tags and "$$".

    Text is split on "<s>", "</s>" and "<unk>" first, because SentencePiece never sees those (the tokenizer
    turns them into special ids), exactly as at tokenization time.
    """
    phrases = (prompts.PANCREAS_PHRASE, prompts.TUMOR_PHRASE, *prompts.ABD_ORGANS)
    questions = [template.format(phrase) for template in prompts.REFER_TEMPLATES for phrase in phrases]
    questions += [template.format(q) for template in prompts.TC_INSTRUCTION_TEMPLATES for q in prompts.TC_QUESTIONS]
    questions += [prompts.TC_EVAL_PROMPT, "[grounding] describe this image in detail", "[identify] what is this",
                  "[detection] pancreas", "[caption] describe the image", "[vqa] is the liver visible?"]
    texts = [prompts.inference_prompt(q) for q in questions] + [prompts.training_instruction(q) for q in questions]
    boxes = [_box((i, (7 * i + 3) % 100, (13 * i + 5) % 100, (31 * i + 11) % 100)) for i in range(100)]
    texts += [prompts.training_answer(box) for box in boxes]
    texts += [f"<p>{phrase}</p> {boxes[i]}<delim>{boxes[-1 - i]}" for i, phrase in enumerate(phrases)]
    # yes/no answers often enough that each spelling becomes ONE piece, as in LLaMA-2's vocabulary ("▁yes", "▁No"):
    # the yes/no probability reads the first answer token, which must be the whole word.
    texts += [prompts.training_answer(answer) for answer in ("yes", "no", "Yes", "No")] * 40
    # "$$" (upstream's pad) must become an ordinary piece: frequent, and also between digits so that the pair
    # "$" "$" is merged on its own and not only as "▁$$".
    texts += [f"{PAD_TEXT} {i % 10}{PAD_TEXT}{PAD_TEXT}{i % 7} a{PAD_TEXT}b" for i in range(100)]
    # Every ASCII letter and common punctuation, so free-text questions in tests need no byte pieces.
    texts += [string.ascii_lowercase, string.ascii_uppercase, "a, b. c! d' e- f: g( h) i; j\" k% l/ m= n+ o_"]
    return [chunk for text in texts for chunk in _SPECIAL_TEXT.split(text) if chunk]


def build_tiny_sentencepiece(out_dir: str | os.PathLike, vocab_size: int = DEFAULT_TINY_VOCAB_SIZE) -> Path:
    """Train the tiny LLaMA-like SentencePiece model into `out_dir/tokenizer.model` and return that path.

    Deterministic (the same bytes on every run) and fast (well under a second). Raises ValueError when
    `vocab_size` cannot be reached on this corpus, and RuntimeError if "$$" did not become an ordinary piece.
    """
    low, high = TINY_VOCAB_SIZE_RANGE
    if not low <= vocab_size <= high:
        raise ValueError(f"tiny vocab_size must be between {low} and {high}, got {vocab_size}")
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    model_bytes = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(tiny_corpus_lines()),
            model_writer=model_bytes,
            vocab_size=vocab_size,
            hard_vocab_limit=True,
            **_LLAMA_LIKE_OPTIONS,
            **_DETERMINISM_OPTIONS,
        )
    except RuntimeError as error:
        raise ValueError(f"cannot train a tiny SentencePiece model with vocab_size={vocab_size}: {error}") from error
    # Verify a side file first so that a failed check never leaves a bad tokenizer.model behind.
    unverified = atomic_write_bytes(folder / f".{MODEL_FILE_NAME}.unverified", model_bytes.getvalue())
    try:
        _verify_pad_is_ordinary(UpstreamLlamaTokenizer(unverified))
    except BaseException:
        unverified.unlink(missing_ok=True)
        raise
    model_file = folder / MODEL_FILE_NAME
    os.replace(unverified, model_file)
    return model_file


def _verify_pad_is_ordinary(tokenizer: UpstreamLlamaTokenizer) -> None:
    """"$$" must be a normal piece that segmentation actually produces, as in LLaMA-2 (not a control/byte piece)."""
    sp = tokenizer.sp
    pad = tokenizer.pad_id
    produced = pad in sp.encode(f"1{PAD_TEXT}2")
    if sp.is_control(pad) or sp.is_byte(pad) or sp.is_unknown(pad) or not produced:
        raise RuntimeError(f"the tiny tokenizer's {PAD_TEXT!r} (id {pad}) is not an ordinary piece")

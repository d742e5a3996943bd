"""The LLaMA-2 tokenizer exactly as upstream MiniGPT-v2 used it: transformers 4.30's slow `LlamaTokenizer`.

Upstream loads `LlamaTokenizer.from_pretrained(path, use_fast=False)` (transformers 4.30, which predates the
`legacy` switch) and sets `pad_token = "$$"`. Current transformers tokenizers differ from it even with
`legacy=True` (docs/upstream.md section 9.1), so this class drives `sentencepiece` directly with the 4.30 rules:

Encoding (4.30 `PreTrainedTokenizer.tokenize` + `LlamaTokenizer._tokenize`):
  * the text is split on the literal special tokens "<s>", "</s>", "<unk>". They are `AddedToken(lstrip=False,
    rstrip=False)`, so no whitespace around them is stripped. "$$" is NOT split out: it became the pad token after
    the tokenizer was built, and 4.30 only splits on tokens registered at load time;
  * empty chunks are dropped; a special chunk becomes its id; every other chunk is `sp.encode(chunk)`, so
    SentencePiece adds its dummy prefix "▁" to EACH chunk (also to one that starts with a space: " b" -> "▁▁b");
  * `add_special_tokens=True` (here `add_bos=True`) prepends one BOS; never an EOS.

Decoding (4.30 `_decode` + `LlamaTokenizer.convert_tokens_to_string`): see `decode`. The special tokens are
bos, eos, unk and the pad "$$" (upstream's tokenizer lists the pad among `all_special_ids`, so
`skip_special_tokens=True` drops it too). No clean-up of tokenization spaces (LlamaTokenizer's default is off).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

from SlicerMiniGPTPancreas.atomic import atomic_write_bytes
from SlicerMiniGPTPancreas.errors import UserError

MODEL_FILE_NAME = "tokenizer.model"
BOS_TEXT, EOS_TEXT, UNK_TEXT = "<s>", "</s>", "<unk>"
PAD_TEXT = "$$"  # upstream: llama_tokenizer.pad_token = "$$" (an ordinary piece, id 3997 in LLaMA-2)

# The three no-split tokens of 4.30. None is a prefix of another, so a leftmost regex match equals 4.30's trie split.
_SPECIAL_SPLIT = re.compile("(" + "|".join(re.escape(t) for t in (BOS_TEXT, EOS_TEXT, UNK_TEXT)) + ")")


class TokenizerError(UserError, ValueError):
    """A tokenizer file is missing or unusable, or ids/arguments are invalid."""


class UpstreamLlamaTokenizer:
    """SentencePiece LLaMA tokenizer with transformers-4.30 slow/legacy semantics and pad "$$"."""

    def __init__(self, model_file: str | os.PathLike) -> None:
        self.model_file = Path(model_file)
        try:
            self._model_bytes = self.model_file.read_bytes()
        except OSError as error:
            raise TokenizerError(f"cannot read the SentencePiece model {self.model_file}: {error}") from error
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=self._model_bytes)
        except (RuntimeError, OSError, TypeError) as error:
            raise TokenizerError(
                f"{self.model_file} is not a SentencePiece model ({error}). Use the tokenizer.model file of a "
                "LLaMA-2 Hugging Face folder."
            ) from error
        self.unk_id = self._control_piece_id(UNK_TEXT)
        self.bos_id = self._control_piece_id(BOS_TEXT)
        self.eos_id = self._control_piece_id(EOS_TEXT)
        self.pad_id = self.sp.piece_to_id(PAD_TEXT)  # SentencePiece answers unk_id for an unknown piece
        if self.pad_id == self.unk_id:
            # 4.30 does the same (`pad_token_id` of an unknown token is the unk id); LLaMA-2 has "$$" (id 3997).
            warnings.warn(f"{self.model_file} has no piece {PAD_TEXT!r}; padding with <unk> (id {self.unk_id}) as "
                          "upstream's tokenizer would. Real LLaMA-2 tokenizers have it.", stacklevel=2)
        self.vocab_size: int = self.sp.get_piece_size()
        # Ids that 4.30 treats as special when decoding (`all_special_ids` after `pad_token = "$$"`).
        self.special_ids: frozenset[int] = frozenset({self.bos_id, self.eos_id, self.unk_id, self.pad_id})
        self._special_text_ids = {BOS_TEXT: self.bos_id, EOS_TEXT: self.eos_id, UNK_TEXT: self.unk_id}

    @classmethod
    def from_dir(cls, llama_dir: str | os.PathLike) -> UpstreamLlamaTokenizer:
        """Load `tokenizer.model` from a LLaMA-2 Hugging Face folder (or a folder written by `save`)."""
        folder = Path(llama_dir)
        model_file = folder / MODEL_FILE_NAME
        if not model_file.is_file():
            raise TokenizerError(
                f"no {MODEL_FILE_NAME} in {folder}: point to the LLaMA-2 folder (e.g. Llama-2-7b-chat-hf) that "
                f"contains the SentencePiece file {MODEL_FILE_NAME}."
            )
        return cls(model_file)

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write an identical copy of `tokenizer.model` into `out_dir` (created if needed), atomically."""
        folder = Path(out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        return atomic_write_bytes(folder / MODEL_FILE_NAME, self._model_bytes)

    def _control_piece_id(self, piece: str) -> int:
        piece_id = self.sp.piece_to_id(piece)
        if self.sp.id_to_piece(piece_id) != piece:
            raise TokenizerError(f"{self.model_file} has no {piece!r} piece; it is not a LLaMA tokenizer model.")
        return piece_id

    # ----------------------------------------------------------------------------------------------- encoding

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text` under the 4.30 rules (module docstring); `add_bos` = `add_special_tokens=True`."""
        ids = [self.bos_id] if add_bos else []
        for chunk in _SPECIAL_SPLIT.split(text):
            if not chunk:
                continue
            if chunk in self._special_text_ids:
                ids.append(self._special_text_ids[chunk])
            else:
                ids.extend(self.sp.encode(chunk))
        return ids

    def encode_batch_right_padded(
        self, texts: Sequence[str], max_length: int, add_bos: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Upstream's answer batch: `padding="longest", truncation=True, max_length`, pad "$$" on the right.

        Returns (ids [B, T] int64, attention [B, T] int64), T = the longest row after truncation. Truncation keeps
        the first tokens; with `add_bos` the BOS counts towards `max_length`, as in 4.30.
        """
        if not texts:
            raise TokenizerError("encode_batch_right_padded needs at least one text")
        if max_length < 1:
            raise TokenizerError(f"max_length must be at least 1, got {max_length}")
        body_length = max_length - 1 if add_bos else max_length
        rows = [([self.bos_id] if add_bos else []) + self.encode(text)[:body_length] for text in texts]
        width = max(len(row) for row in rows)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)  # [B, T]
        attention = np.zeros((len(rows), width), dtype=np.int64)  # [B, T]
        for row_index, row in enumerate(rows):
            ids[row_index, : len(row)] = row
            attention[row_index, : len(row)] = 1
        return ids, attention

    # ----------------------------------------------------------------------------------------------- decoding

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids` as 4.30's `tokenizer.decode` gives it.

        * `skip_special_tokens=True`: bos/eos/unk/pad ids are dropped and the rest is decoded by SentencePiece as
          ONE run, so byte-fallback pieces of a multi-byte character join into that character and the leading
          dummy-prefix space of the first piece is removed.
        * `skip_special_tokens=False` (4.30 `convert_tokens_to_string`): the ordinary ids between special tokens
          are decoded run by run, and each special token is appended as its text ("<s>", "</s>", "<unk>", "$$").
          Before a special token that is not the first token and does not follow another special token, a space
          is added - in front of the decoded run that precedes it: [<s>, ▁hi, </s>] -> "<s> hi</s>".
        """
        id_list = [self._checked_id(token_id) for token_id in ids]
        if skip_special_tokens:
            return self.sp.decode([i for i in id_list if i not in self.special_ids])
        text = ""
        pending: list[int] = []
        previous_was_special = False
        for position, token_id in enumerate(id_list):
            if token_id in self.special_ids:
                if not previous_was_special and position != 0:
                    text += " "
                text += self.sp.decode(pending) + self.sp.id_to_piece(token_id)
                pending = []
                previous_was_special = True
            else:
                pending.append(token_id)
                previous_was_special = False
        return text + self.sp.decode(pending)

    def _checked_id(self, token_id: int) -> int:
        value = int(token_id)
        if not 0 <= value < self.vocab_size:
            raise TokenizerError(f"token id {value} is outside the vocabulary (0..{self.vocab_size - 1})")
        return value

    # ------------------------------------------------------------------------------------------------ pieces

    def id_to_piece(self, token_id: int) -> str:
        """The SentencePiece piece of one id (e.g. 518 -> "▁[" in LLaMA-2)."""
        return self.sp.id_to_piece(self._checked_id(token_id))

    def piece_to_id(self, piece: str) -> int:
        """The id of one piece; a piece not in the vocabulary gives `unk_id`, as in SentencePiece."""
        return self.sp.piece_to_id(piece)

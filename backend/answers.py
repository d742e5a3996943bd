"""Model answers at the token level: one generated answer -> `SliceResult`, and the box-grammar constraint.

* Boxes: the answer is parsed with `SlicerMiniGPTPancreas.grammar` and each grid box is mapped to pixel index
  coordinates of the slice that was SENT (its own width and height, not the model's square input size).
* Box confidence: the geometric mean of the model's probabilities of the generated tokens that spell the box's
  NUMBERS (the digits of "{<12><34><56><78>}"), i.e. exp(mean log-probability). The braces and angle brackets
  are near-certain for any trained model and would pull every confidence towards 1. A token counts when its
  characters overlap a digit of the box in the decoded answer.
* Yes/no probability: P(yes) / (P(yes) + P(no)) from the first answer token's logits, each word's probability
  summed over its single-token spellings ("yes", "Yes", "YES", with and without the leading-space piece "▁";
  the same for "no"). A tokenizer that spells a word only in several pieces (the bundled demo model's, where
  "no" is "▁" "n" "o") gets a logged warning: its first pieces are compared instead, which is approximate,
  because a bare "▁" also starts other answers.
* `BoxGrammarConstraint`: a logits processor that lets the model write only " {<x1><y1><x2><y2>}" (values
  0..100, x1 <= x2, y1 <= y2) and then EOS, for detection prompts whose answer grammar is known in advance.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from SlicerMiniGPTPancreas import grammar

_LOG = logging.getLogger(__name__)
_YES_NO_WORDING = re.compile(r"\byes\s*(?:or|/)\s*no\b", re.IGNORECASE)
# A yes/no question starts with an auxiliary verb ("is there ...", "does the pancreas ...").
_AUXILIARY_START = re.compile(r"^(?:is|are|does|do|did|can|could|has|have|was|were|will|would|should)\b",
                              re.IGNORECASE)
_TASK_TAG = re.compile(r"^\s*\[\w+\]\s*")
_BOX_TEXT = re.compile(r"\{[^{}]*\}")


@dataclass(frozen=True)
class DetectedBox:
    """One box the model drew, in pixel index coordinates of the sent slice (x = column)."""

    box: tuple[float, float, float, float]  # (x_min, y_min, x_max, y_max)
    label: str | None  # phrase of "<p>label</p>" answers, else None
    confidence: float  # 0..1: geometric mean of the probabilities of the box's generated number tokens


@dataclass(frozen=True)
class SliceResult:
    """The parsed, scored answer for one slice."""

    answer: str  # the post-processed model text (upstream post-processing)
    kind: str  # grammar.ParsedAnswer.kind: "boxes" | "yes_no" | "text" | "invalid"
    boxes: tuple[DetectedBox, ...]
    absent: bool  # the model said "{<0><0><0><0>}" (nothing there)
    yes: bool | None  # strict yes/no reading of the answer
    yes_probability: float | None  # P(yes) / (P(yes) + P(no)) from the first answer token's logits
    reason: str | None  # why the answer is invalid / plain text (grammar's reason)
    inference_ms: float  # this slice's share of its batch's wall time


def asks_yes_no(prompt: str) -> bool:
    """True when the prompt is a yes/no question: it says "yes or no", or its question (after the task tag, or
    after the last colon as in the tumour-classification prompts) starts with an auxiliary verb."""
    if _YES_NO_WORDING.search(prompt):
        return True
    question = _TASK_TAG.sub("", prompt).rsplit(":", 1)[-1].strip()
    return bool(_AUXILIARY_START.match(question))


def yes_no_token_ids(tokenizer) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(yes ids, no ids): the single-token spellings of each word (LLaMA-2: "▁yes" 4874, "▁Yes", "Yes", ...).

    A word without any single-token spelling falls back to the first piece of its answer, with a warning.
    """
    words = {word: _single_token_spellings(tokenizer, word) for word in ("yes", "no")}
    for word in [word for word, ids in words.items() if not ids]:
        first = tokenizer.encode(word)[0]
        words[word] = (first,)
        _LOG.warning("'%s' is no single token of this tokenizer (it is %s): P(yes) compares first pieces and is "
                     "approximate (first piece %r).", word,
                     " ".join(repr(tokenizer.id_to_piece(i)) for i in tokenizer.encode(word)),
                     tokenizer.id_to_piece(first))
    if set(words["yes"]) & set(words["no"]):
        raise ValueError(f"the tokenizer starts 'yes' and 'no' with the same token {words['yes']}; "
                         "a yes/no probability cannot be read from it.")
    return words["yes"], words["no"]


def _single_token_spellings(tokenizer, word: str) -> tuple[int, ...]:
    """Ids of the pieces that spell `word` in lower, title or upper case, with or without the leading "▁"."""
    ids = []
    for piece in (prefix + spelled for spelled in (word, word.title(), word.upper()) for prefix in ("\u2581", "")):
        token_id = tokenizer.piece_to_id(piece)  # unk for an unknown piece
        if tokenizer.id_to_piece(token_id) == piece and token_id not in tokenizer.special_ids and token_id not in ids:
            ids.append(token_id)
    return tuple(ids)


def yes_probability(first_logits: torch.Tensor, yes_ids: Sequence[int], no_ids: Sequence[int]) -> float:
    """P(yes) / (P(yes) + P(no)) from the first-token logits [V], each word's probability summed over its ids."""
    logits = first_logits.float()
    yes = torch.logsumexp(logits[list(yes_ids)], dim=0)
    no = torch.logsumexp(logits[list(no_ids)], dim=0)
    return float(torch.sigmoid(yes - no))


def to_slice_result(answer: str, token_ids: Sequence[int], token_logprobs: Sequence[float], tokenizer,
                    width: int, height: int, *, box_decoding: str = "center", yes_prob: float | None = None,
                    prompt_asks_yes_no: bool = False, inference_ms: float = 0.0) -> SliceResult:
    """Build the `SliceResult` of one generated answer on a `width` x `height` slice.

    answer: the post-processed text (`prompts.postprocess_answer` of the decoded ids); token_ids / token_logprobs:
    the generated ids (up to and including EOS) and the model's log-probability of each. yes_prob (from
    `yes_probability`) is kept when the answer reads yes/no or `prompt_asks_yes_no`, else dropped.
    """
    parsed = grammar.parse_answer(answer)
    if parsed.kind != "yes_no" and not prompt_asks_yes_no:
        yes_prob = None
    confidences = box_confidences(answer, parsed.grid_boxes, token_ids, token_logprobs, tokenizer)
    boxes = tuple(DetectedBox(grammar.grid_to_pixels(grid_box, width, height, mode=box_decoding), grid_box.label,
                              confidence) for grid_box, confidence in zip(parsed.grid_boxes, confidences))
    return SliceResult(answer=answer, kind=parsed.kind, boxes=boxes, absent=parsed.absent, yes=parsed.yes,
                       yes_probability=yes_prob, reason=parsed.reason, inference_ms=inference_ms)


def box_confidences(answer: str, grid_boxes: Sequence[grammar.GridBox], token_ids: Sequence[int],
                    token_logprobs: Sequence[float], tokenizer) -> list[float]:
    """exp(mean log-probability) of the tokens that spell each box's numbers, in the order of `grid_boxes`.

    The boxes are found as "{...}" spans of the answer (the all-zero "absent" boxes, which the grammar drops, are
    skipped). When the spans cannot be matched to the parsed boxes (answers with "<s>"/"<unk>" noise inside), every
    box gets the confidence of all the number tokens of the answer.
    """
    if not grid_boxes:
        return []
    decoded, spans = token_char_spans(tokenizer, token_ids)  # spans[i] = (start, end) or None for special ids
    answer_start = _answer_offset(decoded, answer)
    present, found = [], []  # digit spans in `decoded` and grid values of the boxes that are not "absent"
    for match in _BOX_TEXT.finditer(answer):
        parsed = grammar.parse_answer(match.group())
        if parsed.grid_boxes:
            present.append(_digit_runs(match.group(), (answer_start or 0) + match.start()))
            found.append(parsed.grid_boxes[0].as_tuple())
    if answer_start is None or found != [box.as_tuple() for box in grid_boxes]:
        whole = _geometric_mean(token_logprobs, spans, _digit_runs(decoded, 0))
        return [whole] * len(grid_boxes)
    return [_geometric_mean(token_logprobs, spans, runs) for runs in present]


def _digit_runs(text: str, offset: int) -> list[tuple[int, int]]:
    """Character spans (start, end), shifted by `offset`, of the digit runs of `text`."""
    return [(offset + run.start(), offset + run.end()) for run in re.finditer(r"\d+", text)]


def token_char_spans(tokenizer, token_ids: Sequence[int]) -> tuple[str, list[tuple[int, int] | None]]:
    """(decoded text without special tokens, each id's character span in it; None for special ids).

    A token's end is the length of the decoding of all non-special ids up to it, so the spans follow
    SentencePiece's own decoding (dummy-prefix space dropped at the start, byte pieces joined).
    """
    ordinary = [int(i) for i in token_ids if int(i) not in tokenizer.special_ids]
    decoded = tokenizer.decode(ordinary)
    spans: list[tuple[int, int] | None] = []
    count, end = 0, 0
    for token_id in token_ids:
        if int(token_id) in tokenizer.special_ids:
            spans.append(None)
            continue
        count += 1
        start = end
        # a partial UTF-8 byte run can decode longer than its completed character: keep ends monotonic
        end = min(max(end, len(tokenizer.decode(ordinary[:count]))), len(decoded))
        spans.append((start, end))
    return decoded, spans


def _answer_offset(decoded: str, answer: str) -> int | None:
    """Where the post-processed answer starts in the decoded text (after the last "[/INST]" of the part before
    any "</s>"), or None when post-processing changed its inside (a removed "<s>")."""
    head = decoded.split("</s>")[0]
    after_inst = head.rfind("[/INST]")
    position = decoded.find(answer, after_inst + len("[/INST]") if after_inst >= 0 else 0)
    return position if position >= 0 and answer else None


def _geometric_mean(logprobs: Sequence[float], spans: Sequence[tuple[int, int] | None],
                    runs: Sequence[tuple[int, int]]) -> float:
    """exp(mean log-probability) of the tokens whose character span overlaps one of `runs`."""
    chosen = [lp for lp, span in zip(logprobs, spans)
              if span is not None and any(span[0] < end and span[1] > start for start, end in runs)]
    return math.exp(sum(chosen) / len(chosen)) if chosen else 0.0


# ---------------------------------------------------------------------------------------- box constraint

def box_piece_texts(tokenizer) -> dict[int, str]:
    """id -> text ("▁" as a space) of every ordinary piece made only of box characters: what a box is spelled in."""
    sp, pieces = tokenizer.sp, {}
    for token_id in range(tokenizer.vocab_size):
        if sp.is_byte(token_id) or sp.is_control(token_id) or sp.is_unknown(token_id):
            continue
        text = sp.id_to_piece(token_id).replace("\u2581", " ")
        if text and all(char in " {}<>0123456789" for char in text):
            pieces[token_id] = text
    return pieces


class BoxGrammarConstraint:
    """Logits processor (see `backend.decoding.LogitsProcessor`) forcing each answer to " {<x1><y1><x2><y2>}"
    then EOS: values 0..100 without leading zeros, x1 <= x2, y1 <= y2. Among the allowed tokens the model's own
    scores decide; the recorded log-probabilities stay the model's, so box confidences stay meaningful."""

    def __init__(self, tokenizer) -> None:
        self.eos_id = tokenizer.eos_id
        self.piece_text = box_piece_texts(tokenizer)  # the only candidates

    def __call__(self, generated: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """generated [B, t] ids so far, logits [B, V] -> logits with every disallowed token at -inf."""
        constrained = torch.full_like(logits, float("-inf"))
        for row, ids in enumerate(generated.tolist()):
            if self.eos_id in ids:  # finished: the decoder feeds filler tokens, leave them alone
                constrained[row] = logits[row]
                continue
            text = "".join(self.piece_text.get(token_id, "\0") for token_id in ids)
            allowed = [token_id for token_id, piece in self.piece_text.items() if viable_box_prefix(text + piece)]
            if complete_box(text) or not allowed:
                allowed.append(self.eos_id)
            constrained[row, allowed] = logits[row, allowed]
        return constrained


def viable_box_prefix(text: str) -> bool:
    """True when `text` can still grow into " {<x1><y1><x2><y2>}" (one optional leading space)."""
    rest = text[1:] if text.startswith(" ") else text
    if not rest:
        return True
    if rest[0] != "{":
        return False
    values: list[int] = []
    position = 1
    for index in range(4):
        if position == len(rest):
            return True
        if rest[position] != "<":
            return False
        end = position + 1
        while end < len(rest) and rest[end] in "0123456789":
            end += 1
        digits = rest[position + 1:end]
        lowest = values[index - 2] if index >= 2 else 0  # x2 >= x1, y2 >= y1
        if end == len(rest):
            return any(str(value).startswith(digits) for value in range(lowest, grammar.GRID + 1))
        if rest[end] != ">" or not digits or digits != str(int(digits)) or not lowest <= int(digits) <= grammar.GRID:
            return False
        values.append(int(digits))
        position = end + 1
    return rest[position:] in ("", "}")


def complete_box(text: str) -> bool:
    """True when `text` is a whole box " {<x1><y1><x2><y2>}" that the grammar accepts."""
    return text.endswith("}") and viable_box_prefix(text)

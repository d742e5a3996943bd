"""Token-by-token decoding with a KV cache, reproducing transformers 4.30's greedy `generate` on `inputs_embeds`,
plus jump-forward drafts that keep the answers of plain greedy decoding.

Upstream calls `llama_model.generate(inputs_embeds=..., attention_mask=...)` (docs/upstream.md §1.4, §9.1). Its
first step runs the whole left-padded prompt with position ids `cumsum(mask) - 1`; each later step feeds the previous
token id with the next position. Rows that finished stop counting; the loop ends when every row has produced EOS or
`max_new_tokens`. This loop does the same explicitly (it does not rely on current `generate`'s handling of
`inputs_embeds`), keeps its keys and values in a transformers `DynamicCache`, and can also sample like upstream's demo.

Jump-forward (`drafter`): where a grammar fixes the next pieces (in a box "{<12><34><56><78>}" the "><", ">}" and
the end after a finished number), they are fed together with the previous token in ONE forward pass, and each is
kept only if greedy decoding would have chosen it anyway (the logits of that pass say so); the first token greedy
would choose differently is taken instead, and the rejected drafts are masked out of the cache. The answers are
therefore those of step-by-step greedy decoding, with about one model call per free token.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from backend.answers import box_piece_texts
from backend.batching import positions_from_mask

# (tokens generated so far [B, t] long, next-token logits [B, V] float32) -> adjusted logits [B, V]
LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# (token ids one row generated so far) -> ids a grammar expects next (may be empty); only a guess, always checked
Drafter = Callable[[list[int]], list[int]]


@dataclass(frozen=True)
class SamplingOptions:
    """Sampling as upstream's demo does it (`do_sample=True`); `None` instead of options means greedy."""

    temperature: float = 0.6
    top_p: float = 0.9
    repetition_penalty: float = 1.05
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.repetition_penalty <= 0:
            raise ValueError(f"invalid sampling options {self}: need temperature > 0, 0 < top_p <= 1, penalty > 0")


@dataclass
class GenerationResult:
    """Answers of one `generate` call; unpacks as `token_ids, texts = result`."""

    token_ids: list[list[int]]  # per sample: generated ids up to and including the first EOS; no BOS, no padding
    texts: list[str]  # upstream post-processing of the decoded ids
    first_logits: torch.Tensor  # [B, V] float32 logits of the first answer token
    token_logprobs: list[list[float]] = field(default_factory=list)  # model log-probability of each generated id
    model_calls: int = 0  # forward passes of the language model

    def __iter__(self) -> Iterator:
        yield self.token_ids
        yield self.texts


@dataclass
class DecodedIds:
    token_ids: list[list[int]]
    first_logits: torch.Tensor
    token_logprobs: list[list[float]]
    model_calls: int


@dataclass
class _Row:
    """One answer being written: its tokens, their log-probabilities, and what it feeds into the next pass."""

    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    feed: list[int] = field(default_factory=list)  # [last chosen token, draft...]; empty once finished
    done: bool = False


@torch.no_grad()
def decode(
    llm: torch.nn.Module,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    bos_id: int,
    eos_id: int,
    sampling: SamplingOptions | None = None,
    logits_processor: LogitsProcessor | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    drafter: Drafter | None = None,
) -> DecodedIds:
    """Generate up to `max_new_tokens` ids per row of a left-padded batch.

    inputs_embeds [B, L, H], attention_mask [B, L] (0 on the left pads). Greedy (argmax) unless `sampling`.
    `logits_processor` may change the scores before the choice (e.g. to constrain the grammar); the recorded
    log-probabilities are always the model's own. It sees the whole batch (finished rows padded with EOS), except
    with a `drafter`, whose rows can be at different lengths: then it is called per row ([1, t], [1, V]).
    `drafter` proposes jump-forward tokens (greedy only: a sampled token cannot be checked against a draft).
    """
    from transformers import DynamicCache

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    batch, device = inputs_embeds.shape[0], inputs_embeds.device
    drafter = drafter if sampling is None else None
    generator = _generator(sampling, device)
    rows = [_Row() for _ in range(batch)]
    mask = attention_mask.long()
    cache = DynamicCache(config=llm.config)
    step: dict = {"inputs_embeds": inputs_embeds, "position_ids": positions_from_mask(mask)}
    width, first_logits, calls = 1, None, 0  # width: positions fed per row (their logits are read)
    while True:
        with autocast():
            output = llm(**step, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=width)
        calls += 1
        logits = output.logits.float()  # [B, width, V]
        if first_logits is None:
            first_logits = logits[:, -1].clone()
        if drafter is None:
            in_step = _choose_in_step(rows, logits[:, 0], bos_id, eos_id, sampling, logits_processor, generator)
        for index, row in enumerate(rows):
            if row.done:
                continue
            pick = ((lambda _, token=in_step[index]: token) if drafter is None else
                    _greedy_picker(row, logits[index], logits_processor))
            kept = _accept(row, logits[index], pick, eos_id, max_new_tokens, drafter)
            if calls > 1:  # rejected drafts leave the attention (the first pass fed the prompt, no drafts)
                mask[index, mask.shape[1] - width + kept:] = 0
        if all(row.done for row in rows):
            return DecodedIds([row.ids for row in rows], first_logits, [row.logprobs for row in rows], calls)
        width = max(len(row.feed) for row in rows)
        ids = torch.full((batch, width), eos_id, dtype=torch.long, device=device)  # filler where a row feeds less
        new_mask = torch.zeros(batch, width, dtype=torch.long, device=device)
        for index, row in enumerate(rows):
            ids[index, :len(row.feed)] = torch.tensor(row.feed, dtype=torch.long)
            new_mask[index, :len(row.feed)] = 1
        positions = mask.sum(-1, keepdim=True) + torch.arange(width, device=device)  # [B, width]
        mask = torch.cat([mask, new_mask], dim=1)
        step = {"input_ids": ids, "position_ids": positions}


def _accept(row: _Row, logits: torch.Tensor, pick: Callable[[int], int], eos_id: int, max_new_tokens: int,
            drafter: Drafter | None) -> int:
    """Read one row's logits [width, V] of the last pass (`pick(position)` is the token chosen there): append the
    chosen tokens, plan the row's next feed, and return how many of the positions it fed stay in the cache (the
    last token plus the drafts greedy decoding agrees with)."""
    drafts = row.feed[1:]
    for position in range(len(drafts) + 1):
        token = pick(position)
        row.ids.append(token)
        row.logprobs.append(float(torch.log_softmax(logits[position], dim=-1)[token]))
        if token == eos_id or len(row.ids) == max_new_tokens:
            row.done, row.feed = True, []
            return position + 1
        if position == len(drafts) or token != drafts[position]:
            break
    room = max_new_tokens - len(row.ids) - 1  # the pass that checks the drafts also chooses one more token
    row.feed = [row.ids[-1]] + (drafter(row.ids)[:room] if drafter is not None and room > 0 else [])
    return position + 1


def _choose_in_step(rows: list[_Row], logits: torch.Tensor, bos_id: int, eos_id: int,
                    sampling: SamplingOptions | None, processor: LogitsProcessor | None,
                    generator: torch.Generator | None) -> list[int]:
    """One token per row from logits [B, V] when every row advances one token per pass, as 4.30's generate."""
    longest = max(len(row.ids) for row in rows)
    # 4.30's `input_ids` during generation: a BOS column it did not generate, then the new tokens (EOS fillers
    # after a row's end).
    history = torch.tensor([[bos_id, *row.ids] + [eos_id] * (longest - len(row.ids)) for row in rows],
                           dtype=torch.long, device=logits.device)
    scores = processor(history[:, 1:], logits) if processor is not None else logits
    return _choose(scores, history, sampling, generator).tolist()


def _greedy_picker(row: _Row, logits: torch.Tensor, processor: LogitsProcessor | None) -> Callable[[int], int]:
    """argmax at each position of one row's logits [width, V], the processor seeing the row's tokens so far."""
    def pick(position: int) -> int:
        scores = logits[position][None]  # [1, V]
        if processor is not None:
            scores = processor(torch.tensor([row.ids], dtype=torch.long, device=logits.device), scores)
        return int(scores.argmax(dim=-1)[0])
    return pick


def _generator(sampling: SamplingOptions | None, device: torch.device) -> torch.Generator | None:
    if sampling is None or sampling.seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(sampling.seed)
    return generator


def _choose(
    scores: torch.Tensor, history: torch.Tensor, sampling: SamplingOptions | None, generator: torch.Generator | None
) -> torch.Tensor:
    """argmax, or transformers' processors in 4.30's order: repetition penalty, temperature, top-p, then sample."""
    if sampling is None:
        return scores.argmax(dim=-1)
    from transformers import RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopPLogitsWarper

    if sampling.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty)(history, scores)
    scores = TemperatureLogitsWarper(sampling.temperature)(history, scores)
    if sampling.top_p < 1.0:
        scores = TopPLogitsWarper(sampling.top_p)(history, scores)
    probabilities = torch.softmax(scores, dim=-1)
    return torch.multinomial(probabilities, num_samples=1, generator=generator)[:, 0]


# ------------------------------------------------------------------------------------------ box jump-forward

_OPEN_BOX_VALUES = re.compile(r"(?:<\d{1,3}>)*<(\d{1,3})")  # "<12><34><5": the numbers of a box being written


class BoxDrafter:
    """`Drafter` for upstream's box grammar "{<x1><y1><x2><y2>}": after "{" it proposes "<"; after a number that
    cannot grow (0, two digits other than 10, three digits) it proposes "><", or ">}" and EOS after the fourth.
    Numbers are the model's own choice: only the pieces between them are drafted."""

    def __init__(self, tokenizer) -> None:
        self.eos_id = tokenizer.eos_id
        self.piece_text = box_piece_texts(tokenizer)
        by_text = {text: token_id for token_id, text in self.piece_text.items()}
        self.opening, self.separator, self.closing = (self._spelled(text, by_text) for text in ("<", "><", ">}"))

    def __call__(self, generated: list[int]) -> list[int]:
        text = "".join(self.piece_text.get(token_id, "\0") for token_id in generated)
        start = text.rfind("{")
        if start < 0 or "}" in text[start:]:
            return []
        inside = text[start + 1:]
        if not inside:
            return self.opening
        match = _OPEN_BOX_VALUES.fullmatch(inside)
        if match is None or not _number_is_complete(match.group(1)):
            return []
        return self.separator if inside.count("<") < 4 else self.closing + [self.eos_id]

    @staticmethod
    def _spelled(text: str, by_text: dict[str, int]) -> list[int]:
        """The ids spelling `text`: one piece when the vocabulary has it, else one piece per character."""
        if text in by_text:
            return [by_text[text]]
        return [by_text[char] for char in text] if all(char in by_text for char in text) else []


def _number_is_complete(digits: str) -> bool:
    """True when no further digit can follow within 0..100 (no leading zeros)."""
    return digits == "0" or len(digits) == 3 or (len(digits) == 2 and digits != "10")

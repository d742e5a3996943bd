"""Token-by-token decoding with a KV cache, reproducing transformers 4.30's greedy `generate` on `inputs_embeds`.

Upstream calls `llama_model.generate(inputs_embeds=..., attention_mask=...)` (spec §1.4, §9.1). Its first step
runs the whole left-padded prompt with position ids `cumsum(mask) - 1`; each later step feeds the previous token
id, appends 1 to the mask and uses the last position + 1. Finished rows keep running on a filler token until all
rows have produced EOS or `max_new_tokens` are done. This loop does the same explicitly (it does not rely on
current `generate`'s handling of `inputs_embeds`), and can also sample like upstream's demo.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from backend.batching import positions_from_mask

# (tokens generated so far [B, t] long, next-token logits [B, V] float32) -> adjusted logits [B, V]
LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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

    def __iter__(self) -> Iterator:
        yield self.token_ids
        yield self.texts


@dataclass
class DecodedIds:
    token_ids: list[list[int]]
    first_logits: torch.Tensor
    token_logprobs: list[list[float]]


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
) -> DecodedIds:
    """Generate up to `max_new_tokens` ids per row of a left-padded batch.

    inputs_embeds [B, L, H], attention_mask [B, L] (0 on the left pads). Greedy (argmax) unless `sampling`.
    `logits_processor` may change the scores before the choice (e.g. to constrain the grammar); the recorded
    log-probabilities are always the model's own.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    batch, device = inputs_embeds.shape[0], inputs_embeds.device
    mask = attention_mask.long()
    step_inputs: dict = {"inputs_embeds": inputs_embeds, "position_ids": positions_from_mask(mask)}
    # 4.30's `input_ids` during generation: a BOS column it did not generate, then the new tokens.
    history = torch.full((batch, 1), bos_id, dtype=torch.long, device=device)
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    generator = _generator(sampling, device)
    token_ids: list[list[int]] = [[] for _ in range(batch)]
    logprobs: list[list[float]] = [[] for _ in range(batch)]
    first_logits = None
    cache = None
    for _ in range(max_new_tokens):
        with autocast():
            output = llm(**step_inputs, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1)
        logits = output.logits[:, -1].float()  # [B, V]
        if first_logits is None:
            first_logits = logits.clone()
        scores = logits_processor(history[:, 1:], logits) if logits_processor is not None else logits
        next_ids = _choose(scores, history, sampling, generator)  # [B]
        chosen_logprobs = torch.log_softmax(logits, dim=-1).gather(1, next_ids[:, None])[:, 0]
        for row in unfinished.nonzero()[:, 0].tolist():
            token_ids[row].append(int(next_ids[row]))
            logprobs[row].append(float(chosen_logprobs[row]))
        next_ids = torch.where(unfinished, next_ids, torch.full_like(next_ids, eos_id))  # filler for finished rows
        unfinished &= next_ids != eos_id
        history = torch.cat([history, next_ids[:, None]], dim=1)
        if not unfinished.any():
            break
        cache = output.past_key_values
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        step_inputs = {"input_ids": next_ids[:, None], "position_ids": mask.sum(-1, keepdim=True) - 1}
    return DecodedIds(token_ids, first_logits, logprobs)


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

"""Batch layouts of upstream MiniGPT-v2 (spec §1.4), as pure tensor functions.

* Inference (`minigpt_base.generate`): every prompt is right-aligned; the left is filled with all-zero
  embeddings, attention 0. Position ids come from the mask as transformers 4.30's `generate` made them.
* Training (`minigpt_base.forward`): `[BOS] [prompt_i] [answer_i + its own right pads] [prompt pads]`, the prompt
  pads being the embedding of the pad token "$$"; labels only on the answer tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100  # label of positions that do not count in the loss


def left_pad(sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack `[L_i, H]` embeddings right-aligned: returns (embeds [B, L, H] zeros on the left, mask [B, L] long)."""
    longest = max(sequence.shape[0] for sequence in sequences)
    first = sequences[0]
    embeds = torch.zeros(len(sequences), longest, first.shape[-1], dtype=first.dtype, device=first.device)
    mask = torch.zeros(len(sequences), longest, dtype=torch.long, device=first.device)
    for row, sequence in enumerate(sequences):
        embeds[row, longest - sequence.shape[0]:] = sequence
        mask[row, longest - sequence.shape[0]:] = 1
    return embeds, mask


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """[B, L] mask -> [B, L] position ids: `cumsum - 1` over valid tokens, 1 on pads.

    That is transformers 4.30's `prepare_inputs_for_generation` (spec [U], from memory of 4.30): the rule that
    makes a left-padded row compute exactly what the same row computes alone, which is what real files need.
    """
    positions = mask.long().cumsum(-1) - 1
    return positions.masked_fill(mask == 0, 1)


@dataclass
class TrainingBatch:
    inputs_embeds: torch.Tensor  # [B, 1 + P + T, H]
    attention_mask: torch.Tensor  # [B, 1 + P + T] long
    labels: torch.Tensor  # [B, 1 + P + T] long, IGNORE_INDEX except on answer tokens


def training_layout(
    bos_embed: torch.Tensor,
    prompt_embeds: list[torch.Tensor],
    pad_embed: torch.Tensor,
    answer_embeds: torch.Tensor,
    answer_mask: torch.Tensor,
    answer_targets: torch.Tensor,
    max_context_len: int,
) -> TrainingBatch:
    """Upstream's training rows (`prompt_wrap` + `concat_emb_input_output` + `forward`).

    bos_embed [H], pad_embed [H]: embeddings of BOS and of the pad token "$$".
    prompt_embeds: B tensors [L_i, H] (text + image + text), each cut to `max_context_len`.
    answer_embeds [B, T, H], answer_mask [B, T], answer_targets [B, T]: the right-padded answers ("$$" pads,
    mask 0, target IGNORE_INDEX on pads).
    Row i = [BOS] [prompt_i] [answer_i incl. its pads] [pads up to the longest prompt P].
    """
    batch, answer_len, hidden = answer_embeds.shape
    lengths = [min(embeds.shape[0], max_context_len) for embeds in prompt_embeds]
    prompt_len = max(lengths)
    device, dtype = answer_embeds.device, answer_embeds.dtype
    row_len = 1 + prompt_len + answer_len
    inputs = pad_embed.to(dtype).expand(batch, row_len, hidden).clone()  # [B, 1 + P + T, H]
    mask = torch.zeros(batch, row_len, dtype=torch.long, device=device)
    labels = torch.full((batch, row_len), IGNORE_INDEX, dtype=torch.long, device=device)
    inputs[:, 0] = bos_embed.to(dtype)
    mask[:, 0] = 1
    for row, (embeds, length) in enumerate(zip(prompt_embeds, lengths)):
        answer_start = 1 + length
        inputs[row, 1:answer_start] = embeds[:length]
        mask[row, 1:answer_start] = 1
        inputs[row, answer_start:answer_start + answer_len] = answer_embeds[row]
        mask[row, answer_start:answer_start + answer_len] = answer_mask[row]
        labels[row, answer_start:answer_start + answer_len] = answer_targets[row]
    return TrainingBatch(inputs, mask, labels)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of next-token prediction over labelled positions (LlamaForCausalLM's loss), in fp32.

    logits [B, L, V], labels [B, L]: position t predicts labels[t + 1].
    """
    shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])  # [B*(L-1), V]
    shift_labels = labels[:, 1:].reshape(-1)  # [B*(L-1)]
    return torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX)


AUTO_BATCH_LIMIT = 64  # beyond this, larger batches stop paying on any device tried
CPU_BATCH_MEMORY = 1 << 30  # bytes a CPU batch may use besides the weights


def auto_batch_size(model, max_new_tokens: int = 20, text_tokens: int = 64) -> int:
    """Slices per model call sized to memory: each row holds its KV cache (prompt + answer), one layer's float32
    MLP activations during the prompt pass, and the vision tower's largest activations; the budget is half the free
    GPU memory (the rest for the allocator and the logits), or `CPU_BATCH_MEMORY` on the CPU."""
    llm, vision = model.llama_model.config, model.config.vision
    tokens = model.config.image_tokens + text_tokens + max_new_tokens
    element = model.llama_model.get_input_embeddings().weight.element_size()
    kv_cache = 2 * llm.num_hidden_layers * tokens * llm.hidden_size * element
    prompt_pass = 2 * tokens * llm.intermediate_size * 4
    tower = 4 * (vision.num_patches + 1) * vision.mlp_hidden * 4
    if model.device.type == "cuda":
        budget = torch.cuda.mem_get_info(model.device)[0] // 2
    else:
        budget = CPU_BATCH_MEMORY
    return int(max(1, min(AUTO_BATCH_LIMIT, budget // (kv_cache + prompt_pass + tower))))

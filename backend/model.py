"""MiniGPT-v2 (upstream `minigpt_v2.py` + `minigpt_base.py`, spec §1): image encoding, prompt splicing,
first-token logits, greedy generation, chat and the training loss.

Attribute names follow upstream (`visual_encoder`, `ln_vision`, `llama_proj`, `llama_model`), so this module's
state-dict names equal upstream's up to the peft naming handled in `backend.checkpoint_io`.
Build it with `backend.load_upstream` or `backend.load_model`; the constructor alone holds no trained weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from backend import prompts
from backend.batching import IGNORE_INDEX, causal_lm_loss, left_pad, positions_from_mask, training_layout
from backend.checkpoint_io import to_upstream_name
from backend.config import MiniGPTConfig
from backend.decoding import Drafter, GenerationResult, LogitsProcessor, SamplingOptions, decode
from backend.tokenizer import UpstreamLlamaTokenizer
from backend.vision import EvaViT


class MiniGPTv2(nn.Module):
    """The MiniGPT-v2 model. `llama_model` is a peft-wrapped `LlamaForCausalLM`; `dtype` is the compute dtype
    (float32, or float16/bfloat16 run under autocast like upstream's `maybe_autocast`)."""

    def __init__(self, config: MiniGPTConfig, llama_model: nn.Module, tokenizer: UpstreamLlamaTokenizer,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.tokenizer = tokenizer
        self.compute_dtype = dtype
        self.visual_encoder = EvaViT(config.vision)
        self.ln_vision = nn.LayerNorm(config.vision.width, eps=config.ln_vision_eps)
        self.llama_proj = nn.Linear(config.vision.width * config.tokens_per_merge, config.llm_hidden_size)
        self.llama_model = llama_model
        self.visual_encoder.requires_grad_(False)  # frozen, as upstream (`freeze_vit: True`)
        self.ln_vision.requires_grad_(False)
        self.load_report: list[str] = []  # what the loader did (sources, ignored keys), for `info` and logs

    # -------------------------------------------------------------------------------------------- basics

    @property
    def device(self) -> torch.device:
        return self.llama_proj.weight.device

    def train(self, mode: bool = True) -> "MiniGPTv2":
        """Like upstream's `disabled_train`, the frozen vision tower stays in eval mode."""
        super().train(mode)
        self.visual_encoder.eval()
        self.ln_vision.eval()
        return self

    def autocast(self) -> contextlib.AbstractContextManager:
        """Upstream's `maybe_autocast`: half-precision autocast unless the model computes in float32."""
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.compute_dtype)

    def embed_ids(self, ids: Sequence[int]) -> torch.Tensor:
        """[L] token ids -> [L, H] LLaMA input embeddings."""
        embedding = self.llama_model.get_input_embeddings()
        return embedding(torch.tensor(list(ids), dtype=torch.long, device=self.device))

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors upstream's checkpoints hold (every parameter that requires grad: llama_proj + LoRA in a
        LoRA stage), under upstream (peft 0.2.0) names."""
        return {to_upstream_name(name): param.detach()
                for name, param in self.named_parameters() if param.requires_grad}

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """llama_proj + LoRA under upstream names, whatever is being trained: what a model folder stores beside
        its base files."""
        return {to_upstream_name(name): param.detach() for name, param in self.named_parameters()
                if name.startswith("llama_proj.") or ".lora_" in name}

    # ------------------------------------------------------------------------------------------- images

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, T, H] LLM embeddings, T = (S / patch)^2 / 4 (256 for the real model).

        ViT -> ln_vision (all tokens, in float32) -> drop CLS -> concatenate each run of 4 consecutive patch
        tokens in row-major order (4 horizontally adjacent patches: merged token j = 8 r + k holds patches
        (r, 4k..4k+3) on a 32-wide grid) -> llama_proj.
        """
        pixel_values = pixel_values.to(device=self.device, dtype=torch.float32)
        if pixel_values.dim() == 3:
            pixel_values = pixel_values[None]
        # The tower is frozen (no graph) unless a from-scratch stage trains it.
        tower_trains = torch.is_grad_enabled() and self.visual_encoder.pos_embed.requires_grad
        with torch.set_grad_enabled(tower_trains), self.autocast():
            features = self.visual_encoder(pixel_values)  # [B, 1 + P, C]
            features = self.ln_vision(features.float())  # [B, 1 + P, C] float32
        patches = features[:, 1:, :]  # [B, P, C]
        batch, num_patches, width = patches.shape
        merged = patches.reshape(batch, num_patches // self.config.tokens_per_merge,
                                 width * self.config.tokens_per_merge)  # [B, P/4, 4C]
        with self.autocast():
            projected = self.llama_proj(merged)  # [B, T, H]
        return projected.to(self.llama_model.get_input_embeddings().weight.dtype)

    # ------------------------------------------------------------------------------------------ prompts

    def prompt_token_ids(self, prompt: str, add_bos: bool) -> tuple[list[int], list[int]]:
        """Ids of the text before and after "<ImageHere>"; `add_bos` adds BOS to the first segment only
        (`get_context_emb`). With the inference prompt "<s>[INST] <Img>..." that gives two BOS ids."""
        before, after = prompts.split_on_image(prompt)
        return self.tokenizer.encode(before, add_bos=add_bos), self.tokenizer.encode(after)

    def prompt_embeddings(self, prompt: str, image_embeds: torch.Tensor, add_bos: bool) -> torch.Tensor:
        """[L, H]: text embeddings with the image's [T, H] embeddings spliced in at "<ImageHere>"."""
        ids_before, ids_after = self.prompt_token_ids(prompt, add_bos)
        return torch.cat([self.embed_ids(ids_before), image_embeds, self.embed_ids(ids_after)], dim=0)

    def inference_batch(self, image_embeds: torch.Tensor,
                        prompt_texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded inference batch from encoded images [B, T, H] and prompts with one "<ImageHere>" each
        (e.g. `prompts.inference_prompt(question)`): (embeds [B, L, H] zeros on the left, mask [B, L])."""
        if image_embeds.shape[0] != len(prompt_texts):
            raise ValueError(f"{image_embeds.shape[0]} images but {len(prompt_texts)} questions; give one each.")
        return left_pad([self.prompt_embeddings(text, image, add_bos=True)
                         for text, image in zip(prompt_texts, image_embeds)])

    # ---------------------------------------------------------------------------------------- inference

    @torch.no_grad()
    def first_token_logits(self, pixel_values: torch.Tensor, questions: str | Sequence[str]) -> torch.Tensor:
        """[B, V] float32 logits of the first answer token for upstream's inference prompt of each question."""
        embeds, mask = self.inference_batch(self.encode_images(pixel_values),
                                            [prompts.inference_prompt(q) for q in _listed(questions)])
        with self.autocast():
            output = self.llama_model(inputs_embeds=embeds, attention_mask=mask,
                                      position_ids=positions_from_mask(mask), use_cache=False, logits_to_keep=1)
        return output.logits[:, -1].float()

    @torch.no_grad()
    def generate(self, pixel_values: torch.Tensor, questions: str | Sequence[str], max_new_tokens: int = 20,
                 sampling: SamplingOptions | None = None,
                 logits_processor: LogitsProcessor | None = None) -> GenerationResult:
        """Answer each question about its image: greedy (upstream's evaluation) unless `sampling` is given.

        Texts are post-processed as upstream: decode without special tokens, cut at "</s>", drop "<s>", keep
        what follows the last "[/INST]", strip.
        """
        embeds, mask = self.inference_batch(self.encode_images(pixel_values),
                                            [prompts.inference_prompt(q) for q in _listed(questions)])
        return self.decode_batch(embeds, mask, max_new_tokens, sampling, logits_processor)

    @torch.no_grad()
    def chat(self, pixel_values: torch.Tensor, turns: Sequence[str], max_new_tokens: int = 300,
             sampling: SamplingOptions | None = None,
             logits_processor: LogitsProcessor | None = None) -> GenerationResult:
        """Answer the last of the user's `turns` about one image, with the prompt upstream's conversation template
        renders (earlier answers replaced by "</s>"). The context keeps only its last
        `chat_max_length - max_new_tokens` embeddings, as upstream's `Chat.answer_prepare` does."""
        image_embeds = self.encode_images(pixel_values)
        if image_embeds.shape[0] != 1:
            raise ValueError(f"chat takes one image, got {image_embeds.shape[0]}.")
        embeds = self.prompt_embeddings(prompts.chat_prompt(list(turns)), image_embeds[0], add_bos=True)
        begin = max(0, embeds.shape[0] + max_new_tokens - self.config.chat_max_length)
        embeds = embeds[begin:][None]  # [1, L, H]
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=self.device)
        return self.decode_batch(embeds, mask, max_new_tokens, sampling, logits_processor)

    @torch.no_grad()
    def decode_batch(self, embeds: torch.Tensor, mask: torch.Tensor, max_new_tokens: int,
                     sampling: SamplingOptions | None = None, logits_processor: LogitsProcessor | None = None,
                     drafter: Drafter | None = None) -> GenerationResult:
        """Generate from a ready left-padded batch (`inference_batch`) and post-process the texts as upstream.
        `drafter`: jump-forward proposals (`backend.decoding.BoxDrafter`); the answers stay those of greedy."""
        decoded = decode(self.llama_model, embeds, mask, max_new_tokens, bos_id=self.tokenizer.bos_id,
                         eos_id=self.tokenizer.eos_id, sampling=sampling, logits_processor=logits_processor,
                         autocast=self.autocast, drafter=drafter)
        texts = [prompts.postprocess_answer(self.tokenizer.decode(ids, skip_special_tokens=True))
                 for ids in decoded.token_ids]
        return GenerationResult(decoded.token_ids, texts, decoded.first_logits, decoded.token_logprobs,
                                decoded.model_calls)

    # ----------------------------------------------------------------------------------------- training

    def training_loss(self, pixel_values: torch.Tensor, instructions: Sequence[str],
                      answers: Sequence[str], inference_layout: Sequence[bool] | None = None) -> torch.Tensor:
        """Upstream's training loss: mean cross-entropy over the answer tokens (answer + "</s>") of the batch."""
        return self.training_forward(pixel_values, instructions, answers, inference_layout).loss

    def training_forward(self, pixel_values: torch.Tensor, instructions: Sequence[str], answers: Sequence[str],
                         inference_layout: Sequence[bool] | None = None,
                         keep_hidden: bool = False) -> TrainingOutput:
        """The training loss with the labels it was taken over (and the last hidden states when `keep_hidden`).

        Prompt "[INST] <Img><ImageHere></Img> {instruction}  [/INST]" after one BOS embedding; answers cut to
        `max_txt_len` tokens and right-padded with "$$"; the batch layout is `backend.batching.training_layout`.
        Deterministic in eval mode (the LoRA dropout is the only dropout).

        `inference_layout[i]` trains row i on the prompt as `generate` builds it instead ("<s><s>[INST] ...
        [/INST]", two BOS and one space): upstream never does, its pre-trained LLaMA tolerating the difference, but a
        base trained from scratch (the demo's stage 0) must see both to answer at inference.
        """
        instructions, answers = _listed(instructions), _listed(answers)
        as_inference = list(inference_layout) if inference_layout is not None else [False] * len(instructions)
        if len(instructions) != len(answers):
            raise ValueError(f"{len(instructions)} instructions but {len(answers)} answers; give one answer each.")
        image_embeds = self.encode_images(pixel_values)  # [B, T, H]
        if image_embeds.shape[0] != len(instructions):
            raise ValueError(f"{image_embeds.shape[0]} images but {len(instructions)} instructions.")
        # The layout prepends one BOS embedding; the inference prompt's own first BOS is that one.
        prompt_embeds = [self.prompt_embeddings(prompts.inference_prompt(text), image, add_bos=True)[1:] if inference
                         else self.prompt_embeddings(prompts.training_instruction(text), image, add_bos=False)
                         for text, image, inference in zip(instructions, image_embeds, as_inference)]
        answer_ids, answer_mask = self.tokenizer.encode_batch_right_padded(
            [prompts.training_answer(answer) for answer in answers], max_length=self.config.max_txt_len)
        answer_ids = torch.from_numpy(answer_ids).to(self.device)  # [B, A]
        answer_mask = torch.from_numpy(answer_mask).to(self.device)  # [B, A]
        targets = answer_ids.masked_fill(answer_ids == self.tokenizer.pad_id, IGNORE_INDEX)  # "$$" never counts
        embedding = self.llama_model.get_input_embeddings()
        special = self.embed_ids([self.tokenizer.bos_id, self.tokenizer.pad_id])  # [2, H]
        batch = training_layout(special[0], prompt_embeds, special[1], embedding(answer_ids), answer_mask, targets,
                                self.config.max_context_len)
        positions = torch.arange(batch.inputs_embeds.shape[1], device=self.device)[None]  # default arange
        with self.autocast():
            output = self.llama_model(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                                      position_ids=positions, use_cache=False, output_hidden_states=keep_hidden)
        return TrainingOutput(causal_lm_loss(output.logits, batch.labels), batch.labels,
                              output.hidden_states[-1] if keep_hidden else None)


@dataclass
class TrainingOutput:
    loss: torch.Tensor  # [] mean cross-entropy over the answer tokens
    labels: torch.Tensor  # [B, L] IGNORE_INDEX except on answer tokens; position t predicts labels[:, t + 1]
    hidden: torch.Tensor | None  # [B, L, H] the LLaMA's last hidden states (after its final norm), when kept


def _listed(texts: str | Sequence[str]) -> list[str]:
    return [texts] if isinstance(texts, str) else list(texts)

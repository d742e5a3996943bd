"""Reference outputs of upstream MiniGPT-v2 on a tiny model, computed with upstream's own library stack.

Runs in a separate environment pinned to upstream's versions (transformers 4.30.0, peft 0.2.0; `make parity-env`),
never in the project's. It writes, into OUT_DIR:
  - a tiny model in the ORIGINAL file formats: `eva_vit_g.pth` (raw keys, fp16, a smaller position grid),
    `llama/` (a LLaMA HF folder saved by transformers 4.30 + the SentencePiece `tokenizer.model`),
    `checkpoint.pth` (`{"model": ...}` with peft-0.2.0 key names and the `rotary_emb.inv_freq` buffers);
  - `reference.pt`: pixel values, questions, and upstream's first-token logits, generated ids and texts, and
    training loss;
one such set per variant of VARIANTS (sizes, tokenizer kind, LLaMA file format) in OUT_DIR/<variant>/.
The model code below follows docs/upstream.md (sections 1, 1.4 and 9) and runs the LLM, the tokenizer, LoRA and
generation through upstream's pinned transformers/peft, so the project's clean-room model is checked against the
libraries the original checkpoints were made with. Usage: python reference_430.py OUT_DIR
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model, prepare_model_for_int8_training
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from backend.tiny import build_tiny_sentencepiece  # noqa: E402  (a real SentencePiece model; no torch code)



@dataclass(frozen=True)
class Variant:
    """One tiny model. Heads follow upstream's rule width // 88 (at least 1); the rest is free."""

    image_size: int
    patch: int
    width: int
    depth: int
    mlp: int
    checkpoint_grid: int  # pos_embed is stored for this grid and interpolated at load, as 224 -> 448 upstream
    lora_r: int
    tokenizer: str  # "tiny": backend.tiny's LLaMA-like BPE with "$$"; "plain": SentencePiece defaults, no "$$"
    safetensors: bool  # how transformers 4.30 saves the LLaMA folder

    @property
    def heads(self) -> int:
        return max(1, self.width // 88)


VARIANTS = {
    "a": Variant(56, 7, 176, 2, 256, 6, 8, "tiny", False),
    "b": Variant(28, 14, 88, 3, 384, 4, 64, "plain", True),  # 1 head; the 4 x 4 grid is shrunk to 2 x 2
}
LORA_ALPHA = 16
QUESTIONS = ["[refer] give me the location of the pancreas", "[vqa] is there a tumor?"]
INSTRUCTIONS = ["[refer] where is the pancreas ?", "[vqa] Based on the image, respond to this question with yes or no: tumor?"]
ANSWERS = ["{<12><34><56><78>}", "yes"]


class EvaAttention(nn.Module):
    def __init__(self, v: Variant):
        super().__init__()
        self.heads, self.head_dim = v.heads, v.width // v.heads
        self.qkv = nn.Linear(v.width, 3 * v.width, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(v.width)), nn.Parameter(torch.zeros(v.width))
        self.proj = nn.Linear(v.width, v.width)

    def forward(self, x):
        b, n, _ = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        q, k, v = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = ((q * self.head_dim ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))


class EvaBlock(nn.Module):
    def __init__(self, v: Variant):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(v.width, eps=1e-6), nn.LayerNorm(v.width, eps=1e-6)
        self.attn = EvaAttention(v)
        self.mlp = nn.Sequential()
        self.mlp.fc1, self.mlp.act, self.mlp.fc2 = nn.Linear(v.width, v.mlp), nn.GELU(), nn.Linear(v.mlp, v.width)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp.fc2(self.mlp.act(self.mlp.fc1(self.norm2(x))))


class EvaViT(nn.Module):
    def __init__(self, v: Variant):
        super().__init__()
        grid = v.image_size // v.patch
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, v.width, v.patch, v.patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, v.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, v.width))
        self.blocks = nn.ModuleList(EvaBlock(v) for _ in range(v.depth))

    def forward(self, images):
        x = self.patch_embed.proj(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return x  # no final norm


def interpolate_pos_embed(state: dict, grid: int) -> None:
    pos = state["pos_embed"].float()
    old = int((pos.shape[1] - 1) ** 0.5)
    tokens = pos[:, 1:].reshape(1, old, old, pos.shape[2]).permute(0, 3, 1, 2)
    tokens = F.interpolate(tokens, size=(grid, grid), mode="bicubic", align_corners=False)
    state["pos_embed"] = torch.cat([pos[:, :1], tokens.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


class UpstreamMiniGPTv2(nn.Module):
    """MiniGPT-v2's forward paths as docs/upstream.md describes them."""

    def __init__(self, v: Variant, llama_dir: Path, vit_state: dict):
        super().__init__()
        self.visual_encoder = EvaViT(v)
        interpolate_pos_embed(vit_state, v.image_size // v.patch)
        self.visual_encoder.load_state_dict({k: v.float() for k, v in vit_state.items()}, strict=False)
        self.ln_vision = nn.LayerNorm(v.width)
        self.tokenizer = LlamaTokenizer.from_pretrained(str(llama_dir), use_fast=False)
        self.tokenizer.pad_token = "$$"
        llama = prepare_model_for_int8_training(LlamaForCausalLM.from_pretrained(str(llama_dir), torch_dtype=torch.float32))
        config = LoraConfig(r=v.lora_r, lora_alpha=LORA_ALPHA, target_modules=["q_proj", "v_proj"], lora_dropout=0.05,
                            bias="none", task_type="CAUSAL_LM")
        self.llama_model = get_peft_model(llama, config)
        self.llama_proj = nn.Linear(v.width * 4, llama.config.hidden_size)

    def embed(self, ids):
        return self.llama_model.base_model.model.model.embed_tokens(ids)

    def encode_img(self, images):
        x = self.ln_vision(self.visual_encoder(images))[:, 1:, :]
        b, n, h = x.shape
        return self.llama_proj(x.reshape(b, n // 4, h * 4))

    def context_emb(self, prompt, image_emb):
        segs = prompt.split("<ImageHere>")
        ids = [self.tokenizer(s, return_tensors="pt", add_special_tokens=i == 0).input_ids for i, s in enumerate(segs)]
        return torch.cat([self.embed(ids[0]), image_emb[None], self.embed(ids[1])], dim=1)

    def left_padded(self, images, questions):
        embs = [self.context_emb(f"<s>[INST] <Img><ImageHere></Img> {q} [/INST]", e)
                for q, e in zip(questions, self.encode_img(images))]
        length = max(e.shape[1] for e in embs)
        batch = torch.zeros(len(embs), length, embs[0].shape[2])
        mask = torch.zeros(len(embs), length, dtype=torch.int)
        for i, e in enumerate(embs):
            batch[i, -e.shape[1]:], mask[i, -e.shape[1]:] = e[0], 1
        return batch, mask

    def first_token_logits(self, images, questions):
        embs, mask = self.left_padded(images, questions)
        positions = mask.long().cumsum(-1) - 1  # what 4.30's generate passes on its first step
        positions.masked_fill_(mask == 0, 1)
        out = self.llama_model(inputs_embeds=embs, attention_mask=mask, position_ids=positions)
        return out.logits[:, -1].float()

    def generate(self, images, questions, max_new_tokens=20):
        embs, mask = self.left_padded(images, questions)
        outputs = self.llama_model.generate(
            inputs_embeds=embs, attention_mask=mask, max_new_tokens=max_new_tokens, num_beams=1, do_sample=False,
            min_length=1, top_p=0.9, repetition_penalty=1.0, length_penalty=1, temperature=1.0)
        texts = []
        for tokens in outputs:
            tokens = tokens[1:] if tokens[0] == 0 else tokens
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            texts.append(text.split("</s>")[0].replace("<s>", "").split("[/INST]")[-1].strip())
        return outputs, texts

    def training_loss(self, images, instructions, answers):
        image_embs = self.encode_img(images)
        wrapped = []
        for instruction, image_emb in zip(instructions, image_embs):
            before, after = f"[INST] <Img><ImageHere></Img> {instruction}  [/INST]".split("<ImageHere>")
            ids = [self.tokenizer(s, return_tensors="pt", add_special_tokens=False).input_ids for s in (before, after)]
            wrapped.append(torch.cat([self.embed(ids[0]), image_emb[None], self.embed(ids[1])], dim=1)[0])
        lengths = [w.shape[0] for w in wrapped]
        pad_emb = self.embed(torch.tensor(self.tokenizer.pad_token_id))
        self.tokenizer.padding_side = "right"
        answer = self.tokenizer([a + "</s>" for a in answers], return_tensors="pt", padding="longest",
                                truncation=True, max_length=1024, add_special_tokens=False)
        answer_targets = answer.input_ids.masked_fill(answer.input_ids == self.tokenizer.pad_token_id, -100)
        answer_embs = self.embed(answer.input_ids)
        rows, masks, targets = [], [], []
        width = max(lengths)
        for i, w in enumerate(wrapped):
            prompt_pad = pad_emb.expand(width - lengths[i], -1)
            bos = self.embed(torch.tensor([self.tokenizer.bos_token_id]))
            rows.append(torch.cat([bos, w, answer_embs[i], prompt_pad]))
            masks.append(torch.cat([torch.ones(1 + lengths[i], dtype=torch.long), answer.attention_mask[i],
                                    torch.zeros(width - lengths[i], dtype=torch.long)]))
            target = torch.full((rows[-1].shape[0],), -100)
            target[1 + lengths[i]:1 + lengths[i] + answer_targets.shape[1]] = answer_targets[i]
            targets.append(target)
        out = self.llama_model(inputs_embeds=torch.stack(rows), attention_mask=torch.stack(masks),
                               labels=torch.stack(targets))
        return out.loss


def plain_sentencepiece(folder: Path) -> Path:
    """A SentencePiece model with the library's defaults (unigram, no byte fallback) and no "$$" piece."""
    import sentencepiece as spm

    from backend.tiny import tiny_corpus_lines

    folder.mkdir(parents=True, exist_ok=True)
    lines = [line.replace("$$", " ") for line in tiny_corpus_lines()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(folder / "sp"), vocab_size=300,
                                   num_threads=1, minloglevel=2)
    (folder / "sp.model").rename(folder / "tokenizer.model")
    (folder / "sp.vocab").unlink()
    return folder / "tokenizer.model"


def write_artefacts(v: Variant, out: Path) -> UpstreamMiniGPTv2:
    torch.manual_seed(0)
    llama_dir = out / "llama"
    tokenizer_file = build_tiny_sentencepiece(llama_dir) if v.tokenizer == "tiny" else plain_sentencepiece(llama_dir)
    vocab = LlamaTokenizer(str(tokenizer_file)).vocab_size
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, rms_norm_eps=1e-6, max_position_embeddings=512)
    LlamaForCausalLM(config).save_pretrained(str(llama_dir), safe_serialization=v.safetensors)
    vit = EvaViT(v)
    for p in vit.parameters():
        nn.init.normal_(p, std=0.05)
    vit_state = {k: t.half() for k, t in vit.state_dict().items()}  # the real file is fp16
    grid = v.checkpoint_grid
    vit_state["pos_embed"] = (torch.randn(1, grid * grid + 1, v.width) * 0.05).half()
    torch.save(vit_state, out / "eva_vit_g.pth")
    model = UpstreamMiniGPTv2(v, llama_dir, dict(vit_state)).eval()
    for name, p in model.named_parameters():  # LoRA B starts at zero; give the adapters something to do
        if "lora_" in name or name.startswith("llama_proj"):
            with torch.no_grad():
                p.normal_(std=0.05)
    for p in [*model.visual_encoder.parameters(), *model.ln_vision.parameters()]:
        p.requires_grad = False  # upstream freezes the ViT and ln_vision
    # upstream's _save_checkpoint drops every frozen *parameter*; buffers (rotary inv_freq) stay in the file
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    state = {k: t for k, t in model.state_dict().items() if k not in frozen}
    torch.save({"model": state, "epoch": 3}, out / "checkpoint.pth")
    return model


def write_reference(v: Variant, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model = write_artefacts(v, out)
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, v.image_size, v.image_size)
    with torch.no_grad():
        logits = model.first_token_logits(pixels, QUESTIONS)
        ids, texts = model.generate(pixels, QUESTIONS)
        loss = model.training_loss(pixels, INSTRUCTIONS, ANSWERS)
    reference = {"pixel_values": pixels, "questions": QUESTIONS, "instructions": INSTRUCTIONS, "answers": ANSWERS,
                 "first_token_logits": logits, "generated_ids": ids, "texts": texts, "training_loss": loss,
                 "image_size": v.image_size, "vit_num_heads": v.heads}  # the weights do not tell the heads
    torch.save(reference, out / "reference.pt")
    print(f"reference written to {out}: loss {loss.item():.6f}, texts {texts}")


def main(out_dir: str) -> None:
    for name, variant in VARIANTS.items():
        write_reference(variant, Path(out_dir) / name)
    (Path(out_dir) / "reference.pt").write_text("done\n")  # the Makefile's marker that every variant exists


if __name__ == "__main__":
    main(sys.argv[1])

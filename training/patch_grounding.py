"""Stage 0's auxiliary objective: which ViT patches do the slice's boxes cover, and where are they?

A vision tower trained from scratch only through the language model's answer loss learns slowly: until the
LLaMA learns to attend to the right image tokens, the gradient reaching the tower says little about WHERE things
are, and the model first settles on answering the average box whatever the image. MiniGPT-v2 never had that
problem (its EVA ViT came pre-trained), so the demo's stage 0, which stands in for that pre-training, adds a
dense signal: a linear head on the tower's patch features (the output of `ln_vision`) predicts, per structure
(phrase), (a) which parts of each patch lie inside the answer's box (binary cross-entropy over a 4 x 4
subdivision of every patch: a pancreas is one or two patches wide, so a whole-patch mask says too little about
where inside them its edges are) and (b) at EVERY patch, the box's four coordinates (squared error, as fractions
of the side). (b) puts the answer itself into every image token, so the language model only has to read it out,
not to find a minimum over tokens. The head is discarded after stage 0; only the trained tower remains, in the
model's own format.

Every box the slice's record knows is a target, not only the asked one (`grounding_targets`): an MSD-layout
slice gives its pancreas box and its tumour box, or the tumour's absence (an all-zero mask and no coordinates),
whatever the example asks, the tumour yes/no examples included. Why: with the asked box alone the
tumour channel only ever saw slices that have a tumour, so the tower learnt where the most tumour-like spot is
but never whether there is one, and the demo model answered the yes/no question at chance (balanced accuracy
0.50). At the demo's 128 px this alone did not fix it: after the tower stage, the tumour channel's largest
logit still told tumour slices from the others no better than chance (ROC AUC 0.51 on the training slices;
most phantom tumours are 2-6 px there). An NIH-layout slice records its pancreas only, an AbdomenCT-1K-layout
entry only the asked organ.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from backend import prompts
from backend.model import MiniGPTv2
from SlicerMiniGPTPancreas import grammar

PHRASES = (*prompts.ABD_ORGANS, prompts.TUMOR_PHRASE)  # liver, kidney, spleen, pancreas, pancreatic tumor
SUBDIVISION = 4  # each patch's mask is predicted on a SUBDIVISION x SUBDIVISION grid of its own


class PatchGroundingLoss(nn.Module):
    """BCE between a per-phrase sub-patch map predicted from the ViT features and the answer box's mask, plus the
    box regressed at every patch."""

    def __init__(self, model: MiniGPTv2) -> None:
        super().__init__()
        self.grid = model.config.vision.grid_size
        self.outputs = SUBDIVISION ** 2 + 4  # per phrase: the inside-the-box logits of the sub-cells + 4 coordinates
        self.head = nn.Linear(model.config.vision.width, len(PHRASES) * self.outputs).to(model.device)
        self._features: torch.Tensor | None = None
        # the tower's output as the language model sees it (before the token merge), captured during the forward
        model.ln_vision.register_forward_hook(lambda module, inputs, output: setattr(self, "_features", output))

    def forward(self, targets: list[dict[str, str]]) -> torch.Tensor:
        """The loss of the batch whose `training_loss` just ran (it filled the captured features); `targets` holds,
        per example, phrase -> answer box of every structure to ground (`grounding_targets`, augmented)."""
        parsed = [(row, phrase, grammar.parse_answer(answer)) for row, of_row in enumerate(targets)
                  for phrase, answer in of_row.items() if phrase in PHRASES]
        pairs = [(row, PHRASES.index(phrase), mask, self._box_fractions(answer)) for row, phrase, answer in parsed
                 if (mask := self._mask(answer)) is not None]
        if not pairs:
            return self._features.sum() * 0.0  # keeps the graph (and DDP) consistent on a batch without boxes
        rows, channels, masks, boxes = zip(*pairs)
        out = self.head(self._features[list(rows), 1:].float())  # [N, P, len(PHRASES) * outputs]
        out = out.view(len(rows), out.shape[1], len(PHRASES), self.outputs)[torch.arange(len(rows)), :, channels]
        inside_logits, coordinates = out[..., :-4], out[..., -4:]  # [N, P, SUBDIVISION ** 2], [N, P, 4]
        device = out.device
        inside = F.binary_cross_entropy_with_logits(inside_logits, torch.stack(masks).to(device), reduction="none")
        loss = inside.mean(dim=(1, 2)).sum()
        present = [k for k, box in enumerate(boxes) if box is not None]
        if present:
            targets_at_patches = torch.stack([boxes[k] for k in present]).to(device)[:, None]  # [N', 1, 4]
            where = F.mse_loss(torch.sigmoid(coordinates[present]), targets_at_patches.expand(-1, out.shape[1], 4),
                               reduction="none").mean(dim=(1, 2))
            loss = loss + 10.0 * where.sum()  # 10: a coordinate off by 0.1 weighs like a clearly wrong patch
        return loss / len(set(rows))  # per example: one that grounds two structures counts both

    def box_mask(self, answer: str) -> torch.Tensor | None:
        """[P, SUBDIVISION ** 2] 1.0 on the sub-cells of each patch (row-major, both) that a "{<x1><y1><x2><y2>}"
        answer (0-100 grid) covers: all zero for the absent box, None for an answer without a box."""
        return self._mask(grammar.parse_answer(answer))

    def _mask(self, parsed: grammar.ParsedAnswer) -> torch.Tensor | None:
        cells = self.grid * SUBDIVISION
        mask = torch.zeros(cells, cells)
        if not parsed.grid_boxes:
            return mask.view(self.grid * self.grid, SUBDIVISION ** 2) if parsed.absent else None
        x1, y1, x2, y2 = parsed.grid_boxes[0].as_tuple()
        # grid value g covers [g, g + 1) hundredths of the side: cells floor(g * cells / 100) .. of (g + 1) - eps
        first, last = (lambda g: g * cells // 100), (lambda g: ((g + 1) * cells - 1) // 100)
        mask[first(y1):last(y2) + 1, first(x1):last(x2) + 1] = 1.0
        # [grid, SUB, grid, SUB] -> [grid, grid, SUB, SUB] -> [P, SUB * SUB]
        return mask.view(self.grid, SUBDIVISION, self.grid, SUBDIVISION).permute(0, 2, 1, 3).reshape(
            self.grid * self.grid, SUBDIVISION ** 2)

    @staticmethod
    def _box_fractions(parsed: grammar.ParsedAnswer) -> torch.Tensor | None:
        """[4] the answer's first box as fractions of the side; None for the absent box."""
        return torch.tensor(parsed.grid_boxes[0].as_tuple()) / 100.0 if parsed.grid_boxes else None


def grounding_targets(entry: dict[str, Any]) -> dict[str, str]:
    """phrase -> answer box of every structure the task entry's record knows: its pancreas and tumour boxes
    (`grammar.ABSENT_ANSWER` where the slice has none) when prepare recorded them, and the asked phrase's answer."""
    targets = {}
    for structure, phrase in (("pancreas", prompts.PANCREAS_PHRASE), ("tumor", prompts.TUMOR_PHRASE)):
        pixels, box = entry.get(f"pixels_{structure}"), entry.get(f"bbox_{structure}")
        if isinstance(pixels, int) and isinstance(box, list) and len(box) == 4 and "width" in entry:
            targets[phrase] = grammar.render_box(box if pixels > 0 else None, entry["width"], entry["height"])
    if entry.get("phrase") in PHRASES:
        targets[entry["phrase"]] = entry["answer"]
    return targets

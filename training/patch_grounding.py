"""Stage 0's auxiliary objective: which ViT patches does the asked box cover, and where is that box?

A vision tower trained from scratch only through the language model's answer loss learns slowly: until the
LLaMA learns to attend to the right image tokens, the gradient reaching the tower says little about WHERE things
are, and the model first settles on answering the average box whatever the image. MiniGPT-v2 never had that
problem (its EVA ViT came pre-trained), so the demo's stage 0, which stands in for that pre-training, adds a
dense signal: a linear head on the tower's patch features (the output of `ln_vision`) predicts, for the phrase
asked about, (a) which parts of each patch lie inside the answer's box (binary cross-entropy over a 4 x 4
subdivision of every patch: a pancreas is one or two patches wide, so a whole-patch mask says too little about
where inside them its edges are) and (b) at EVERY patch, the box's four coordinates (squared error, as fractions
of the side). (b) puts the answer
itself into every image token, so the language model only has to read it out, not to find a minimum over tokens.
The head is discarded after stage 0; only the trained tower remains, in the model's own format.

Only detection examples with a phrase from `PHRASES` and a readable box answer contribute; yes/no examples and
empty boxes do not.
"""

from __future__ import annotations

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

    def forward(self, phrases: list[str | None], answers: list[str]) -> torch.Tensor:
        """The loss of the batch whose `training_loss` just ran (it filled the captured features)."""
        rows, channels, masks, boxes = [], [], [], []
        for row, (phrase, answer) in enumerate(zip(phrases, answers)):
            mask = self.box_mask(answer)
            if phrase in PHRASES and mask is not None:
                rows.append(row)
                channels.append(PHRASES.index(phrase))
                masks.append(mask)
                boxes.append(torch.tensor(grammar.parse_answer(answer).grid_boxes[0].as_tuple()) / 100.0)
        if not rows:
            return self._features.sum() * 0.0  # keeps the graph (and DDP) consistent on a batch without boxes
        out = self.head(self._features[rows, 1:].float())  # [N, P, len(PHRASES) * outputs]
        out = out.view(len(rows), out.shape[1], len(PHRASES), self.outputs)[torch.arange(len(rows)), :, channels]
        inside_logits, coordinates = out[..., :-4], out[..., -4:]  # [N, P, SUBDIVISION ** 2], [N, P, 4]
        device = out.device
        inside = F.binary_cross_entropy_with_logits(inside_logits, torch.stack(masks).to(device))
        targets = torch.stack(boxes).to(device)[:, None].expand_as(coordinates)
        where = F.mse_loss(torch.sigmoid(coordinates), targets)
        return inside + 10.0 * where  # 10: a coordinate off by 0.1 weighs like a clearly wrong patch

    def box_mask(self, answer: str) -> torch.Tensor | None:
        """[P, SUBDIVISION ** 2] 1.0 on the sub-cells of each patch (row-major, both) that a "{<x1><y1><x2><y2>}"
        answer (0-100 grid) covers; None for an empty or absent box."""
        parsed = grammar.parse_answer(answer)
        if not parsed.grid_boxes or parsed.grid_boxes[0].is_absent:
            return None
        x1, y1, x2, y2 = parsed.grid_boxes[0].as_tuple()
        cells = self.grid * SUBDIVISION
        mask = torch.zeros(cells, cells)
        # grid value g covers [g, g + 1) hundredths of the side: cells floor(g * cells / 100) .. of (g + 1) - eps
        first, last = (lambda g: g * cells // 100), (lambda g: ((g + 1) * cells - 1) // 100)
        mask[first(y1):last(y2) + 1, first(x1):last(x2) + 1] = 1.0
        # [grid, SUB, grid, SUB] -> [grid, grid, SUB, SUB] -> [P, SUB * SUB]
        return mask.view(self.grid, SUBDIVISION, self.grid, SUBDIVISION).permute(0, 2, 1, 3).reshape(
            self.grid * self.grid, SUBDIVISION ** 2)

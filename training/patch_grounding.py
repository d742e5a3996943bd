"""Stage 0's auxiliary objective: which ViT patches does the asked box cover, and where is that box?

A vision tower trained from scratch only through the language model's answer loss learns slowly: until the
LLaMA learns to attend to the right image tokens, the gradient reaching the tower says little about WHERE things
are, and the model first settles on answering the average box whatever the image. MiniGPT-v2 never had that
problem (its EVA ViT came pre-trained), so the demo's stage 0, which stands in for that pre-training, adds a
dense signal: a linear head on the tower's patch features (the output of `ln_vision`) predicts, for the phrase
asked about, (a) whether each patch lies inside the answer's box (binary cross-entropy over the patch grid) and
(b) at EVERY patch, the box's four coordinates (squared error, as fractions of the side). (b) puts the answer
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


class PatchGroundingLoss(nn.Module):
    """BCE between a per-phrase patch map predicted from the ViT features and the answer box's patch mask."""

    def __init__(self, model: MiniGPTv2) -> None:
        super().__init__()
        self.grid = model.config.vision.grid_size
        # per phrase: 1 inside-the-box logit + 4 box coordinates
        self.head = nn.Linear(model.config.vision.width, len(PHRASES) * 5).to(model.device)
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
        out = self.head(self._features[rows, 1:].float())  # [N, P, len(PHRASES) * 5]
        out = out.view(len(rows), out.shape[1], len(PHRASES), 5)[torch.arange(len(rows)), :, channels]  # [N, P, 5]
        device = out.device
        inside = F.binary_cross_entropy_with_logits(out[..., 0], torch.stack(masks).to(device))
        where = F.mse_loss(torch.sigmoid(out[..., 1:]), torch.stack(boxes).to(device)[:, None].expand_as(out[..., 1:]))
        return inside + 10.0 * where  # 10: a coordinate off by 0.1 weighs like a clearly wrong patch

    def box_mask(self, answer: str) -> torch.Tensor | None:
        """[P] 1.0 on the patches a "{<x1><y1><x2><y2>}" answer (0-100 grid) covers, row-major; None if empty."""
        parsed = grammar.parse_answer(answer)
        if not parsed.grid_boxes or parsed.grid_boxes[0].is_absent:
            return None
        x1, y1, x2, y2 = parsed.grid_boxes[0].as_tuple()
        mask = torch.zeros(self.grid, self.grid)
        # grid value g covers [g, g + 1) hundredths of the side: patches floor(g * grid / 100) .. of (g + 1) - eps
        first, last = (lambda g: g * self.grid // 100), (lambda g: ((g + 1) * self.grid - 1) // 100)
        mask[first(y1):last(y2) + 1, first(x1):last(x2) + 1] = 1.0
        return mask.flatten()

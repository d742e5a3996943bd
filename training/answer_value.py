"""Stage 0's second auxiliary objective: the hidden state that writes a box number must hold that number.

The answer loss teaches a box coordinate through the cross-entropy of its digits, a signal that says "wrong
digit" but not "how far off", and that only arrives once the LLaMA has learned to look at the image tokens. A
small model trained from scratch then settles for the training set's average digits for a long time (after 3000
steps of stage 0 the units digits were still at chance). This objective gives the missing slope: a linear head
on the LLaMA's last hidden state, at every position whose next token is a digit of a number in the answer,
regresses that number's value (as a fraction of the 0-100 grid, squared error). The digit readout (LM head)
then only has to cut a value the hidden state already carries into digits. The head is discarded after stage 0.

Numbers are found from the labels: maximal runs of single-digit tokens. Answers without digits (yes/no) add 0.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from backend.batching import IGNORE_INDEX
from backend.model import MiniGPTv2, TrainingOutput
from SlicerMiniGPTPancreas.grammar import GRID


class AnswerValueLoss(nn.Module):
    """Squared error between each answer number (/100) and a linear readout of the states that write it."""

    def __init__(self, model: MiniGPTv2) -> None:
        super().__init__()
        self.head = nn.Linear(model.llama_model.config.hidden_size, 1).to(model.device)
        sp = model.tokenizer.sp
        digits = [-1] * sp.get_piece_size()  # token id -> the digit it spells, -1 for every other token
        for token_id in range(sp.get_piece_size()):
            text = sp.id_to_piece(token_id).lstrip("\u2581")  # "▁7" after a space is the digit 7 too
            if len(text) == 1 and text.isdigit():
                digits[token_id] = int(text)
        self.register_buffer("digit_of_token", torch.tensor(digits + [-1], device=model.device), persistent=False)

    def forward(self, output: TrainingOutput) -> torch.Tensor:
        positions, targets = self.number_positions(output.labels)
        if not positions:
            return output.hidden.sum() * 0.0  # keeps the graph (and DDP) consistent on a batch without numbers
        rows, columns = zip(*positions)
        values = self.head(output.hidden[list(rows), list(columns)].float()).squeeze(-1)  # [N]
        return F.mse_loss(torch.sigmoid(values), torch.tensor(targets, device=values.device))

    def number_positions(self, labels: torch.Tensor) -> tuple[list[tuple[int, int]], list[float]]:
        """(row, position) of each state whose next token is an answer digit, and its number's value / GRID."""
        # [B, L] digit value of each label, -1 elsewhere (IGNORE_INDEX maps to the table's last entry)
        digit = self.digit_of_token[labels.masked_fill(labels == IGNORE_INDEX, -1)].tolist()
        positions, targets = [], []
        for row, values in enumerate(digit):
            start = None
            for column, value in enumerate([*values, -1]):
                if value >= 0 and start is None:
                    start = column
                elif value < 0 and start is not None:
                    number = int("".join(str(v) for v in values[start:column]))
                    positions += [(row, c - 1) for c in range(start, column)]  # state t predicts label t + 1
                    targets += [min(number, GRID) / GRID] * (column - start)
                    start = None
        return positions, targets

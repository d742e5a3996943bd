"""A free conversation about one slice, turn by turn (the service's /api/v1/chat takes the whole history).

The history belongs to a slice of a volume: asking about another slice starts a new conversation, because the
model's answers (and the boxes in them) refer to the image it was shown.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from SlicerMiniGPTPancreas import protocol as p


@dataclass
class ChatSession:
    """The turns so far about `(volume_id, slice_index)`; user and assistant alternate, the user first."""

    volume_id: str | None = None
    slice_index: int | None = None
    messages: list[p.ChatMessage] = field(default_factory=list)

    def ask(self, volume_id: str, slice_index: int, question: str) -> tuple[p.ChatMessage, ...]:
        """The messages to send for `question` (a new conversation when the slice changed)."""
        question = question.strip()
        if not question:
            raise ValueError("Type a question about the current slice first.")
        if (volume_id, slice_index) != (self.volume_id, self.slice_index):
            self.volume_id, self.slice_index, self.messages = volume_id, slice_index, []
        return tuple(self.messages) + (p.ChatMessage("user", question),)

    def record(self, sent: tuple[p.ChatMessage, ...], answer: str) -> None:
        """Keep a finished turn (an unanswered or cancelled question leaves the history as it was)."""
        self.messages = list(sent) + [p.ChatMessage("assistant", answer.strip() or "(no answer)")]

    def transcript(self) -> str:
        """The conversation as text for the panel: 'You: ...' / 'Model: ...' lines."""
        where = "" if self.slice_index is None else f"Slice {self.slice_index}\n"
        return where + "\n".join(f"{'You' if m.role == 'user' else 'Model'}: {m.text}" for m in self.messages)

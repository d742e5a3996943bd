"""The model's answer grammar: render boxes exactly as upstream did, parse answers back, decode grid values.

Upstream (MiniGPT-Pancreas / MiniGPT-v2, docs/upstream.md section 3) writes a box on a W x H slice as
"{<x1><y1><x2><y2>}", each value `int(coord / size * 100)` on a 0..100 grid, x = column (divided by W),
y = row (divided by H). Several boxes are joined by "<delim>", labelled groups read "<p>label</p> {..}<delim>{..}"
and are joined by a space, "{<0><0><0><0>}" means "absent" (balanced sets), and classification answers are
"yes" / "no".

Parsing is total: `parse_answer` turns any input into a `ParsedAnswer` and never raises. Decisions:
  * an answer whose boxes are all zero is kind "boxes" with `absent=True` and an EMPTY `grid_boxes` list, so
    nothing is ever drawn for it; zero boxes among real ones are dropped (their labels go to `absent_labels`);
  * swapped corners (x1 > x2 or y1 > y2) are refused, not normalised: upstream never renders them, so they are a
    model error, and upstream's metrics do not normalise them either;
  * any malformed box makes the whole answer invalid (with the reason); `grid_boxes` is then empty.
"""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Literal, Sequence

from .errors import UserError

GRID = 100
Box = tuple[float, float, float, float]  # (x_min, y_min, x_max, y_max) in pixel index coordinates; x = column
ABSENT_ANSWER = "{<0><0><0><0>}"

AnswerKind = Literal["boxes", "yes_no", "text", "invalid"]


class GrammarError(UserError, ValueError):
    """A box, image size or option that cannot be rendered or decoded; the message says what to fix."""


@dataclass(frozen=True)
class GridBox:
    """One box on the 0..100 grid as the model wrote it, with the phrase label it belongs to (if any)."""

    x1: int
    y1: int
    x2: int
    y2: int
    label: str | None = None

    def as_tuple(self) -> tuple[int, int, int, int]:
        """The four grid values (x1, y1, x2, y2)."""
        return (self.x1, self.y1, self.x2, self.y2)

    @property
    def is_absent(self) -> bool:
        """True for the all-zero box, upstream's "absent" answer."""
        return self.as_tuple() == (0, 0, 0, 0)


@dataclass
class ParsedAnswer:
    """What a model answer says. `text` is the answer as received; `reason` explains invalid/text results."""

    kind: AnswerKind
    text: str
    grid_boxes: list[GridBox] = field(default_factory=list)
    yes: bool | None = None
    absent: bool = False
    absent_labels: list[str] = field(default_factory=list)
    reason: str | None = None


# ----------------------------------------------------------------------------------------------- rendering

def check_image_size(width: object, height: object) -> tuple[int, int]:
    """(width, height) as ints, or GrammarError unless both are positive whole numbers of pixels."""
    sizes = []
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
            raise GrammarError(f"image {name} must be a positive whole number of pixels, got {value!r}")
        sizes.append(int(value))
    return sizes[0], sizes[1]


def _grid_value(coord: float, size: int) -> int:
    # Upstream's exact float expression: x / W * 100, truncated. Note 29 / 100 * 100 == 28.999999999999996,
    # so this is NOT always floor(100 * x / W); the float form is what the model was trained on.
    return int(coord / size * GRID)


def render_box(box: Sequence[float] | None, width: int, height: int) -> str:
    """Render one pixel box as upstream's "{<x1><y1><x2><y2>}"; None renders the absent answer.

    Coordinates may lie anywhere in [0, size] (inclusive integer indices, or float edges). Note upstream's
    quirk: a box entirely inside the first grid cell renders as the absent answer, too.
    """
    if box is None:
        return ABSENT_ANSWER
    w, h = check_image_size(width, height)
    if len(box) != 4:
        raise GrammarError(f"a box has 4 values (x_min, y_min, x_max, y_max), got {len(box)}: {box!r}")
    x1, y1, x2, y2 = (float(v) for v in box)
    for name, value, size in (("x_min", x1, w), ("y_min", y1, h), ("x_max", x2, w), ("y_max", y2, h)):
        if not math.isfinite(value) or not 0 <= value <= size:
            raise GrammarError(f"box {tuple(box)}: {name}={value} is outside the image (0..{size})")
    if x1 > x2 or y1 > y2:
        raise GrammarError(f"box {tuple(box)} has min > max; boxes are (x_min, y_min, x_max, y_max)")
    values = (_grid_value(x1, w), _grid_value(y1, h), _grid_value(x2, w), _grid_value(y2, h))
    return "{" + "".join(f"<{v}>" for v in values) + "}"


# ------------------------------------------------------------------------------------------------- parsing

_TOKEN = re.compile(
    r"(?P<phrase><\s*p\s*>(?P<label>.*?)<\s*/\s*p\s*>)"
    r"|(?P<box>\{(?P<content>[^{}]*)\})"
    r"|(?P<open>\{)"
    r"|(?P<delim><\s*delim\s*>)"
    r"|(?P<open_phrase><\s*p\s*>)"
    r"|(?P<bare_number><\s*[-+]?\d[\d\s]*>)",
    re.DOTALL | re.IGNORECASE,
)
_NUMBER_SLOT = re.compile(r"<([^<>]*)>")
_INTEGER = re.compile(r"[-+]?\d+", re.ASCII)
_YES_NO = re.compile(r"(yes|no)\b", re.ASCII)


def _as_text(answer: object) -> tuple[str, str | None]:
    """The answer as text, or a reason why it is not text."""
    if answer is None:
        return "", "no answer (None)"
    if isinstance(answer, (bytes, bytearray)):
        return bytes(answer).decode("utf-8", errors="replace"), None
    if not isinstance(answer, str):
        return "", f"expected the answer as text, got {type(answer).__name__}"
    return answer, None


def _strip_noise(text: str) -> str:
    # Upstream post-processing: cut at the end-of-sequence marker, drop "<s>" and the "<unk>" noise tokens.
    return text.split("</s>")[0].replace("<s>", "").replace("<unk>", "")


def _parse_box(content: str, number: int, label: str | None) -> GridBox | str:
    """A GridBox from the text between "{" and "}", or the reason it is malformed."""
    slots = _NUMBER_SLOT.findall(content)
    leftover = _NUMBER_SLOT.sub("", content).strip()
    if leftover:
        return f"box {number} has unexpected text {leftover!r} between its <n> values"
    if len(slots) != 4:
        return f"box {number} has {len(slots)} values, expected 4 (x1, y1, x2, y2)"
    values = []
    for slot in slots:
        digits = re.sub(r"\s+", "", slot)  # upstream removes every space, so "<1 2>" is 12
        if not _INTEGER.fullmatch(digits):
            return f"box {number} value <{slot}> is not a whole number"
        value = int(digits)
        if not 0 <= value <= GRID:
            return f"box {number} value {value} is outside the grid 0..{GRID}"
        values.append(value)
    x1, y1, x2, y2 = values
    if x1 > x2 or y1 > y2:
        return f"box {number} has swapped corners ({x1}, {y1}) / ({x2}, {y2}); x1 <= x2 and y1 <= y2 are required"
    return GridBox(x1, y1, x2, y2, label)


def _scan_boxes(text: str) -> tuple[list[GridBox], bool, str | None]:
    """All boxes in reading order with their labels, whether any markup was seen, and the first problem.

    Label rule (upstream demo grammar): "<p>label</p>" labels the next box and every box chained to it with
    "<delim>"; after a box, anything but "<delim>" ends the label.
    """
    boxes: list[GridBox] = []
    markup = False
    label: str | None = None
    after_box = False
    position = 0
    for match in _TOKEN.finditer(text):
        markup = True
        if after_box and text[position:match.start()].strip():
            label = None  # free text after a box ends the labelled group
        position = match.end()
        if match.group("phrase"):
            label = match.group("label").strip() or None
            if label and any(ch in label for ch in "<>{}"):
                return [], True, f"phrase label {label!r} contains markup: is a '</p>' missing?"
            after_box = False
        elif match.group("box") is not None:
            if after_box:
                label = None  # two boxes without "<delim>": the second one starts a new, unlabelled group
            parsed = _parse_box(match.group("content"), len(boxes) + 1, label)
            if isinstance(parsed, str):
                return [], True, parsed
            boxes.append(parsed)
            after_box = True
        elif match.group("delim"):
            after_box = False
        elif match.group("open"):
            return [], True, f"box {len(boxes) + 1} is not closed with '}}' (was the answer cut off?)"
        elif match.group("open_phrase"):
            return [], True, "a '<p>' phrase is not closed with '</p>'"
        else:
            return [], True, f"value {match.group('bare_number').strip()} stands outside any {{...}} box"
    return boxes, markup, None


def parse_answer(answer: object) -> ParsedAnswer:
    """Parse a model answer of any kind; never raises. See the module docstring for the decisions."""
    raw, problem = _as_text(answer)
    if problem:
        return ParsedAnswer("invalid", raw, reason=problem)
    text = _strip_noise(raw)
    if not text.strip():
        return ParsedAnswer("invalid", raw, reason="the answer is empty")
    boxes, markup, problem = _scan_boxes(text)
    if problem:
        return ParsedAnswer("invalid", raw, reason=problem)
    if boxes:
        present = [box for box in boxes if not box.is_absent]
        absent_labels = [box.label for box in boxes if box.is_absent and box.label]
        return ParsedAnswer("boxes", raw, grid_boxes=present, absent=not present, absent_labels=absent_labels)
    if markup:
        return ParsedAnswer("invalid", raw, reason="the answer has '<p>'/'<delim>' markup but no box")
    yes = parse_yes_no(text, rule="strict")
    if yes is not None:
        return ParsedAnswer("yes_no", raw, yes=yes)
    return ParsedAnswer("text", raw, reason="no box and no yes/no in the answer")


def parse_yes_no(answer: object, rule: Literal["strict", "upstream"] = "strict") -> bool | None:
    """True for yes, False for no; under "strict", None when the answer is neither.

    "upstream" copies eval_vqa.py + eval_TC.py: lower-case, drop "<unk>", strip; exactly "yes" is yes and
    ANYTHING else is no (so "yes." counts as no). "strict": case, spaces, "<unk>" and punctuation are ignored and
    the first word decides ("Yes.", "no, it does not" parse; "yesterday", "maybe" are None).
    """
    if rule == "upstream":
        return str(answer).lower().replace("<unk>", "").strip() == "yes"
    if rule != "strict":
        raise GrammarError(f"unknown yes/no rule {rule!r}; use 'strict' or 'upstream'")
    text, problem = _as_text(answer)
    if problem:
        return None
    words = _strip_noise(text).strip().lower().lstrip(" \t\n\"'([*-")
    match = _YES_NO.match(words)
    return None if match is None else match.group(1) == "yes"


# ------------------------------------------------------------------------------------------------ decoding

def _cell_center(g: int, size: int) -> float:
    """The centre of the pixel indices x in 0..size-1 that upstream renders to grid value g.

    Math: int(x / size * 100) == g  <=>  g * size / 100 <= x < (g + 1) * size / 100, so the indices are
    lo = ceil(g * size / 100) .. hi = ceil((g + 1) * size / 100) - 1, and the centre is (lo + hi) / 2: the
    unbiased estimate of a coordinate known only to lie in that cell. Upstream's float expression can land
    just below an exact integer (29 / 100 * 100 = 28.999...) but never above one (a non-integer 100x/size is at
    least 1/size from the next integer, far more than the rounding error), so a pixel can only fall one cell
    lower: the loops extend hi over such pixels and move lo past them. A cell that holds no pixel index
    (size < 100, or g = 100) decodes to the middle of its interval, clamped to the image.
    """
    lo = -(-g * size // GRID)
    hi = min(-(-(g + 1) * size // GRID) - 1, size - 1)
    while hi + 1 < size and _grid_value(hi + 1, size) <= g:
        hi += 1
    while lo <= hi and _grid_value(lo, size) < g:
        lo += 1
    if lo > hi:
        return min(max((g + 0.5) * size / GRID, 0.0), size - 1.0)
    return (lo + hi) / 2


def grid_to_pixels(grid_box: GridBox | Sequence[int], width: int, height: int,
                   mode: Literal["center", "floor"] = "center") -> Box:
    """Decode a grid box to a pixel box (floats, index coordinates of the W x H slice).

    "floor" reproduces upstream's evaluation, g / 100 * W (the value g*W/100 in upstream's float order): it maps
    every value to the low edge of its cell and so shifts boxes up-left by half a cell on average. "center"
    (default) maps each value to the centre of the pixel indices that render to it (see `_cell_center`).
    """
    w, h = check_image_size(width, height)
    values = grid_box.as_tuple() if isinstance(grid_box, GridBox) else tuple(grid_box)
    if len(values) != 4 or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 0 <= v <= GRID
                               for v in values):
        raise GrammarError(f"a grid box is 4 whole numbers in 0..{GRID}, got {values!r}")
    values = tuple(int(v) for v in values)
    sizes = (w, h, w, h)
    if mode == "floor":
        x1, y1, x2, y2 = (v / float(GRID) * s for v, s in zip(values, sizes))
    elif mode == "center":
        x1, y1, x2, y2 = (_cell_center(v, s) for v, s in zip(values, sizes))
    else:
        raise GrammarError(f"unknown decoding mode {mode!r}; use 'center' or 'floor'")
    return (x1, y1, x2, y2)

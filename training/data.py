"""Training data for `fit`: prepared task files as datasets, upstream's prompt sampling, and batches drawn the way
upstream's loaders draw them (docs/upstream.md sections 4.6 and 5.1).

* Each task entry (training/prepare/tasks.py) becomes (image, instruction, answer). Entries with a `phrase` are
  refer (detection) examples: instruction = a uniform choice from `REFER_TEMPLATES` with the phrase, answer = the
  entry's box string. Entries without one are tumour-classification examples: a TC instruction and question,
  answer `caption_text(answer)` ("yes" / "no").
* Per iteration ONE dataset is chosen with probability sample_ratio / sum(ratios) (upstream `MultiIterLoader`);
  the batch comes from that dataset alone. Each dataset is an endless sequence of passes; a pass is a seeded
  shuffle of its entries, split over the processes, cut into full batches (the incomplete last one is dropped),
  as upstream's `IterLoader(DataLoader(DistributedSampler(shuffle=True), drop_last=True))`.
* With `augment` on (training.augment), each example's slice is zoomed and shifted at random and its boxes moved
  with it, and its grey levels pass through a random monotone curve, all drawn from a seed of its own (seed, rank,
  example number), so threads cannot change what is drawn.
* All randomness comes from `random.Random` objects seeded by (seed, rank); `state_dict` captures them, so a
  resumed run draws exactly the batches and prompts an uninterrupted one would.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from backend.close_up import asked_closer
from backend.image import preprocess_image
from backend.prompts import PANCREAS_PHRASE, caption_text, sample_refer_instruction, sample_tc_instruction
from SlicerMiniGPTPancreas.errors import UserError
from training.augment import Augmentation, adjust_intensity, augment_example
from training.config import DatasetSpec
from training.patch_grounding import grounding_targets

YES_NO = ("yes", "no")


class DataError(UserError, ValueError):
    """A task file, one of its entries or one of its images cannot be used; the message names it."""


@dataclass(frozen=True)
class Batch:
    pixels: torch.Tensor  # [B, 3, S, S] float32, the model's input (backend.preprocess_image)
    instructions: list[str]
    answers: list[str]
    dataset: int  # index of the dataset it came from
    grounding: list[dict[str, str]]  # per example: phrase -> box answer of each structure to ground, augmented


def training_example(entry: dict[str, Any], rng: random.Random) -> tuple[str, str]:
    """(instruction, answer) for one task entry, the instruction drawn from upstream's pools with `rng`."""
    if entry.get("phrase"):
        return sample_refer_instruction(rng, entry["phrase"]), entry["answer"]
    return sample_tc_instruction(rng), caption_text(entry["answer"])


def _close_up_centre(entry: dict[str, Any]) -> str | None:
    """The pancreas box round which a close-up of this example may be drawn: only for the questions asked of a
    close-up at inference (pancreas, tumour, tumour yes/no; `backend.close_up`), so the other organs are learnt
    on whole slices, as they are asked."""
    return grounding_targets(entry).get(PANCREAS_PHRASE) if asked_closer(entry.get("phrase")) else None


class TaskDataset:
    """The entries of one prepared task file, checked when read: every image exists, every entry is usable."""

    def __init__(self, spec: DatasetSpec) -> None:
        self.spec = spec
        try:
            entries = json.loads(spec.task_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DataError(f"cannot read task file {spec.task_file}: {error}.") from error
        if not isinstance(entries, list) or not entries:
            raise DataError(f"task file {spec.task_file} holds no entries (expected a non-empty JSON list).")
        for number, entry in enumerate(entries):
            _check_entry(entry, number, spec.task_file)
        self.entries: list[dict[str, Any]] = entries
        self.image_paths = [spec.images_root / entry["image"] for entry in entries]
        missing = [path for path in self.image_paths if not path.is_file()]
        if missing:
            raise DataError(f"{len(missing)} of {len(entries)} images of {spec.task_file} are missing, e.g. "
                            f"{', '.join(str(p) for p in missing[:3])}. Re-run `prepare`, or set images_root "
                            "to the prepare output folder.")

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def name(self) -> str:
        return self.spec.task_file.stem


def _check_entry(entry: Any, number: int, file: Path) -> None:
    where = f"{file}, entry {number} (q_id {entry.get('q_id') if isinstance(entry, dict) else None})"
    if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or not isinstance(
            entry.get("answer"), str):
        raise DataError(f"{where}: an entry needs string keys 'image' and 'answer'; is this a prepared task file?")
    if not entry.get("phrase") and caption_text(entry["answer"]) not in YES_NO:
        raise DataError(f"{where}: no 'phrase', so a classification entry, but its answer {entry['answer']!r} "
                        "is not yes/no.")


class MultiTaskSampler:
    """Chooses (dataset, entry indices) per iteration; see the module docstring for the rules."""

    def __init__(self, sizes: Sequence[int], ratios: Sequence[float], batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, names: Sequence[str] | None = None) -> None:
        if len(sizes) != len(ratios) or not sizes or min(ratios) <= 0:
            raise ValueError("give one positive sample ratio per dataset.")
        for index, size in enumerate(sizes):
            if size // world_size < batch_size:
                name = names[index] if names else f"dataset {index}"
                raise DataError(f"{name} has {size} entries, fewer than one batch of {batch_size} per process "
                                f"({world_size} processes); lower batch_size or add data.")
        self.sizes, self.ratios, self.batch_size = list(sizes), list(ratios), batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.rng = random.Random(seed + rank)  # upstream seeds every process with seed + rank
        self.cursors = [[0, 0] for _ in sizes]  # per dataset: [pass, position in this process's shard]

    def next(self) -> tuple[int, list[int]]:
        dataset = self.rng.choices(range(len(self.sizes)), weights=self.ratios)[0]
        cursor = self.cursors[dataset]
        shard = self._shard(dataset, cursor[0])
        if cursor[1] + self.batch_size > len(shard):  # drop_last: the next pass starts
            cursor[:] = [cursor[0] + 1, 0]
            shard = self._shard(dataset, cursor[0])
        indices = shard[cursor[1]:cursor[1] + self.batch_size]
        cursor[1] += self.batch_size
        return dataset, indices

    def _shard(self, dataset: int, pass_number: int) -> list[int]:
        """This process's share of pass `pass_number`: the same shuffle on every process, every world_size-th."""
        order = list(range(self.sizes[dataset]))
        random.Random(f"{self.seed}/{dataset}/{pass_number}").shuffle(order)
        usable = len(order) - len(order) % self.world_size
        return order[:usable][self.rank::self.world_size]

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.getstate(), "cursors": [list(c) for c in self.cursors]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.setstate(_as_random_state(state["rng"]))
        self.cursors = [list(c) for c in state["cursors"]]


class TrainingData:
    """Batches for `fit`: datasets + sampler + prompt rng + threaded image decoding, one batch ahead.

    With workers, the next batch's images decode while the current step trains (on 2 CPU cores the decoding and
    augmentation of 16 slices took ~20 % of a tower step when the step waited for it). What a batch holds is drawn
    in the calling thread, in order, so prefetching changes no batch; `state_dict` is the state before the
    prefetched draw, so a resume draws that batch again.
    """

    def __init__(self, specs: Sequence[DatasetSpec], batch_size: int, image_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 augment: Augmentation | None = None) -> None:
        self.datasets = [TaskDataset(spec) for spec in specs]
        self.sampler = MultiTaskSampler([len(d) for d in self.datasets], [s.sample_ratio for s in specs],
                                        batch_size, seed, rank, world_size, [str(s.task_file) for s in specs])
        self.image_size = image_size
        self.prompt_rng = random.Random(f"{seed}/{rank}/prompts")
        self.augment, self.augment_seed, self.examples_drawn = augment, f"{seed}/{rank}/augment", 0
        self._pool = ThreadPoolExecutor(num_workers) if num_workers > 0 else None
        self._ahead: _DrawnBatch | None = None  # the next batch, decoding
        self._state_before_ahead: dict[str, Any] | None = None

    def next_batch(self) -> Batch:
        batch = (self._ahead or self._draw()).assemble()
        if self._pool is not None:
            self._state_before_ahead = self._state()
            self._ahead = self._draw()
        return batch

    def _draw(self) -> _DrawnBatch:
        """Choose the next batch's entries, prompts and augmentation seeds, and start decoding its images."""
        dataset, indices = self.sampler.next()
        source = self.datasets[dataset]
        pairs = [training_example(source.entries[i], self.prompt_rng) for i in indices]
        # one seed per example (not one shared rng), so the threads' order cannot change what is drawn
        seeds = [f"{self.augment_seed}/{self.examples_drawn + k}" for k in range(len(indices))]
        self.examples_drawn += len(indices)
        work = [(source.image_paths[i], pair[1], grounding_targets(source.entries[i]),
                 _close_up_centre(source.entries[i]), seed) for i, pair, seed in zip(indices, pairs, seeds)]
        loading = [self._pool.submit(self._load, job) for job in work] if self._pool else list(map(self._load, work))
        return _DrawnBatch(loading, [p[0] for p in pairs], dataset)

    def _load(self, work: tuple[Path, str, dict[str, str], str | None, str]
              ) -> tuple[torch.Tensor, str, dict[str, str]]:
        """([3, S, S] model input, answer, grounding targets) of one example, all moved by the augmentation when
        it is on."""
        path, answer, grounding, close_up_centre, seed = work
        try:
            with Image.open(path) as image:
                if self.augment is not None:
                    rng = random.Random(seed)
                    image, (answer, *moved) = augment_example(image.convert("RGB"), [answer, *grounding.values()],
                                                              self.augment, rng, close_up_centre)
                    grounding = dict(zip(grounding, moved))
                    image = adjust_intensity(image, self.augment, rng)
                return preprocess_image(image, self.image_size), answer, grounding
        except OSError as error:  # includes PIL's UnidentifiedImageError
            raise DataError(f"cannot read image {path}: {error}. Re-run `prepare` for its volume.") from error

    def state_dict(self) -> dict[str, Any]:
        """Where a resume continues: the batch after the last one `next_batch` returned."""
        return self._state_before_ahead if self._ahead is not None else self._state()

    def _state(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict(), "prompt_rng": self.prompt_rng.getstate(),
                "examples_drawn": self.examples_drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._discard_ahead()
        self.sampler.load_state_dict(state["sampler"])
        self.prompt_rng.setstate(_as_random_state(state["prompt_rng"]))
        self.examples_drawn = state.get("examples_drawn", 0)

    def close(self) -> None:
        self._discard_ahead()
        if self._pool is not None:
            self._pool.shutdown()

    def _discard_ahead(self) -> None:
        if self._ahead is not None:
            for future in self._ahead.loading:
                future.cancel()
        self._ahead = self._state_before_ahead = None


@dataclass
class _DrawnBatch:
    """A batch whose entries are chosen and whose images are decoding (futures) or decoded (pairs)."""

    loading: list  # per example: Future of, or the finished, ([3, S, S] pixels, answer, grounding targets)
    instructions: list[str]
    dataset: int

    def assemble(self) -> Batch:
        loaded = [item.result() if isinstance(item, Future) else item for item in self.loading]
        return Batch(torch.stack([image for image, _, _ in loaded]), self.instructions,
                     [answer for _, answer, _ in loaded], self.dataset, [grounding for _, _, grounding in loaded])


def _as_random_state(state: Sequence) -> tuple:
    """`random.Random.setstate` wants tuples; a checkpoint may hand back lists."""
    version, internal, gauss = state
    return version, tuple(internal), gauss

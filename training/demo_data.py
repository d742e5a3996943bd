"""The demo cascade's raw data: synthetic CTs written in the three public datasets' own layouts.

The demo model is trained by the real pipeline, so its data starts where a user's does: an MSD Task07 folder
(NIfTI, pancreas + tumour labels), an NIH Pancreas-CT folder (DICOM series + NIfTI labels, healthy pancreas) and
an AbdomenCT-1K folder (NIfTI, organ masks), which `prepare` then reads like the real archives. Every volume is
a different patient on a different scan: `phantom.sample_scan_parameters` draws matrix size, field of view,
slice thickness, storage orientation, noise and contrast per seed, so the model never sees one geometry.

Seeds: dataset d (0 msd, 1 nih, 2 abdomenct1k) case i uses seed `seed + 100_000 * (d + 1) + i`, far from the
small seeds tests and `minigpt-pancreas demo` use, so held-out phantoms are really unseen.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from SlicerMiniGPTPancreas.phantom import Phantom, make_phantom, sample_scan_parameters
from SlicerMiniGPTPancreas.phantom_writers import write_abdomenct1k, write_msd, write_nih

DATASET_ORDER = ("msd", "nih", "abdomenct1k")
SEED_STRIDE = 100_000
# Where each writer puts its dataset under the raw folder, as `prepare`'s "roots" expect them.
ROOT_NAMES = {"msd": "msd", "nih": "nih", "abdomenct1k": "abdomenct1k"}


@dataclass(frozen=True)
class PhantomDatasets:
    """How many synthetic volumes of each dataset to write, and the base seed."""

    msd: int = 0
    nih: int = 0
    abdomenct1k: int = 0
    seed: int = 0
    coarsen: float = 1.0  # voxel size multiplier (e.g. 4 for quick tests): same anatomy, fewer voxels

    def count(self, dataset: str) -> int:
        return getattr(self, dataset)

    def seeds(self, dataset: str) -> list[int]:
        first = self.seed + SEED_STRIDE * (DATASET_ORDER.index(dataset) + 1)
        return [first + i for i in range(self.count(dataset))]


def demo_phantom(seed: int, tumour: bool, coarsen: float = 1.0) -> Phantom:
    """One varied synthetic CT (scan geometry and anatomy both drawn from `seed`), its voxels `coarsen` times
    larger along every axis."""
    scan = sample_scan_parameters(seed)
    scan["spacing"] = tuple(value * coarsen for value in scan["spacing"])
    return make_phantom(seed, tumour=tumour, **scan)


class _RenderedOnDemand(Sequence):
    """Phantoms rendered one at a time as a writer walks them, so memory holds one volume, not all."""

    def __init__(self, seeds: list[int], tumour: Callable[[int], bool], coarsen: float,
                 done: Callable[[], None]) -> None:
        self.seeds, self.tumour, self.coarsen, self.done = seeds, tumour, coarsen, done

    def __len__(self) -> int:
        return len(self.seeds)

    def __getitem__(self, index):
        if isinstance(index, slice):
            raise TypeError("phantoms are rendered one at a time")
        phantom = demo_phantom(self.seeds[index], self.tumour(self.seeds[index]), self.coarsen)
        self.done()
        return phantom


def write_phantom_datasets(root: str | os.PathLike, spec: PhantomDatasets,
                           progress: Callable[[str], None] | None = None) -> dict[str, Path]:
    """Write the datasets of `spec` under `root`; return prepare's "roots" ({dataset: folder}).

    MSD volumes carry a tumour (as Task07's do), NIH volumes a healthy pancreas, AbdomenCT-1K volumes one in
    three (that dataset mixes both). A dataset folder that already holds `count` volumes is left as it is, so an
    interrupted run resumes where it stopped.
    """
    root = Path(root)
    roots = {}
    for dataset in DATASET_ORDER:
        count = spec.count(dataset)
        if not count:
            continue
        folder = roots[dataset] = root / ROOT_NAMES[dataset]
        if _volumes_present(dataset, folder) >= count:
            continue
        written = iter(range(1, count + 1))
        phantoms = _RenderedOnDemand(spec.seeds(dataset), _tumour_rule(dataset), spec.coarsen,
                                     lambda d=dataset: progress and progress(f"{d} volume {next(written)}/{count}"))
        _WRITERS[dataset](folder, phantoms)
    return roots


def _tumour_rule(dataset: str) -> Callable[[int], bool]:
    return {"msd": lambda seed: True, "nih": lambda seed: False,
            "abdomenct1k": lambda seed: seed % 3 == 0}[dataset]


def _volumes_present(dataset: str, folder: Path) -> int:
    patterns = {"msd": "Task07_Pancreas/labelsTr/pancreas_*.nii.gz", "nih": "TCIA_pancreas_labels-*/label*.nii.gz",
                "abdomenct1k": "Mask/Case_*.nii.gz"}
    return len([path for path in folder.glob(patterns[dataset]) if not path.name.startswith("._")])


_WRITERS: dict[str, Callable[[Path, Sequence[Phantom]], Path]] = {
    "msd": lambda folder, phantoms: write_msd(folder, phantoms),
    "nih": lambda folder, phantoms: write_nih(folder, phantoms),
    "abdomenct1k": lambda folder, phantoms: write_abdomenct1k(folder, phantoms),
}

"""Find the volumes of NIH Pancreas-CT, MSD Task07 and AbdomenCT-1K in the layouts their distributors ship.

Nothing here reads image data; it only pairs images with labels by name and says what could not be paired.

- NIH: case folders `PANCREAS_NNNN` at any depth (their DICOM series may sit at any depth below them) and
  labels `labelNNNN.nii.gz` anywhere under the root (normally `TCIA_pancreas_labels-02-05-2017/`), matched by
  number. TCIA withdrew cases 0025 and 0070, so their labels without a case folder are expected, not errors.
- MSD: every `imagesTr/*.nii.gz` with the same name in the sibling `labelsTr/` (macOS `._*` files skipped).
- AbdomenCT-1K: images `Case_NNNNN_0000.nii.gz` anywhere (any `ImagePartN` folder, nested or not) and masks
  `Case_NNNNN.nii.gz` in a folder named `Mask` or `Masks`, matched by case number. Images without a mask are
  skipped, as upstream does (AbdomenCT-1K ships more images than masks).
Hidden files and folders (`.*`, which covers `._*`) and `__MACOSX` folders are ignored everywhere.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from training.prepare.files import DATASETS, PrepareError, Problem

NIH_WITHDRAWN_CASES = (25, 70)  # removed from TCIA; their labels may still be in the labels archive
_NIFTI = re.compile(r"^(?P<stem>.+)\.nii(\.gz)?$", re.IGNORECASE)
_NIH_CASE = re.compile(r"^PANCREAS_(?P<number>\d{4})$", re.IGNORECASE)
_NIH_LABEL = re.compile(r"^label(?P<number>\d{4})\.nii(\.gz)?$", re.IGNORECASE)
_ABD_IMAGE = re.compile(r"^Case_(?P<number>\d+)_0000\.nii(\.gz)?$", re.IGNORECASE)
_ABD_MASK = re.compile(r"^Case_(?P<number>\d+)\.nii(\.gz)?$", re.IGNORECASE)
_ABD_MASK_FOLDERS = ("mask", "masks")


@dataclass(frozen=True)
class VolumeSource:
    """One image + label pair to prepare."""

    dataset: str  # "nih" | "msd" | "abdomenct1k"
    volume: str  # output stem: PANCREAS_0001, pancreas_001, Case_00001_0000
    volume_name: str  # upstream's `volume_name`: label0001.nii.gz, pancreas_001.nii.gz, Case_00001_0000.nii.gz
    image: str  # a NIfTI file, or (NIH) the case folder holding the DICOM series
    label: str  # the NIfTI label / mask file


@dataclass
class Discovery:
    """What was found under one root: the pairs to prepare, what cannot be prepared, benign notes."""

    dataset: str
    root: str
    sources: list[VolumeSource] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def discover(dataset: str, root: str | os.PathLike) -> Discovery:
    """Pair images with labels under `root`; raise `PrepareError` if the root is unusable or holds nothing."""
    if dataset not in DATASETS:
        raise PrepareError(f"Unknown dataset {dataset!r}; use one of {', '.join(DATASETS)}.")
    root_path = Path(root).expanduser().absolute()  # records name their source files by absolute path
    if not root_path.is_dir():
        what = "is not a folder" if root_path.exists() else "does not exist"
        raise PrepareError(f"--root {root_path} {what}; give the folder the {dataset} dataset was extracted to.")
    found = Discovery(dataset=dataset, root=str(root_path.resolve()))
    {"nih": _discover_nih, "msd": _discover_msd, "abdomenct1k": _discover_abdomenct1k}[dataset](root_path, found)
    if not found.sources and not found.problems:
        raise PrepareError(f"No {dataset} volumes found under {root_path}: {_EXPECTED_LAYOUT[dataset]}")
    found.sources.sort(key=lambda source: source.volume)
    return found


_EXPECTED_LAYOUT = {
    "nih": "expected PANCREAS_NNNN folders of DICOM files and labelNNNN.nii.gz files "
    "(TCIA_pancreas_labels-02-05-2017/) below it.",
    "msd": "expected Task07_Pancreas/imagesTr/*.nii.gz with labels in Task07_Pancreas/labelsTr/.",
    "abdomenct1k": "expected Case_NNNNN_0000.nii.gz images (AbdomenCT-1K-ImagePartN/) and a Mask/ or Masks/ "
    "folder of Case_NNNNN.nii.gz files below it.",
}


def walk_visible(root: Path) -> Iterator[tuple[Path, list[str], list[str]]]:
    """`os.walk` (sorted, links followed once) that skips hidden entries and `__MACOSX` folders."""
    seen: set[str] = set()
    for folder, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link cycle, or the same folder linked twice
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__MACOSX")
        yield Path(folder), dirnames, sorted(f for f in filenames if not f.startswith("."))


def _discover_nih(root: Path, found: Discovery) -> None:
    cases: dict[int, list[Path]] = {}
    labels: dict[int, list[Path]] = {}
    for folder, dirnames, filenames in walk_visible(root):
        case = _NIH_CASE.match(folder.name)
        if case and folder != root:
            cases.setdefault(int(case["number"]), []).append(folder)
            dirnames[:] = []  # the series below a case folder are the reader's business
            continue
        for name in filenames:
            label = _NIH_LABEL.match(name)
            if label:
                labels.setdefault(int(label["number"]), []).append(folder / name)
    if _NIH_CASE.match(root.name):  # --root pointed at one case folder
        cases.setdefault(int(_NIH_CASE.match(root.name)["number"]), []).append(root)
    for number in sorted(set(cases) | set(labels)):
        volume = f"PANCREAS_{number:04d}"
        case_dir = _first(found, volume, cases.get(number, []))
        label = _first(found, volume, labels.get(number, []))
        if case_dir and label:
            found.sources.append(VolumeSource("nih", volume, label.name, str(case_dir), str(label)))
        elif label and number in NIH_WITHDRAWN_CASES:
            found.notes.append(f"{label.name} has no {volume} folder: TCIA withdrew that case, skipped.")
        elif label:
            found.problems.append(Problem("nih", volume, str(label), f"{label.name} has no {volume} DICOM folder "
                                          f"under {root}; download the case or delete the label."))
        elif case_dir:
            found.problems.append(Problem("nih", volume, str(case_dir), f"no label{number:04d}.nii.gz under {root} "
                                          "(expected in TCIA_pancreas_labels-02-05-2017/); the case is skipped."))


def _discover_msd(root: Path, found: Discovery) -> None:
    images: dict[str, list[tuple[Path, Path]]] = {}
    for folder, _, filenames in walk_visible(root):
        if folder.name != "imagesTr":
            continue
        for name in filenames:
            stem = _NIFTI.match(name)
            if stem:
                images.setdefault(stem["stem"], []).append((folder / name, folder.parent / "labelsTr" / name))
    for volume in sorted(images):
        pair = _first(found, volume, images[volume])
        image, label = pair
        if label.is_file():
            found.sources.append(VolumeSource("msd", volume, image.name, str(image), str(label)))
        else:
            found.problems.append(Problem("msd", volume, str(label), f"{image.name} has no label: {label} is "
                                          "missing; the volume is skipped."))


def _discover_abdomenct1k(root: Path, found: Discovery) -> None:
    images: dict[int, list[Path]] = {}
    masks: dict[int, list[Path]] = {}
    for folder, _, filenames in walk_visible(root):
        in_masks = folder.name.lower() in _ABD_MASK_FOLDERS
        for name in filenames:
            image, mask = _ABD_IMAGE.match(name), _ABD_MASK.match(name)
            if image and not in_masks:
                images.setdefault(int(image["number"]), []).append(folder / name)
            elif mask and in_masks:
                masks.setdefault(int(mask["number"]), []).append(folder / name)
    unmasked = []
    for number in sorted(set(images) | set(masks)):
        image = _first(found, f"Case_{number:05d}_0000", images.get(number, []))
        mask = _first(found, f"Case_{number:05d}_0000", masks.get(number, []))
        if image and mask:
            volume = _NIFTI.match(image.name)["stem"]
            found.sources.append(VolumeSource("abdomenct1k", volume, image.name, str(image), str(mask)))
        elif image:
            unmasked.append(image.name)
        elif mask:
            found.problems.append(Problem("abdomenct1k", f"Case_{number:05d}_0000", str(mask),
                                          f"mask {mask.name} has no image Case_{number:05d}_0000.nii.gz under {root}."))
    if unmasked:
        shown = ", ".join(unmasked[:5]) + (", ..." if len(unmasked) > 5 else "")
        found.notes.append(f"{len(unmasked)} images have no mask in Mask/ or Masks/ and are skipped: {shown}")


def _first(found: Discovery, volume: str, candidates: list):
    """The first of several copies of one file (reported), the only one, or None."""
    if len(candidates) > 1:
        copies = ", ".join(str(c[0] if isinstance(c, tuple) else c) for c in candidates)
        found.notes.append(f"{volume} is present {len(candidates)} times ({copies}); using the first.")
    return candidates[0] if candidates else None

"""Tests of the synthetic CT phantom and of its writers (real SimpleITK NIfTI and DICOM files, read back)."""
from __future__ import annotations

import gzip
import json
import re
import sys

import numpy as np
import pytest

from SlicerMiniGPTPancreas.phantom import (
    FOV_CENTRE_RAS, KIDNEY_LEFT, KIDNEY_RIGHT, MAX_SCAN_VOXELS, ORIENTATIONS, PhantomError, make_phantom, reorient,
    sample_noise_hu, sample_scan_parameters,
)
from SlicerMiniGPTPancreas.phantom_anatomy import (
    BOWEL_HU, PANCREAS_LENGTH_MM, PANCREAS_RADII_MM, TISSUE_HU, TUMOUR_CONTRAST_HU, draw_anatomy,
)

SMALL = dict(size_mm=(192.0, 192.0, 60.0), spacing=(4.0, 4.0, 6.0))  # 48 x 48 x 10: quick to write as files
LETTER_RAS = {"L": (-1, 0, 0), "R": (1, 0, 0), "P": (0, -1, 0), "A": (0, 1, 0), "I": (0, 0, -1), "S": (0, 0, 1)}


def centroid_ras(mask: np.ndarray, phantom) -> np.ndarray:
    """Mean RAS position of the voxels of `mask` [k, j, i]."""
    kji = np.argwhere(mask)
    return phantom.ijk_to_ras_points(kji[:, ::-1]).mean(axis=0)


def organ_masks(phantom) -> dict[str, np.ndarray]:
    return {"liver": phantom.organs == 1, "spleen": phantom.organs == 3, "pancreas": phantom.organs == 4,
            "tumour": phantom.labels == 2, "kidney_right": phantom.kidney_sides == KIDNEY_RIGHT,
            "kidney_left": phantom.kidney_sides == KIDNEY_LEFT}


def anatomy_mask(phantom, ellipsoid) -> np.ndarray:
    """Voxels whose centre lies inside one of the phantom's drawn shapes (independent of the painter)."""
    k, j, i = np.indices(phantom.shape)
    ras = phantom.ijk_to_ras_points(np.stack([i, j, k], -1).reshape(-1, 3))
    return ellipsoid.contains(ras[:, 0], ras[:, 1], ras[:, 2]).reshape(phantom.shape)


# ---------------------------------------------------------------- phantom geometry


def test_default_grid_is_centred_on_the_field_of_view():
    phantom = make_phantom(0)
    assert phantom.shape == (40, 96, 96) and phantom.spacing == (3.0, 3.0, 5.0)
    assert phantom.hu.dtype == np.int16 and phantom.labels.dtype == np.uint8 and phantom.organs.dtype == np.uint8
    # LPS storage: +i toward the left (RAS -x), +j posterior (RAS -y), +k superior; the centre voxel (47.5,
    # 47.5, 19.5) sits on FOV_CENTRE_RAS (0, 20, -180), so the origin is (0 + 3*47.5, 20 + 3*47.5, -180 - 5*19.5).
    expected = np.array([[-3, 0, 0, 142.5], [0, -3, 0, 162.5], [0, 0, 5, -277.5], [0, 0, 0, 1]], float)
    np.testing.assert_allclose(phantom.ijk_to_ras, expected)
    np.testing.assert_allclose(phantom.ijk_to_ras_points([[47.5, 47.5, 19.5]])[0], FOV_CENTRE_RAS)


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_orientation_code_names_where_each_axis_points(orientation):
    phantom = make_phantom(0, orientation=orientation, spacing=(2.0, 3.0, 4.0), size_mm=(120, 120, 120))
    expected = np.array([LETTER_RAS[letter] for letter in orientation], float).T * [2.0, 3.0, 4.0]
    np.testing.assert_allclose(phantom.ijk_to_ras[:3, :3], expected)
    assert phantom.orientation == orientation


def test_explicit_origin_moves_the_grid_not_the_patient():
    reference = make_phantom(5, noise_hu=0)
    shifted_origin = reference.origin_ras + reference.ijk_to_ras[:3, :3] @ [5, 0, 2]  # start 5 cols, 2 slices on
    shifted = make_phantom(5, noise_hu=0, origin=shifted_origin)
    np.testing.assert_allclose(shifted.origin_ras, shifted_origin)
    np.testing.assert_array_equal(shifted.labels[:-2, :, :-5], reference.labels[2:, :, 5:])
    np.testing.assert_array_equal(shifted.hu[:-2, :, :-5], reference.hu[2:, :, 5:])


@pytest.mark.parametrize("kwargs, words", [
    (dict(orientation="LLS"), "twice"), (dict(orientation="XYZ"), "3-letter"), (dict(spacing=(1, -1, 1)), "spacing"),
    (dict(size_mm=(100, 100)), "size_mm"), (dict(seed=-1), "seed"), (dict(noise_hu=-2), "noise_hu"),
    (dict(origin=(0, np.nan, 0)), "origin"),
])
def test_bad_parameters_are_refused_with_a_clear_message(kwargs, words):
    kwargs = dict(kwargs)  # the parameter dict is shared between runs
    seed = kwargs.pop("seed", 0)
    with pytest.raises(PhantomError, match=words):
        make_phantom(seed, **kwargs)
    assert issubclass(PhantomError, ValueError)


# ---------------------------------------------------------------- anatomy


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_organs_sit_on_the_correct_side(seed):
    phantom = make_phantom(seed, noise_hu=0)
    centres = {name: centroid_ras(mask, phantom) for name, mask in organ_masks(phantom).items()}
    spine = centroid_ras(anatomy_mask(phantom, phantom.anatomy.vertebra), phantom)
    aorta = centroid_ras(anatomy_mask(phantom, phantom.anatomy.aorta), phantom)
    body_x = phantom.anatomy.body.centre[0]
    assert centres["liver"][0] > body_x + 20          # patient right = RAS +x
    assert centres["spleen"][0] < body_x - 20         # patient left
    assert centres["kidney_right"][0] > body_x + 20 and centres["kidney_left"][0] < body_x - 20
    assert centres["spleen"][1] < centres["liver"][1]  # spleen is posterior
    for kidney in ("kidney_right", "kidney_left"):
        assert centres[kidney][1] < centres["pancreas"][1] - 15  # kidneys posterior, retroperitoneal
    assert centres["pancreas"][1] > spine[1] + 30      # pancreas anterior of the spine
    assert aorta[1] > spine[1] and aorta[0] < spine[0]  # aorta anterior-left of the vertebra
    # Head near the duodenum on the right, tail toward the spleen.
    pancreas_ras = phantom.ijk_to_ras_points(np.argwhere(phantom.organs == 4)[:, ::-1])
    order = np.argsort(pancreas_ras[:, 0])
    tail, head = pancreas_ras[order[: len(order) // 5]], pancreas_ras[order[-len(order) // 5:]]
    assert head[:, 0].mean() > body_x
    distance = lambda points: np.linalg.norm(points.mean(0) - centres["spleen"])  # noqa: E731
    assert distance(tail) < distance(head)
    assert abs(centres["pancreas"][2] - (centres["kidney_left"][2] + centres["kidney_right"][2]) / 2) < 25


def test_tissue_hu_is_the_patients_drawn_hu_and_noise_is_gaussian():
    noisy, clean = make_phantom(4), make_phantom(4, noise_hu=0)
    masks = organ_masks(noisy)
    pancreas_only = masks["pancreas"] & ~masks["tumour"]
    medulla = np.zeros(noisy.shape, bool)
    for cortex_shape, medulla_shape in noisy.anatomy.kidneys.values():
        medulla |= anatomy_mask(noisy, medulla_shape)
    kidney = masks["kidney_right"] | masks["kidney_left"]
    expected = {"liver": masks["liver"], "spleen": masks["spleen"], "pancreas": pancreas_only,
                "tumour": masks["tumour"], "kidney_cortex": kidney & ~medulla, "kidney_medulla": kidney & medulla,
                "bone": anatomy_mask(noisy, noisy.anatomy.vertebra), "aorta": anatomy_mask(noisy, noisy.anatomy.aorta)}
    for tissue, mask in expected.items():
        drawn = noisy.anatomy.hu[tissue]
        assert mask.sum() > 10, tissue
        assert TISSUE_HU[tissue][0] <= drawn <= TISSUE_HU[tissue][1], tissue
        assert np.median(clean.hu[mask]) == np.rint(drawn), tissue
        assert abs(noisy.hu[mask].mean() - drawn) < 10, tissue
    outside = ~anatomy_mask(noisy, noisy.anatomy.body)
    assert abs(np.median(noisy.hu[outside]) - (-1000)) <= 2
    noise = (noisy.hu.astype(float) - clean.hu)[~outside]
    assert 10 < noise.std() < 14 and abs(noise.mean()) < 1
    assert noisy.hu.min() >= -1024


def test_tumour_is_a_dark_mass_inside_the_pancreas():
    with_tumour, without = make_phantom(7, noise_hu=0), make_phantom(7, noise_hu=0, tumour=False)
    tumour = with_tumour.labels == 2
    assert tumour.sum() >= 5 and not (without.labels == 2).any()
    assert np.all(with_tumour.organs[tumour] == 4)  # AbdomenCT-1K pancreas includes the mass
    np.testing.assert_array_equal(with_tumour.labels > 0, without.labels == 1)  # same pancreas either way
    # Hypo-attenuating by at least TUMOUR_CONTRAST_HU (+1 for rounding both to integer HU).
    assert with_tumour.hu[tumour].mean() <= with_tumour.hu[with_tumour.labels == 1].mean() - TUMOUR_CONTRAST_HU + 1
    np.testing.assert_array_equal(with_tumour.organs, without.organs)


@pytest.mark.parametrize("orientation", ORIENTATIONS[1:])
def test_same_seed_gives_the_same_anatomy_in_every_orientation(orientation):
    reference = make_phantom(11, noise_hu=0)
    other = make_phantom(11, noise_hu=0, orientation=orientation)
    for name, mask in organ_masks(reference).items():
        difference = np.abs(centroid_ras(organ_masks(other)[name], other) - centroid_ras(mask, reference))
        voxel = np.maximum(np.abs(reference.ijk_to_ras[:3, :3]).sum(1), np.abs(other.ijk_to_ras[:3, :3]).sum(1))
        assert np.all(difference <= voxel), (name, difference)


@pytest.mark.parametrize("orientation", ORIENTATIONS[1:])
def test_reorient_equals_building_on_the_reoriented_grid(orientation):
    source = make_phantom(2, noise_hu=0, **SMALL)
    patient_spacing = {"L": 4.0, "R": 4.0, "A": 4.0, "P": 4.0, "S": 6.0, "I": 6.0}
    built = make_phantom(2, noise_hu=0, orientation=orientation, size_mm=SMALL["size_mm"],
                         spacing=[patient_spacing[letter] for letter in orientation])
    moved = reorient(source, orientation)
    np.testing.assert_allclose(moved.ijk_to_ras, built.ijk_to_ras, atol=1e-9)
    for field in ("hu", "labels", "organs", "kidney_sides"):
        np.testing.assert_array_equal(getattr(moved, field), getattr(built, field))
    back = reorient(moved, "LPS")
    np.testing.assert_array_equal(back.hu, source.hu)
    np.testing.assert_allclose(back.ijk_to_ras, source.ijk_to_ras, atol=1e-9)


def test_rendering_in_slabs_gives_the_same_volume(monkeypatch):
    import SlicerMiniGPTPancreas.phantom as phantom_module

    whole = make_phantom(9, orientation="ASL", **SMALL)
    monkeypatch.setattr(phantom_module, "_VOXELS_PER_CHUNK", 700)  # a few k-slices per pass
    in_slabs = make_phantom(9, orientation="ASL", **SMALL)
    for field in ("hu", "labels", "organs", "kidney_sides"):
        np.testing.assert_array_equal(getattr(in_slabs, field), getattr(whole, field))


def test_different_seeds_give_different_patients():
    first, second = make_phantom(0, noise_hu=0), make_phantom(1, noise_hu=0)
    moved = [np.linalg.norm(centroid_ras(a, first) - centroid_ras(b, second))
             for a, b in zip(organ_masks(first).values(), organ_masks(second).values())]
    assert max(moved) > 3.0
    assert not np.array_equal(first.labels, second.labels)
    np.testing.assert_array_equal(make_phantom(1).hu, make_phantom(1).hu)  # but each seed is reproducible


# ---------------------------------------------------------------- variability: patients and scans differ like real CT

SEEDS = range(40)
PATIENTS = [draw_anatomy(seed, np.asarray(FOV_CENTRE_RAS)) for seed in range(200)]  # shapes only: cheap
SCANS = [sample_scan_parameters(seed) for seed in SEEDS]


def spread(values) -> tuple[float, float]:
    return float(np.min(values)), float(np.max(values))


def segment_gap(loop, part) -> float:
    """mm between the surface of a bowel loop (capsule) and a pancreas sample taken as a sphere of its radius."""
    start, end, centre = np.array(loop.start), np.array(loop.end), np.array(part.centre)
    span = end - start
    t = np.clip((centre - start) @ span / max(span @ span, 1e-12), 0.0, 1.0)
    return float(np.linalg.norm(centre - start - t * span) - loop.radius - part.semi[0])


def test_body_size_position_and_fat_vary_between_patients():
    half_width = [p.body.semi[0] for p in PATIENTS]
    half_depth = [p.body.semi[1] for p in PATIENTS]
    fat = [p.body.semi[0] - p.muscle.semi[0] for p in PATIENTS]
    shift = np.array([np.subtract(p.body.centre, FOV_CENTRE_RAS)[:2] for p in PATIENTS])
    low, high = spread(half_width)
    assert 110 <= low < 118 and 168 < high <= 175
    low, high = spread(half_depth)
    assert 80 <= low < 88 and 130 < high <= 140
    assert all(depth < width for depth, width in zip(half_depth, half_width))  # wider than deep
    low, high = spread(fat)
    assert 5 <= low < 8 and 30 < high <= 35
    assert np.all(np.abs(shift) <= [25, 20]) and np.all(shift.min(0) < [-20, -15]) and np.all(shift.max(0) > [20, 15])


def test_organ_sizes_and_positions_vary_between_patients():
    for organ in ("liver", "spleen"):
        height = np.array([getattr(p, organ).semi[2] for p in PATIENTS])
        low, high = spread(height / height.mean())
        assert low < 0.8 and high > 1.2, organ  # +-25 % in size
        # Height relative to the body: from patient to patient the organ sits 10-15 mm higher or lower.
        offset = [np.subtract(getattr(p, organ).centre, p.body.centre)[2] for p in PATIENTS]
        assert np.ptp(offset) > 18, organ
    kidney_depth = [p.kidneys[KIDNEY_LEFT][0].semi[2] for p in PATIENTS]
    assert spread(kidney_depth)[0] < 0.8 * 45 and spread(kidney_depth)[1] > 1.2 * 45


def test_pancreas_length_thickness_tilt_curvature_and_turn_vary():
    head = np.array([p.pancreas[0].centre for p in PATIENTS])
    tail = np.array([p.pancreas[-1].centre for p in PATIENTS])
    middle = np.array([p.pancreas[len(p.pancreas) // 2].centre for p in PATIENTS])
    length = np.linalg.norm(tail - head, axis=1) / PANCREAS_LENGTH_MM
    thickness = np.array([p.pancreas[0].semi[0] for p in PATIENTS]) / PANCREAS_RADII_MM[0]
    rise = tail[:, 2] - head[:, 2]
    turn = np.degrees(np.arctan2(head[:, 1] - tail[:, 1], head[:, 0] - tail[:, 0]))  # 0 = tail straight left
    arch = middle[:, 1] - (head[:, 1] + tail[:, 1]) / 2  # how far the body bows anteriorly off the chord
    low, high = spread(length)
    assert low < 0.78 and high > 1.2
    low, high = spread(thickness)
    assert 0.7 <= low < 0.75 and 1.35 < high <= 1.4
    low, high = spread(rise)
    assert 0 <= low < 3 and high > 30  # the tail always lies higher than the head
    assert np.ptp(turn) > 30 and np.ptp(arch) > 20
    assert np.all(tail[:, 0] < head[:, 0])  # the tail always points to the patient's left


def test_tumour_size_position_and_contrast_vary_but_it_stays_dark():
    radius_ratio, offset_ratio = [], []
    for p in PATIENTS:
        centres = np.array([part.centre for part in p.pancreas])
        nearest = int(np.argmin(np.linalg.norm(centres - p.tumour.centre, axis=1)))
        local = p.pancreas[nearest].semi[0]
        radius_ratio.append(p.tumour.semi[0] / local)
        offset_ratio.append(np.linalg.norm(np.subtract(p.tumour.centre, centres[nearest])) / local)
        assert TISSUE_HU["tumour"][0] <= p.hu["tumour"] <= p.hu["pancreas"] - TUMOUR_CONTRAST_HU
    assert spread(radius_ratio)[0] < 0.45 and spread(radius_ratio)[1] > 0.7
    assert np.mean(np.array(offset_ratio) > 0.35) > 0.1  # some masses are exophytic
    assert max(offset_ratio) < 0.65  # but every one starts within the gland
    for tissue in ("pancreas", "liver", "spleen", "kidney_cortex", "tumour"):
        drawn = [p.hu[tissue] for p in PATIENTS]
        low, high = TISSUE_HU[tissue]
        assert spread(drawn)[0] < low + 0.2 * (high - low) and spread(drawn)[1] > high - 0.2 * (high - low), tissue


def test_bowel_loops_lie_beside_the_pancreas_without_covering_it():
    for p in PATIENTS:
        assert 3 <= len(p.bowel) <= 8
        gaps = [min(segment_gap(loop.wall, part) for part in p.pancreas) for loop in p.bowel]
        assert min(gaps) >= 0.9 and min(gaps) < 10  # clear of the gland, yet beside it
        assert all(BOWEL_HU[0] <= loop.hu <= BOWEL_HU[1] for loop in p.bowel)
    assert 0.2 < np.mean([loop.gas is not None for p in PATIENTS for loop in p.bowel]) < 0.6


@pytest.mark.parametrize("seed", [0, 6])
def test_rendered_bowel_is_unlabelled_beside_but_never_over_the_pancreas(seed):
    phantom = make_phantom(seed, noise_hu=0)
    anatomy = phantom.anatomy
    k, j, i = np.indices(phantom.shape)
    x, y, z = phantom.ijk_to_ras_points(np.stack([i, j, k], -1).reshape(-1, 3)).T  # every voxel centre, once

    def union(shapes) -> np.ndarray:
        inside = np.zeros(x.shape, bool)
        for shape in shapes:
            inside |= shape.contains(x, y, z)
        return inside.reshape(phantom.shape)

    bowel = union(loop.wall for loop in anatomy.bowel) & union([anatomy.cavity])
    gas = union(loop.gas for loop in anatomy.bowel if loop.gas is not None)
    gland = union(anatomy.pancreas)
    assert not (bowel & gland).any()
    around = anatomy.surroundings  # the unlabelled structures painted over the loops
    over = union([*around.stomach.wall, *(s for tube in around.vessels + around.psoas for s in tube.segments)])
    visible = bowel & (phantom.organs == 0) & ~over  # loops the organs, stomach, psoas and vessels do not overlap
    assert visible.sum() > 20
    for label_map in (phantom.labels, phantom.organs, phantom.kidney_sides):
        assert not label_map[visible].any()
    loop_hu = phantom.hu[visible & ~gas]
    assert np.mean((loop_hu >= 20) & (loop_hu <= 60)) > 0.8  # the rest: vessels and duodenum painted over them
    # Some loop voxel lies within 2 voxels of the gland (in-plane neighbours on this 3 mm grid).
    near = np.zeros_like(gland)
    for shift in ((0, 0, 2), (0, 0, -2), (0, 2, 0), (0, -2, 0), (1, 0, 0), (-1, 0, 0)):
        near |= np.roll(gland, shift, axis=(0, 1, 2))
    assert (near & visible).any()


def test_vessels_stomach_and_psoas_lie_round_the_pancreas_as_on_ct():
    for p in PATIENTS:
        gland = np.array([part.centre for part in p.pancreas])
        size = np.array([part.semi[0] for part in p.pancreas])
        vessels = {tube.name: tube.segments for tube in p.surroundings.vessels}
        splenic = np.array([segment.start for segment in vessels["splenic_vein"]])  # neck to tail (hilum left out)
        nearest = np.argmin(np.linalg.norm(splenic[:, None] - gland[None], axis=2), axis=1)
        assert np.all(splenic[:, 1] < gland[nearest, 1])  # behind the gland...
        assert np.all(np.linalg.norm(splenic - gland[nearest], axis=1) - size[nearest] < 10)  # ...along its surface
        front = p.aorta.centre[1] + p.aorta.semi[1]
        sma, smv, renal = vessels["sma"], vessels["smv"], vessels["left_renal_vein"]
        assert sma[1].start[1] > front and smv[1].start[0] > sma[1].start[0] + 3  # SMA before the aorta, SMV right
        assert max(sma[-1].end[2], smv[-1].end[2]) < gland[:, 2].min() - 20  # both run on below the gland
        assert front < renal[1].start[1] < sma[1].start[1]  # the left renal vein passes between aorta and SMA
        kidney = p.kidneys[KIDNEY_LEFT][0]
        assert abs(renal[1].start[2] - kidney.centre[2]) < kidney.semi[2]  # at a kidney level
        stomach = p.surroundings.stomach.wall
        body = np.array(stomach[1].end)  # fundus -> body segment
        beside = np.argmin(np.linalg.norm(gland - body, axis=1))
        assert body[1] > gland[beside, 1] and body[0] < gland[0, 0]  # in front of the gland, left of its head
        assert stomach[0].start[2] > gland[-1, 2]  # the fundus lies above the tail
        right, left = (tube.segments[0].start[0] for tube in p.surroundings.psoas)
        assert right > p.vertebra.centre[0] + p.vertebra.semi[0] > p.vertebra.centre[0] - p.vertebra.semi[0] > left
    contents = [p.surroundings.stomach.air_level for p in PATIENTS]
    assert np.isposinf(contents).any() and np.isneginf(contents).any() and np.isfinite(contents).any()


@pytest.mark.parametrize("seed", [0, 5])
def test_structures_round_the_pancreas_show_but_never_change_a_label(seed):
    from dataclasses import replace

    from SlicerMiniGPTPancreas.phantom_anatomy import render_anatomy
    from SlicerMiniGPTPancreas.phantom_structures import Stomach, Surroundings

    phantom = make_phantom(seed, noise_hu=0)
    k, j, i = np.indices(phantom.shape)
    x, y, z = (c.reshape(phantom.shape) for c in phantom.ijk_to_ras_points(np.stack([i, j, k], -1).reshape(-1, 3)).T)
    bare = replace(phantom.anatomy, surroundings=Surroundings((), Stomach((), (), np.inf), (), (), None, ()))
    hu, labels, organs, sides = render_anatomy(bare, x, y, z)
    for drawn, without in ((phantom.labels, labels), (phantom.organs, organs), (phantom.kidney_sides, sides)):
        np.testing.assert_array_equal(drawn, without)  # same pancreas, tumour and organs, voxel for voxel
    changed = np.rint(hu) != phantom.hu
    gland = phantom.labels > 0
    assert not changed[gland].any() and changed.mean() > 0.02
    # Enhancing veins along the back of the gland: within 6 mm behind some pancreas voxel, in a slice of it.
    portal = phantom.hu == np.rint(phantom.anatomy.hu["portal_vein"])
    behind = np.zeros_like(gland)
    for step in range(1, 3):  # 2 rows of 3 mm, posterior is +j in LPS storage
        behind[:, step:] |= gland[:, :-step]
    assert (portal & behind & ~gland).sum() >= 3


def spacing_along_patient_axes(scan) -> np.ndarray:
    """A sampled scan's voxel size along LR, AP and SI (its `spacing` is along the storage axes)."""
    spacing = np.empty(3)
    for letter, step in zip(scan["orientation"], scan["spacing"]):
        spacing["LRAPSI".index(letter) // 2] = step
    return spacing


def voxel_centre_span(scan) -> tuple[np.ndarray, np.ndarray]:
    """RAS corners (low, high) of the box through the outermost voxel centres of a sampled scan's grid."""
    first = np.array(scan["origin"])
    last = first.copy()
    for letter, step in zip(scan["orientation"], scan["spacing"]):
        count = np.rint(scan["size_mm"]["LRAPSI".index(letter) // 2] / step)
        last += np.array(LETTER_RAS[letter]) * step * (count - 1)
    return np.minimum(first, last), np.maximum(first, last)


def test_sampled_scans_vary_as_clinical_scans_do():
    fill, matrix, thickness, pixel_aspect, voxels = [], [], [], [], []
    for seed, scan in zip(SEEDS, SCANS):
        body_width = 2 * PATIENTS[seed].body.semi[0]
        spacing_lr_ap_si = spacing_along_patient_axes(scan)
        counts = np.rint(np.divide(scan["size_mm"], spacing_lr_ap_si)).astype(int)
        fill.append(body_width / scan["size_mm"][0])
        matrix.extend(counts[:2])
        thickness.append(spacing_lr_ap_si[2])
        pixel_aspect.append(spacing_lr_ap_si[0] / spacing_lr_ap_si[1])
        voxels.append(np.prod(counts))
        assert scan["size_mm"][0] <= 500.5 and 5 <= scan["noise_hu"] <= 25
    low, high = spread(fill)
    assert 0.5 <= low < 0.55 and 0.85 < high <= 0.9
    low, high = spread(matrix)
    assert 160 <= low < 200 and 480 < high <= 512
    low, high = spread(thickness)
    assert 1.5 <= low < 2.0 and 4.5 < high <= 5.0
    np.testing.assert_allclose(pixel_aspect, 1.0)  # square pixels; the slice axis carries the thickness
    assert max(voxels) <= MAX_SCAN_VOXELS
    assert {scan["orientation"] for scan in SCANS} == set(ORIENTATIONS)
    assert any(counts_lr != counts_ap for counts_lr, counts_ap in zip(matrix[::2], matrix[1::2]))  # some not square
    assert np.ptp([scan["noise_hu"] for scan in SCANS]) > 15
    assert sample_noise_hu(3) == SCANS[3]["noise_hu"] == sample_noise_hu(3)


@pytest.mark.parametrize("seed", SEEDS)
def test_sampled_field_of_view_holds_the_whole_body_and_pancreas(seed):
    scan, patient = SCANS[seed], PATIENTS[seed]
    low, high = voxel_centre_span(scan)
    body_low = np.subtract(patient.body.centre, patient.body.semi)[:2]
    body_high = np.add(patient.body.centre, patient.body.semi)[:2]
    assert np.all(low[:2] < body_low) and np.all(high[:2] > body_high), "the frame cuts the body"
    pancreas_z = [(part.centre[2] - part.semi[2], part.centre[2] + part.semi[2]) for part in patient.pancreas]
    assert low[2] + 10 < np.min(pancreas_z) and np.max(pancreas_z) < high[2] - 10


@pytest.mark.parametrize("seed", [1, 2])
def test_a_sampled_scan_renders_the_whole_body_and_the_whole_pancreas(seed):
    scan = SCANS[seed]
    phantom = make_phantom(seed, **scan)
    assert phantom.orientation == scan["orientation"] and np.prod(phantom.shape) <= MAX_SCAN_VOXELS
    np.testing.assert_allclose(phantom.spacing, scan["spacing"])
    axial = reorient(phantom, "LPS")  # [s, r, c]
    assert np.all(axial.hu[:, [0, -1], :] < -500) and np.all(axial.hu[:, :, [0, -1]] < -500)  # air all round
    assert not axial.labels[[0, -1]].any() and (axial.labels == 2).any()  # pancreas and tumour inside the stack


def test_the_same_seed_is_the_same_patient_on_any_grid():
    seed = 8  # a small LAS scan of 2 mm pixels: another orientation, spacing and origin than the default grid
    scanned = make_phantom(seed, **SCANS[seed])
    default = make_phantom(seed, noise_hu=0)
    assert scanned.anatomy == default.anatomy == PATIENTS[seed]
    voxel = np.maximum(np.abs(scanned.ijk_to_ras[:3, :3]).sum(1), np.abs(default.ijk_to_ras[:3, :3]).sum(1))
    for name in ("pancreas", "tumour", "kidney_left"):
        difference = (centroid_ras(organ_masks(scanned)[name], scanned)
                      - centroid_ras(organ_masks(default)[name], default))
        assert np.all(np.abs(difference) <= voxel), (name, difference)


# ---------------------------------------------------------------- writers

sitk = pytest.importorskip("SimpleITK")
from broken_files import APPLE_DOUBLE_HEADER, write_apple_doubles, write_corrupt_file  # noqa: E402

from SlicerMiniGPTPancreas.phantom_writers import (  # noqa: E402
    PhantomWriteError, SimpleITKMissingError, write_abdomenct1k, write_msd, write_nih,
)


def files_under(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def assert_geometry(image, phantom) -> None:
    """SimpleITK (LPS) geometry equals the phantom's ijk_to_ras with the first two rows negated."""
    lps = np.diag([-1.0, -1.0, 1.0]) @ phantom.ijk_to_ras[:3]
    spacing = np.linalg.norm(lps[:, :3], axis=0)
    np.testing.assert_allclose(image.GetSpacing(), spacing, atol=1e-6)
    np.testing.assert_allclose(image.GetOrigin(), lps[:, 3], atol=1e-4)
    np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)), lps[:, :3] / spacing, atol=1e-6)


@pytest.fixture(scope="module")
def two_phantoms():
    return [make_phantom(1, **SMALL), make_phantom(2, orientation="ASL", size_mm=SMALL["size_mm"],
                                                   spacing=(5.0, 6.0, 4.0))]


def test_msd_layout_json_and_round_trip(tmp_path, two_phantoms):
    task = write_msd(tmp_path, two_phantoms, case_ids=[3, 17])
    write_apple_doubles(task)
    assert task == tmp_path / "Task07_Pancreas"
    names = ["pancreas_003.nii.gz", "pancreas_017.nii.gz"]
    assert files_under(task) == sorted(["dataset.json"] + [f"{folder}/{prefix}{name}" for folder in
                                       ("imagesTr", "labelsTr") for prefix in ("", "._") for name in names])
    dataset = json.loads((task / "dataset.json").read_text())
    assert dataset["labels"] == {"0": "background", "1": "pancreas", "2": "cancer"}
    assert dataset["numTraining"] == 2 and dataset["training"][1] == {
        "image": "./imagesTr/pancreas_017.nii.gz", "label": "./labelsTr/pancreas_017.nii.gz"}
    for name, phantom in zip(names, two_phantoms):
        image, label = sitk.ReadImage(str(task / "imagesTr" / name)), sitk.ReadImage(str(task / "labelsTr" / name))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), phantom.hu)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(label), phantom.labels)
        assert set(np.unique(sitk.GetArrayFromImage(label))) == {0, 1, 2}
        assert_geometry(image, phantom)
        assert_geometry(label, phantom)
        junk = (task / "imagesTr" / f"._{name}").read_bytes()
        assert junk.startswith(APPLE_DOUBLE_HEADER) and len(junk) == 4096
        with pytest.raises(RuntimeError):
            sitk.ReadImage(str(task / "labelsTr" / f"._{name}"))


@pytest.mark.parametrize("nested, masks_folder", [(True, "Mask"), (False, "Masks")])
def test_abdomenct1k_parts_masks_and_round_trip(tmp_path, two_phantoms, nested, masks_folder):
    phantoms = [two_phantoms[0], two_phantoms[1], two_phantoms[0]]
    write_abdomenct1k(tmp_path, phantoms, nested=nested, masks_folder=masks_folder, case_ids=[400, 401, 801])
    inner = lambda part: f"AbdomenCT-1K-ImagePart{part}/" + (f"ImagePart{part}/" if nested else "")  # noqa: E731
    assert files_under(tmp_path) == sorted([
        f"{inner(1)}Case_00400_0000.nii.gz", f"{inner(2)}Case_00401_0000.nii.gz", f"{inner(3)}Case_00801_0000.nii.gz",
        f"{masks_folder}/Case_00400.nii.gz", f"{masks_folder}/Case_00401.nii.gz", f"{masks_folder}/Case_00801.nii.gz"])
    mask = sitk.ReadImage(str(tmp_path / masks_folder / "Case_00401.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(mask), two_phantoms[1].organs)
    assert set(np.unique(sitk.GetArrayFromImage(mask))) == {0, 1, 2, 3, 4}
    assert_geometry(mask, two_phantoms[1])
    image = sitk.ReadImage(str(tmp_path / inner(2) / "Case_00401_0000.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), two_phantoms[1].hu)


def read_series(folder):
    reader = sitk.ImageSeriesReader()
    names = reader.GetGDCMSeriesFileNames(str(folder))
    reader.SetFileNames(names)
    return reader.Execute(), list(names)


@pytest.mark.parametrize("slope, intercept, pixel_type, depth", [
    (1.0, -1024.0, "int16", "date"), (0.5, -1024.0, "uint16", "uid")])
def test_nih_dicom_series_and_labels(tmp_path, two_phantoms, slope, intercept, pixel_type, depth):
    pydicom = pytest.importorskip("pydicom")
    write_nih(tmp_path, two_phantoms, slope=slope, intercept=intercept, pixel_type=pixel_type, depth=depth)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["PANCREAS_0001", "PANCREAS_0002",
                                                          "TCIA_pancreas_labels-02-05-2017"]
    for case, phantom in enumerate(two_phantoms, start=1):
        axial = reorient(phantom, "LPS")  # the sagittal-stored phantom is written as an axial series
        (study,) = list((tmp_path / f"PANCREAS_{case:04d}").iterdir())
        (series,) = list(study.iterdir())
        if depth == "date":
            assert re.fullmatch(rf"\d\d-\d\d-\d{{4}}-PANCREAS{case:04d}-Pancreas-(\d{{5}})", study.name)
            assert series.name == "Pancreas-" + study.name.rsplit("-", 1)[1]
        else:
            assert re.fullmatch(r"1\.2\.826\.0\.1\.3680043\.2\.1125\.1\.\d{29}", study.name)
        files = sorted(p.name for p in series.iterdir())
        assert files == [f"1-{n:03d}.dcm" for n in range(1, axial.shape[0] + 1)]
        image, by_position = read_series(series)
        np.testing.assert_allclose(sitk.GetArrayFromImage(image), axial.hu, atol=slope / 2)
        assert_geometry(image, axial)
        by_name = sorted(by_position, key=lambda path: int(re.search(r"-(\d+)\.dcm$", path).group(1)))
        assert by_name != by_position  # names are shuffled: readers must sort by ImagePositionPatient
        datasets = [pydicom.dcmread(path) for path in by_position]
        assert [int(ds.InstanceNumber) for ds in datasets] == list(range(1, axial.shape[0] + 1))
        study_uids, series_uids = {ds.StudyInstanceUID for ds in datasets}, {ds.SeriesInstanceUID for ds in datasets}
        assert len(study_uids) == 1 and len(series_uids) == 1 and datasets[0].Modality == "CT"
        if depth == "uid":
            assert (study_uids, series_uids) == ({study.name}, {series.name})
        spacing_i, spacing_j, spacing_k = axial.spacing
        assert [float(v) for v in datasets[0].PixelSpacing] == [spacing_j, spacing_i]  # row spacing first
        assert float(datasets[0].SliceThickness) == spacing_k
        assert float(datasets[0].RescaleSlope) == slope and float(datasets[0].RescaleIntercept) == intercept
        stored = np.stack([ds.pixel_array for ds in datasets])
        assert stored.dtype == np.dtype(pixel_type)
        np.testing.assert_array_equal(stored, np.rint((axial.hu - intercept) / slope))
        label = sitk.ReadImage(str(tmp_path / "TCIA_pancreas_labels-02-05-2017" / f"label{case:04d}.nii.gz"))
        assert not np.allclose(label.GetDirection(), image.GetDirection())  # stored in another orientation...
        on_image_grid = sitk.Resample(label, image, sitk.Transform(), sitk.sitkNearestNeighbor)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(on_image_grid), axial.labels > 0)  # ...same space


def test_nih_unshuffled_names_follow_position_and_rewrite_replaces_the_case(tmp_path, two_phantoms):
    write_nih(tmp_path, [two_phantoms[0]], case_ids=[7])
    write_nih(tmp_path, [two_phantoms[1]], case_ids=[7], shuffle_names=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["PANCREAS_0007", "TCIA_pancreas_labels-02-05-2017"]
    (series,) = [p for p in (tmp_path / "PANCREAS_0007").rglob("*") if p.is_dir() and any(p.glob("*.dcm"))]
    image, by_position = read_series(series)
    assert [name.rsplit("/", 1)[1] for name in by_position] == [f"1-{n:03d}.dcm" for n in range(1, 11)]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), reorient(two_phantoms[1], "LPS").hu)


def test_writers_refuse_bad_requests_and_leave_nothing_behind(tmp_path, two_phantoms):
    with pytest.raises(PhantomWriteError, match="outside uint16"):
        write_nih(tmp_path, two_phantoms[:1], intercept=0.0, pixel_type="uint16")
    with pytest.raises(PhantomWriteError, match="distinct"):
        write_msd(tmp_path, two_phantoms, case_ids=[5, 5])
    with pytest.raises(PhantomWriteError, match="one id per phantom"):
        write_msd(tmp_path, two_phantoms, case_ids=[5])
    with pytest.raises(PhantomWriteError, match="1..999"):
        write_msd(tmp_path, two_phantoms[:1], case_ids=[1000])
    with pytest.raises(PhantomError, match="3-letter"):
        write_nih(tmp_path, two_phantoms[:1], label_orientation="axial")
    with pytest.raises(PhantomWriteError, match="depth"):
        write_nih(tmp_path, two_phantoms[:1], depth="flat")
    with pytest.raises(PhantomWriteError, match="plain folder name"):
        write_abdomenct1k(tmp_path, two_phantoms[:1], masks_folder="../Mask")
    assert list(tmp_path.rglob("*")) == []


def test_missing_simpleitk_gives_an_install_hint(monkeypatch, tmp_path, two_phantoms):
    monkeypatch.setitem(sys.modules, "SimpleITK", None)  # makes `import SimpleITK` fail
    with pytest.raises(SimpleITKMissingError, match="pip install"):
        write_msd(tmp_path, two_phantoms)
    assert list(tmp_path.iterdir()) == []


def test_corrupt_file_is_a_truncated_gzip(tmp_path):
    path = write_corrupt_file(tmp_path / "broken.nii.gz")
    assert path.read_bytes()[:2] == b"\x1f\x8b"
    with pytest.raises(EOFError):
        gzip.decompress(path.read_bytes())
    with pytest.raises(RuntimeError):
        sitk.ReadImage(str(path))

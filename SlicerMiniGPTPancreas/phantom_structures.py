"""The unlabelled structures around the pancreas of the synthetic patient of `phantom_anatomy` (numpy only).

Real abdominal CT at the pancreas levels shows more than the labelled organs, and a model that never saw these
takes them for pancreas on other scans: the splenic vein along the back of the gland, the superior mesenteric
vein (SMV, with the portal vein it forms behind the pancreas neck) and artery (SMA) under the neck, the left renal
vein between the aorta and the SMA, the stomach in front of the gland (fluid, gas or both with an air-fluid level),
the psoas muscles beside the spine, the lower ribs in the body wall, the gallbladder under the liver and the colon
along the flanks and across the front. Each is placed relative to the drawn organs and gland, so it moves with
them, and varies per seed. None is labelled: `render_anatomy` paints them before the labelled organs, which keep
their voxels where they touch, and the stomach, gallbladder and colon are kept clear of the gland as bowel loops are.

RAS: +x = patient Right, +y = Anterior, +z = Superior.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from SlicerMiniGPTPancreas.phantom_shapes import Capsule, Ellipsoid, clear_of_pancreas

COLON_HU = (-60.0, 40.0)  # wall and stool: mottled by gas on real CT, so from fat-like to soft tissue


@dataclass(frozen=True)
class BowelLoop:
    """A loop of small bowel or a piece of colon (label 0 everywhere), optionally with a gas core."""

    wall: Capsule
    hu: float           # wall and fluid contents
    gas: Capsule | None  # same axis, thinner; None for a collapsed or fluid-filled loop


@dataclass(frozen=True)
class Tube:
    """A vessel, muscle or rib: a chain of capsules painted with one tissue's HU."""

    name: str    # e.g. "splenic_vein", "sma", "psoas_left", "rib"
    tissue: str  # the TISSUE_HU name whose drawn HU it takes
    segments: tuple[Capsule, ...]


@dataclass(frozen=True)
class Stomach:
    """Fundus -> body -> antrum -> pylorus as a chain of capsules, a wall of soft tissue round fluid and/or gas."""

    wall: tuple[Capsule, ...]   # outer surface
    lumen: tuple[Capsule, ...]  # the same chain, thinner by the wall thickness
    air_level: float  # RAS y above which (anterior: patients lie supine) the lumen holds gas; inf none, -inf all


@dataclass(frozen=True)
class Surroundings:
    """The unlabelled structures of one patient, all in RAS mm."""

    vessels: tuple[Tube, ...]  # splenic vein, SMV, portal vein, SMA, left renal vein
    stomach: Stomach
    psoas: tuple[Tube, ...]    # right, left
    ribs: tuple[Tube, ...]
    gallbladder: Capsule | None  # None after a cholecystectomy
    colon: tuple[BowelLoop, ...]


def draw_surroundings(rng: np.random.Generator, cavity: Ellipsoid, wall: float, organs: dict,
                      left_kidney: Ellipsoid, curve: np.ndarray, radius: np.ndarray) -> Surroundings:
    """Draw the structures round the gland sampled as spheres of `radius` at `curve` (head first, RAS mm)."""
    vessels = _draw_vessels(rng, organs, left_kidney, curve, radius)
    stomach = _draw_stomach(rng, cavity, organs["spleen"], curve, radius)
    psoas = _draw_psoas(rng, organs["vertebra"], curve[0][2])
    ribs = _draw_ribs(rng, cavity, wall, curve[0][2])
    gallbladder = _draw_gallbladder(rng, organs["liver"], curve, radius)
    colon = _draw_colon(rng, cavity, curve, radius)
    return Surroundings(vessels, stomach, psoas, ribs, gallbladder, colon)


def _chain(points, radius: float) -> tuple[Capsule, ...]:
    """Capsules of one radius joining consecutive points (RAS mm)."""
    ends = [tuple(map(float, point)) for point in points]
    return tuple(Capsule(a, b, float(radius)) for a, b in zip(ends, ends[1:]))


def _draw_vessels(rng, organs: dict, left_kidney: Ellipsoid, curve: np.ndarray, radius: np.ndarray):
    """Splenic vein along the back of the gland, SMV and portal vein from behind the neck, SMA from the front of
    the aorta down behind and below the neck, and the left renal vein from the kidney between aorta and SMA."""
    aorta, ivc, spleen = organs["aorta"], organs["ivc"], organs["spleen"]
    front = aorta.centre[1] + aorta.semi[1]  # the aorta's anterior surface
    sma_x = aorta.centre[0] + rng.uniform(-2.0, 6.0)  # off the front of the aorta, near its midline
    # The SMV runs to the right of the SMA and meets the splenic vein behind the pancreas neck: the neck is the
    # gland sample (head half) above it.
    smv_x = sma_x + rng.uniform(8.0, 16.0)
    half = len(curve) // 2
    neck = int(np.argmin(np.abs(curve[:half, 0] - smv_x)))
    tangent = np.gradient(curve, axis=0)
    posterior = np.stack([tangent[:, 1], -tangent[:, 0], np.zeros(len(curve))], 1)
    posterior /= np.linalg.norm(posterior, axis=1, keepdims=True)
    posterior[posterior[:, 1] > 0] *= -1.0  # the in-plane normal of the curve that points backward
    # Splenic vein: behind the gland from the neck to the tail (partly in its groove), then to the splenic hilum.
    vein_r = rng.uniform(3.0, 5.0)
    depth = rng.uniform(-0.2, 0.9)  # of the vein's radius outside the gland's outline: at most 60 % of it inside
    drop = rng.uniform(-0.3, 0.2)   # above or below the gland's mid-plane, in gland radii
    along = np.unique(np.r_[np.arange(neck, len(curve), 3), len(curve) - 1])
    points = [curve[i] + posterior[i] * (radius[i] + depth * vein_r) + [0.0, 0.0, drop * radius[i]] for i in along]
    hilum = np.add(spleen.centre, np.multiply(spleen.semi, [0.7, 0.3, -0.2]))  # medial, anterior face
    splenic = _chain(points + [hilum], vein_r)
    confluence = points[0]
    smv_r = rng.uniform(4.0, 6.5)
    below = [smv_x + rng.uniform(-2.0, 2.0), confluence[1] + rng.uniform(0.0, 8.0),
             confluence[2] - 0.8 * radius[neck] - rng.uniform(5.0, 15.0)]
    low = np.add(below, [rng.uniform(-5.0, 10.0), rng.uniform(0.0, 15.0), -rng.uniform(60.0, 90.0)])
    smv = _chain([confluence, below, low], smv_r)
    # Portal vein: up and to the right from the confluence, toward the liver hilum.
    portal = _chain([confluence, confluence + [rng.uniform(15.0, 30.0), rng.uniform(0.0, 12.0),
                                               rng.uniform(25.0, 45.0)]], rng.uniform(5.5, 8.0))
    # Left renal vein at a kidney level, crossing in front of the aorta to the IVC, under the SMA's origin.
    renal_r = rng.uniform(3.5, 5.5)
    renal_z = left_kidney.centre[2] + rng.uniform(-8.0, 8.0)
    renal = _chain([
        [left_kidney.centre[0] + 0.75 * left_kidney.semi[0], left_kidney.centre[1]
         + rng.uniform(0.0, 0.3) * left_kidney.semi[1], renal_z + rng.uniform(-5.0, 5.0)],
        [aorta.centre[0], front + renal_r * rng.uniform(0.5, 1.0), renal_z],
        [ivc.centre[0] - 0.3 * ivc.semi[0], ivc.centre[1] + rng.uniform(0.0, 0.3) * ivc.semi[1],
         renal_z + rng.uniform(-3.0, 5.0)]], renal_r)
    # SMA: from the aorta above the renal vein, forward over it, then down in front of it and on below the neck.
    sma_r = rng.uniform(2.5, 4.0)
    origin = [sma_x, aorta.centre[1] + 4.0, renal_z + rng.uniform(8.0, 15.0)]
    over = [sma_x + rng.uniform(-1.0, 2.0), front + 2.0 * renal_r + sma_r + rng.uniform(1.0, 4.0),
            renal_z - renal_r - rng.uniform(2.0, 5.0)]
    down = np.add(over, [rng.uniform(-3.0, 3.0), rng.uniform(5.0, 20.0), -rng.uniform(70.0, 100.0)])
    sma = _chain([origin, over, down], sma_r)
    return (Tube("splenic_vein", "portal_vein", splenic), Tube("smv", "portal_vein", smv),
            Tube("portal_vein", "portal_vein", portal), Tube("sma", "aorta", sma),
            Tube("left_renal_vein", "ivc", renal))


def _anterior_room(cavity: Ellipsoid, x: float, back: float) -> float:
    """mm from RAS y `back` to the front of the cavity at RAS x."""
    (cx, cy, _), (ai, bi, _) = cavity.centre, cavity.semi
    return cy + bi * np.sqrt(max(0.0, 1.0 - ((x - cx) / ai) ** 2)) - back


def _draw_stomach(rng, cavity: Ellipsoid, spleen: Ellipsoid, curve: np.ndarray, radius: np.ndarray) -> Stomach:
    """A J of capsules: the fundus high between the tail and the spleen, the body in front of the gland's body and
    tail, the antrum in front of the neck, the pylorus in front of the head toward the duodenum; the lesser sac (a
    few mm) between it and the gland."""
    body, neck = (len(curve) * 3) // 4, len(curve) // 5  # the stomach's body lies over the gland's body and tail
    tail, middle = curve[-1], curve[body]
    distension = rng.uniform(0.7, 1.2)
    gap = rng.uniform(2.0, 10.0)
    plan = [  # anchor point, how far back the stomach may reach there, radius
        (tail + [rng.uniform(0.2, 0.7) * (spleen.centre[0] - tail[0]), 0.0, rng.uniform(20.0, 45.0)],
         tail[1] - rng.uniform(0.0, 15.0), rng.uniform(25.0, 40.0)),
        (middle + [-rng.uniform(0.0, 20.0), 0.0, rng.uniform(0.0, 20.0)], middle[1] + radius[body] + gap,
         rng.uniform(20.0, 35.0)),
        (curve[neck] + [rng.uniform(-10.0, 5.0), 0.0, rng.uniform(-15.0, 10.0)], curve[neck][1] + radius[neck] + gap,
         rng.uniform(14.0, 24.0)),
        (curve[0] + [rng.uniform(5.0, 20.0), 0.0, rng.uniform(5.0, 20.0)], curve[0][1] + radius[0] + gap,
         rng.uniform(8.0, 13.0)),
    ]
    out = np.array([0.0, 1.0, 0.3]) / np.hypot(1.0, 0.3)  # forward and up, away from the gland
    centres, radii = [], []
    for anchor, back, size in plan:
        # A thin patient's stomach is smaller and nearer the gland: it mostly stays inside the cavity.
        room = _anterior_room(cavity, anchor[0], back)
        near = min(gap, max(1.0, 0.15 * room))
        size = float(np.clip(room / 2.0 - 1.0, 6.0, size * distension))
        centre = (float(anchor[0]), float(back - gap + near + size), float(anchor[2]))
        # The fundus moves up, under the diaphragm; the rest forward.
        up = out if centres else np.array([0.0, 0.4, 1.0]) / np.hypot(0.4, 1.0)
        (sphere,) = clear_of_pancreas((Capsule(centre, centre, size),), up, curve, radius, gap=near)
        centres.append(sphere.start)
        radii.append(size)
    wall = (Capsule(centres[0], centres[0], radii[0]),) + tuple(
        Capsule(a, b, r) for a, b, r in zip(centres, centres[1:], radii[1:]))
    # Where a segment between two spheres crosses the gland, the whole J moves forward, at most 10 mm: in a thin
    # patient the stomach may then touch the gland without a fat plane, as on real CT (the gland keeps its voxels).
    wall = clear_of_pancreas(wall, out, curve, radius, gap=1.0, steps=5)
    thickness = rng.uniform(3.0, 6.0)
    lumen = tuple(Capsule(c.start, c.end, max(2.0, c.radius - thickness)) for c in wall)
    contents = rng.choice(3, p=[0.4, 0.2, 0.4])  # fluid, gas, or both with an air-fluid level
    low = min(min(c.start[1], c.end[1]) - c.radius for c in lumen)
    high = max(max(c.start[1], c.end[1]) + c.radius for c in lumen)
    level = (np.inf, -np.inf, low + rng.uniform(0.35, 0.8) * (high - low))[contents]
    return Stomach(wall, lumen, float(level))


def _draw_psoas(rng, vertebra: Ellipsoid, head_z: float) -> tuple[Tube, ...]:
    """Both psoas muscles: thin at the pancreas head's level (their origin), thicker and more lateral below."""
    top = head_z + rng.uniform(10.0, 35.0)
    levels = np.linspace(0.0, 1.0, 7)
    thinnest, thickest = rng.uniform(5.0, 9.0), rng.uniform(18.0, 28.0)
    sizes = thinnest + (thickest - thinnest) * levels
    muscles = []
    for name, sign in (("psoas_right", 1.0), ("psoas_left", -1.0)):
        x = vertebra.centre[0] + sign * (vertebra.semi[0] + 0.45 * sizes + rng.uniform(-2.0, 2.0))
        y = vertebra.centre[1] + rng.uniform(-4.0, 4.0) + 0.35 * sizes
        z = top - 150.0 * levels
        points = np.stack([x, y, z], 1)
        muscles.append(Tube(name, "muscle", tuple(
            Capsule(tuple(map(float, a)), tuple(map(float, b)), float((ra + rb) / 2.0))
            for a, b, ra, rb in zip(points, points[1:], sizes, sizes[1:]))))
    return tuple(muscles)


def _draw_ribs(rng, cavity: Ellipsoid, wall: float, head_z: float) -> tuple[Tube, ...]:
    """The lower ribs in the body wall on both sides, each descending from beside the spine round the flank; the
    lowest ends at the back of the flank near the pancreas level, the higher ones reach further forward."""
    (cx, cy, _), (ai, bi, _) = cavity.centre, cavity.semi
    ring = (ai + 0.5 * wall, bi + 0.5 * wall)  # the middle of the muscle wall
    thickness = min(rng.uniform(3.0, 5.0), 0.45 * wall)
    lowest, spacing, descent = head_z + rng.uniform(0.0, 25.0), rng.uniform(22.0, 32.0), rng.uniform(20.0, 35.0)
    ribs = []
    for index in range(int(rng.integers(4, 7))):
        start = -np.pi / 2 + rng.uniform(0.3, 0.45)  # angle from the patient's side: -pi/2 is the spine
        stop = min(1.2, -0.35 + 0.35 * index + rng.uniform(-0.15, 0.15))
        for sign in (1.0, -1.0):
            angle = np.linspace(start, stop, 8)
            z = lowest + index * spacing + rng.uniform(-5.0, 5.0) - descent * (angle - start)
            points = np.stack([cx + sign * ring[0] * np.cos(angle), cy + ring[1] * np.sin(angle), z], 1)
            ribs.append(Tube("rib", "bone", _chain(points, thickness)))
    return tuple(ribs)


def _draw_gallbladder(rng, liver: Ellipsoid, curve: np.ndarray, radius: np.ndarray) -> Capsule | None:
    """A fluid pear at the liver's inferior, medial and anterior edge, partly in its fossa, clear of the gland."""
    if rng.random() < 0.15:
        return None
    direction = np.array([-0.55, 0.45, -0.7]) + rng.uniform(-0.15, 0.15, 3)
    direction /= np.linalg.norm(direction)
    surface = np.add(liver.centre, np.multiply(liver.semi, direction))
    normal = direction / np.array(liver.semi)
    normal /= np.linalg.norm(normal)
    size, half = rng.uniform(10.0, 17.0), rng.uniform(8.0, 22.0)
    axis = np.array([-0.3, 0.5, -1.0]) + rng.uniform(-0.3, 0.3, 3)  # the fundus points down, forward, medially
    axis *= half / np.linalg.norm(axis)
    centre = surface + normal * size * rng.uniform(-0.1, 0.5)  # up to half in the liver, which keeps its voxels
    away = np.array([0.5, 1.0, 0.0]) / np.hypot(0.5, 1.0)  # forward and to the right, away from the head
    (body,) = clear_of_pancreas((Capsule(tuple(centre - axis), tuple(centre + axis), size),), away, curve, radius,
                                gap=rng.uniform(2.0, 8.0))
    return body


def _draw_colon(rng, cavity: Ellipsoid, curve: np.ndarray, radius: np.ndarray) -> tuple[BowelLoop, ...]:
    """Ascending colon up the right flank, descending colon down the left, transverse colon hanging between the
    flexures in front of and below the gland; most pieces hold gas."""
    (cx, cy, _), (ai, bi, _) = cavity.centre, cavity.semi
    head_z, tail_z = curve[0][2], curve[-1][2]
    pieces = []
    flexures = []
    for sign, depth, top in ((1.0, rng.uniform(-0.35, 0.1), head_z + rng.uniform(-25.0, 10.0)),
                             (-1.0, rng.uniform(-0.45, 0.0), tail_z + rng.uniform(-5.0, 25.0))):
        size = rng.uniform(14.0, 24.0) if sign > 0 else rng.uniform(11.0, 20.0)
        y = cy + depth * bi
        x = cx + sign * (ai * np.sqrt(1.0 - depth ** 2) - size - rng.uniform(2.0, 10.0))  # along the flank
        flexures.append(np.array([x, y, top]))
        piece = Capsule((float(x), float(y), float(top - rng.uniform(80.0, 120.0))), tuple(map(float, flexures[-1])),
                        size)
        pieces += clear_of_pancreas((piece,), np.array([sign, 0.0, 0.0]), curve, radius)
    size = rng.uniform(12.0, 22.0)
    sag = [cx + rng.uniform(-30.0, 30.0), cy + bi - size - rng.uniform(3.0, 15.0), head_z - rng.uniform(20.0, 60.0)]
    transverse = _chain([flexures[0], sag, flexures[1]], size)
    pieces += clear_of_pancreas(transverse, np.array([0.0, 1.0, -0.5]) / np.hypot(1.0, 0.5), curve, radius)
    colon = []
    for piece in pieces:
        gas = Capsule(piece.start, piece.end, piece.radius * rng.uniform(0.4, 0.85)) if rng.random() < 0.75 else None
        colon.append(BowelLoop(piece, float(rng.uniform(*COLON_HU)), gas))
    return tuple(colon)

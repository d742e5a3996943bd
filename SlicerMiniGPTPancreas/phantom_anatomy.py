"""The synthetic patient of `phantom`: analytic shapes in RAS mm and tissue HU, drawn from a seed (numpy only).

What is drawn: skin, subcutaneous fat, the muscle wall and the abdominal cavity's fat; the vertebra and spinous
process; the labelled organs (liver, spleen, both kidneys with cortex and medulla, the pancreas and its tumour);
the aorta, the IVC, the duodenum and small-bowel loops of pancreas-like density beside the gland; and, unlabelled
(`phantom_structures`), the splenic, superior mesenteric, portal and left renal veins, the SMA, the stomach, the
psoas muscles, the lower ribs, the gallbladder and the colon.

A demo model trained on these phantoms is checked on phantoms of another, unseen generator, so every seed draws
a different patient as real abdominal CT differs: body size and position on the table, fat thickness, organ
sizes and positions, the pancreas's length, thickness, tilt, curvature and turn, the tumour's size and whether
it bulges out of the gland, bowel loops of pancreas-like density around it, the structures round the gland
(vessel calibres and courses, the stomach's size and contents, ...), and the contrast phase (tissue HU).
The draws depend on the seed only, never on the voxel grid, so one seed is one patient on any grid.

RAS: +x = patient Right, +y = Anterior, +z = Superior (the liver, on the patient's right, has x > 0).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from SlicerMiniGPTPancreas.phantom_shapes import Anterior, Capsule, Ellipsoid, clear_of_pancreas
from SlicerMiniGPTPancreas.phantom_structures import BowelLoop, Surroundings, draw_surroundings

# AbdomenCT-1K organ ids, MSD Task07 label values, and the values of `Phantom.kidney_sides`.
LIVER, KIDNEYS, SPLEEN, PANCREAS = 1, 2, 3, 4
MSD_PANCREAS, MSD_TUMOUR = 1, 2
KIDNEY_RIGHT, KIDNEY_LEFT = 1, 2

# Per-patient range (low, high) of each tissue's mean HU. The contrast-enhanced tissues share one draw of the
# contrast phase (early scans: bright aorta, late: bright liver), the others are drawn independently. The tissues
# after "tumour" were added later and are drawn after it, so that adding them kept every seed's earlier draws.
TISSUE_HU = {
    "air": (-1000.0, -1000.0), "subcutaneous_fat": (-120.0, -80.0), "visceral_fat": (-110.0, -80.0),
    "muscle": (35.0, 65.0), "bone": (400.0, 900.0), "liver": (50.0, 120.0), "spleen": (60.0, 130.0),
    "kidney_cortex": (120.0, 250.0), "kidney_medulla": (30.0, 100.0), "aorta": (150.0, 350.0),
    "ivc": (80.0, 200.0), "duodenum": (20.0, 60.0), "bowel_gas": (-950.0, -850.0), "pancreas": (80.0, 140.0),
    "tumour": (20.0, 60.0),
    "portal_vein": (90.0, 210.0), "stomach_wall": (30.0, 70.0), "gastric_fluid": (0.0, 20.0), "bile": (0.0, 20.0),
}
_ENHANCING = ("liver", "spleen", "kidney_cortex", "aorta", "ivc", "pancreas", "portal_vein")
TUMOUR_CONTRAST_HU = 25.0  # the mass is always at least this much darker than the gland (hypo-attenuating)
BOWEL_HU = (20.0, 60.0)    # wall and contents of a loop, like unenhanced or early-phase pancreas confounders

PANCREAS_LENGTH_MM = 90.0               # nominal head-to-tail distance
PANCREAS_RADII_MM = (16.0, 10.0, 8.0)   # nominal head, body, tail radii
_PANCREAS_SAMPLES = 24                  # ellipsoids along the head -> body -> tail curve
_BOUNDS_PAD_MM = 1e-3                   # so that cropping to a shape's box never drops a point on its surface


@dataclass(frozen=True)
class Anatomy:
    """The drawn patient: shapes in RAS mm and the tissue HU (before noise)."""

    body: Ellipsoid     # skin surface
    muscle: Ellipsoid   # outer surface of the abdominal wall muscle (inside the subcutaneous fat)
    cavity: Ellipsoid   # inner surface of the wall: organs are clipped to it
    vertebra: Ellipsoid
    spinous: Ellipsoid
    liver: Ellipsoid
    spleen: Ellipsoid
    kidneys: dict[int, tuple[Ellipsoid, Ellipsoid]]  # KIDNEY_RIGHT / KIDNEY_LEFT -> (cortex surface, medulla)
    aorta: Ellipsoid
    ivc: Ellipsoid
    duodenum: Ellipsoid
    bowel: tuple[BowelLoop, ...]
    pancreas: tuple[Ellipsoid, ...]  # Ellipsoids from head (patient right) through body to tail (toward the spleen)
    tumour: Ellipsoid   # clipped to the pancreas when rendered
    hu: dict[str, float]  # tissue name -> HU, drawn per patient within TISSUE_HU
    surroundings: Surroundings  # the unlabelled vessels, stomach, psoas, ribs, gallbladder and colon


@dataclass(frozen=True)
class _Torso:
    """Body outline: centre (RAS mm), skin half-width/depth, subcutaneous fat and muscle wall thickness."""

    centre: np.ndarray
    half_width: float
    half_depth: float
    fat: float
    wall: float

    @property
    def cavity(self) -> tuple[float, float]:
        """Half-width and half-depth of the abdominal cavity, inside fat and wall."""
        inset = self.fat + self.wall
        return self.half_width - inset, self.half_depth - inset

    def at(self, dx: float, dy: float, dz: float) -> tuple[float, float, float]:
        """RAS point at an offset from the torso centre: +dx patient right, +dy anterior, +dz superior."""
        return tuple(float(v) for v in self.centre + [dx, dy, dz])


def draw_anatomy(seed: int, centre_ras: np.ndarray) -> Anatomy:
    """Draw one patient from `seed`, lying near `centre_ras`; the result does not depend on any voxel grid."""
    rng = np.random.default_rng(seed)  # one stream: reordering the draws below changes every seed's patient
    torso = _draw_torso(rng, np.asarray(centre_ras, float))
    organs = _draw_organs(rng, torso)
    head, body, tail, radii = _draw_pancreas(rng, torso, organs)
    curve, radius = _pancreas_curve(head, body, tail, radii, np.linspace(0.0, 1.0, _PANCREAS_SAMPLES))
    duodenum = Ellipsoid(tuple(head + [radii[0] + 10.0, 0.0, -5.0]), (9.0, 10.0, 35.0))  # C-loop round the head
    bowel = _draw_bowel(rng, curve, radius, duodenum)
    tumour = _draw_tumour(rng, head, body, tail, radii)
    hu = _draw_hu(rng)
    (ai, bi), inf = torso.cavity, np.inf
    cavity = Ellipsoid(torso.at(0, 0, 0), (ai, bi, inf))
    surroundings = draw_surroundings(rng, cavity, torso.wall, organs, organs["kidneys"][KIDNEY_LEFT][0], curve, radius)
    return Anatomy(
        body=Ellipsoid(torso.at(0, 0, 0), (torso.half_width, torso.half_depth, inf)),
        muscle=Ellipsoid(torso.at(0, 0, 0), (torso.half_width - torso.fat, torso.half_depth - torso.fat, inf)),
        cavity=cavity, duodenum=duodenum, bowel=bowel, tumour=tumour, hu=hu, surroundings=surroundings,
        pancreas=tuple(Ellipsoid(tuple(c), (r, r, 0.8 * r)) for c, r in zip(curve, radius)),
        **organs,
    )


def _draw_torso(rng: np.random.Generator, centre_ras: np.ndarray) -> _Torso:
    half_width = rng.uniform(110.0, 175.0)
    half_depth = rng.uniform(80.0, min(140.0, half_width - 10.0))  # abdomens are wider than deep
    wall = rng.uniform(10.0, 14.0)
    # Fat up to 35 mm, but a small patient keeps a cavity of at least 85 x 60 mm half-axes for the organs.
    fat_max = max(5.0, min(35.0, half_width - wall - 85.0, half_depth - wall - 60.0))
    fat = rng.uniform(5.0, fat_max)
    off_centre = [rng.uniform(-25.0, 25.0), rng.uniform(-20.0, 20.0), rng.uniform(-10.0, 10.0)]  # on the table
    return _Torso(centre_ras + off_centre, half_width, half_depth, fat, wall)


def _draw_organs(rng: np.random.Generator, torso: _Torso) -> dict:
    """Spine, vessels and kidneys hang off the back wall (fixed mm), liver and spleen scale with the cavity."""
    ai, bi = torso.cavity

    def jit(scale: float) -> float:
        return float(rng.uniform(-scale, scale))

    def size(a: float, b: float, c: float) -> tuple[float, float, float]:
        factor = rng.uniform(0.75, 1.25)
        return (a * factor, b * factor, c * factor)

    vertebra = Ellipsoid(torso.at(0, -bi + 22.0, 0), (16.0, 15.0, np.inf))
    kidneys = {}
    for side, sign, dz in ((KIDNEY_RIGHT, 1.0, -10.0), (KIDNEY_LEFT, -1.0, 0.0)):  # the right kidney sits lower
        cortex = size(22.0, 17.0, 45.0)
        lateral = max(0.5 * ai + jit(10.0), vertebra.semi[0] + 6.0 + cortex[0])  # never into the spine
        centre = torso.at(sign * lateral, -bi + 41.0 + jit(10.0), dz + jit(8.0))
        medulla = (cortex[0] - 8.0, cortex[1] - 7.0, cortex[2] - 12.0)
        kidneys[side] = (Ellipsoid(centre, cortex), Ellipsoid(centre, medulla))
    return dict(
        vertebra=vertebra,
        # From the back of the vertebra to 5 mm under the skin, however thin the fat and muscle are.
        spinous=Ellipsoid(torso.at(0, (-bi + 7.0 - torso.half_depth + 5.0) / 2.0, 0),
                          (9.0, (torso.half_depth - bi + 2.0) / 2.0, np.inf)),
        # Liver and spleen reach down to the pancreas level, as on real CT (the right lobe lies lateral to it).
        liver=Ellipsoid(torso.at(0.7 * ai + jit(12.0), 0.1 * bi + jit(10.0), 30.0 + jit(12.0)),
                        size(0.3 * ai, 0.75 * bi, 60.0)),
        spleen=Ellipsoid(torso.at(-0.68 * ai + jit(12.0), -0.35 * bi + jit(10.0), 20.0 + jit(10.0)),
                         size(0.2 * ai, 0.35 * bi, 45.0)),
        kidneys=kidneys,
        aorta=Ellipsoid(torso.at(-13.0 + jit(3.0), -bi + 48.0 + jit(2.0), 0), (11.0, 11.0, np.inf)),
        ivc=Ellipsoid(torso.at(22.0 + jit(3.0), -bi + 48.0 + jit(2.0), 0), (12.0, 9.0, np.inf)),
    )


def _draw_pancreas(rng: np.random.Generator, torso: _Torso, organs: dict):
    """Head in front of the IVC, body arching over the aorta, tail toward the spleen in front of the left kidney.

    Returns the head, body and tail points (RAS mm) and their radii.
    """
    radii = np.array(PANCREAS_RADII_MM) * rng.uniform(0.7, 1.4)
    length = PANCREAS_LENGTH_MM * rng.uniform(0.75, 1.25)
    rise = rng.uniform(0.0, 35.0)                      # the tail lies higher than the head
    turn = np.radians(5.0 + rng.uniform(-20.0, 20.0))  # head -> tail axis, nominally 5 deg back from leftward
    bulge = rng.uniform(-5.0, 25.0)                    # how far the body arches anteriorly off the chord
    ivc, aorta = organs["ivc"], organs["aorta"]
    head = np.array([ivc.centre[0] + rng.uniform(0.0, 15.0),
                     ivc.centre[1] + ivc.semi[1] + radii[0] + rng.uniform(0.0, 6.0),
                     torso.centre[2] - 10.0 + rng.uniform(-5.0, 5.0)])
    # A long gland in a narrow patient is shortened so that the tail stays inside the cavity.
    reach = head[0] - (torso.centre[0] - torso.cavity[0] + radii[2] + 12.0)
    planar = min(np.sqrt(length ** 2 - rise ** 2), reach / np.cos(turn))
    tail = head + [-planar * np.cos(turn), -planar * np.sin(turn), rise]
    # Retroperitoneal: the turn never pushes the tail into the left kidney nor the body into the aorta.
    kidney = organs["kidneys"][KIDNEY_LEFT][0]
    tail[1] = max(tail[1], kidney.centre[1] + kidney.semi[1] + radii[2] + 3.0)
    body = head + (tail - head) / 3.0 + [0.0, bulge, 0.0]
    body[1] = max(body[1], aorta.centre[1] + aorta.semi[1] + 4.0 + radii[1])  # room for the SMA
    return head, body, tail, radii


def _pancreas_curve(head, body, tail, radii, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Points [N, 3] and radii [N] at parameters t of the quadratic Bezier head -> body (t = 0.5) -> tail."""
    control = 2.0 * body - (head + tail) / 2.0  # so the curve passes through `body` at t = 0.5
    t = np.asarray(t, float).reshape(-1, 1)
    points = (1 - t) ** 2 * head + 2 * t * (1 - t) * control + t ** 2 * tail
    return points, np.interp(t[:, 0], [0.0, 0.5, 1.0], radii)


def _draw_tumour(rng: np.random.Generator, head, body, tail, radii) -> Ellipsoid:
    """A round mass in the head or body (where MSD masses mostly are), sometimes bulging out (exophytic)."""
    points, local = _pancreas_curve(head, body, tail, radii, [rng.uniform(0.1, 0.55)])
    # At least 5 mm so that the mass covers a few voxels even on a 3 x 3 x 5 mm grid.
    radius = max(5.0, rng.uniform(0.35, 0.75) * local[0])
    exophytic = rng.random() < 0.3
    offset = rng.uniform(0.3, 0.6) if exophytic else rng.uniform(0.0, 0.2)
    direction = rng.normal(size=3)
    centre = points[0] + offset * local[0] * direction / np.linalg.norm(direction)
    return Ellipsoid(tuple(centre), (radius,) * 3)


def _draw_bowel(rng: np.random.Generator, curve: np.ndarray, radius: np.ndarray, duodenum: Ellipsoid):
    """3-8 loops in front of and below the pancreas and round the duodenum, pushed clear of the gland."""
    loops = []
    for _ in range(int(rng.integers(3, 9))):
        loop_radius = rng.uniform(7.0, 16.0)
        place = rng.integers(3)
        if place == 2:  # beside the duodenum, on its anterior side
            anchor, anchor_radius = np.array(duodenum.centre), max(duodenum.semi[:2])
            out = np.array([rng.uniform(-1.0, 1.0), rng.uniform(0.0, 1.0), rng.uniform(-1.0, 1.0)])
        else:           # in front of (0) or below (1) a point of the gland
            index = rng.integers(len(curve))
            anchor, anchor_radius = curve[index], radius[index]
            sideways = rng.uniform(-0.3, 0.3)
            out = [sideways, 1.0, rng.uniform(-0.5, 0.0)] if place == 0 else [sideways, rng.uniform(0.0, 0.5), -1.0]
        out = np.asarray(out, float) / np.linalg.norm(out)
        centre = anchor + out * (anchor_radius + loop_radius + rng.uniform(1.0, 6.0))
        axis = rng.normal(size=3)
        half = axis / np.linalg.norm(axis) * rng.uniform(0.0, 30.0)  # 0: a round loop seen end-on
        (wall,) = clear_of_pancreas((Capsule(tuple(centre - half), tuple(centre + half), loop_radius),), out, curve,
                                    radius)
        gas = Capsule(wall.start, wall.end, loop_radius * rng.uniform(0.3, 0.6)) if rng.random() < 0.4 else None
        loops.append(BowelLoop(wall, float(rng.uniform(*BOWEL_HU)), gas))
    return tuple(loops)


def _draw_hu(rng: np.random.Generator) -> dict[str, float]:
    """Tissue HU of one scan: one contrast phase for the enhancing tissues, a darker tumour than the gland."""
    phase = rng.uniform(0.0, 1.0)
    hu = {}
    for name, (low, high) in TISSUE_HU.items():
        level = np.clip(phase + rng.uniform(-0.3, 0.3), 0.0, 1.0) if name in _ENHANCING else rng.uniform()
        hu[name] = float(low + (high - low) * level)
        if name == "tumour":
            hu["tumour"] = float(rng.uniform(low, min(high, hu["pancreas"] - TUMOUR_CONTRAST_HU)))
    return hu


def render_anatomy(anatomy: Anatomy, x: np.ndarray, y: np.ndarray, z: np.ndarray, tumour: bool = True):
    """Paint the anatomy at points (x, y, z broadcastable RAS mm arrays); later structures win.

    Returns (hu float32, labels, organs, kidney_sides uint8), each of the broadcast shape.
    """
    canvas = _Canvas(x, y, z, anatomy.hu["air"])
    hu, cavity = anatomy.hu, anatomy.cavity
    canvas.paint(anatomy.body, hu["subcutaneous_fat"])
    canvas.paint(anatomy.muscle, hu["muscle"])
    canvas.paint(cavity, hu["visceral_fat"])
    around = anatomy.surroundings
    _paint_tubes(canvas, around.ribs, hu)  # in the muscle wall, outside the cavity
    # Everything unlabelled before the organs and vessels: where it touches them, the labelled organ keeps its
    # voxels. The colon and gallbladder before the small bowel, which lies over them; the stomach after it.
    _paint_loops(canvas, around.colon, hu, cavity)
    if around.gallbladder is not None:
        canvas.paint(around.gallbladder, hu["bile"], within=cavity)
    _paint_loops(canvas, anatomy.bowel, hu, cavity)
    stomach = around.stomach
    for part in stomach.wall:
        canvas.paint(part, hu["stomach_wall"], within=cavity)
    for part in stomach.lumen:
        canvas.paint(part, hu["gastric_fluid"], within=cavity)
        if stomach.air_level < np.inf:
            canvas.paint(Anterior(part, stomach.air_level), hu["bowel_gas"], within=cavity)
    _paint_tubes(canvas, around.psoas, hu)
    canvas.paint(anatomy.vertebra, hu["bone"])
    canvas.paint(anatomy.spinous, hu["bone"])
    _paint_tubes(canvas, around.vessels, hu, within=cavity)
    canvas.paint(anatomy.liver, hu["liver"], LIVER, within=cavity)
    canvas.paint(anatomy.spleen, hu["spleen"], SPLEEN, within=cavity)
    for side, (cortex, medulla) in anatomy.kidneys.items():
        canvas.paint(cortex, hu["kidney_cortex"], KIDNEYS, side, within=cavity)
        canvas.paint(medulla, hu["kidney_medulla"], KIDNEYS, side, within=cavity)
    canvas.paint(anatomy.aorta, hu["aorta"])
    canvas.paint(anatomy.ivc, hu["ivc"])
    canvas.paint(anatomy.duodenum, hu["duodenum"], within=cavity)
    for part in anatomy.pancreas:  # part by part: each is small, so each paints only its own box
        canvas.paint(part, hu["pancreas"], PANCREAS, label=MSD_PANCREAS, within=cavity)
    if tumour:  # only over the gland just painted: the mass never leaves the pancreas
        canvas.paint(anatomy.tumour, hu["tumour"], PANCREAS, label=MSD_TUMOUR, only_label=MSD_PANCREAS)
    return canvas.hu, canvas.labels, canvas.organs, canvas.sides


def _paint_loops(canvas: _Canvas, loops, hu: dict[str, float], cavity: Ellipsoid) -> None:
    for loop in loops:
        canvas.paint(loop.wall, loop.hu, within=cavity)
        if loop.gas is not None:
            canvas.paint(loop.gas, hu["bowel_gas"], within=cavity)


def _paint_tubes(canvas: _Canvas, tubes, hu: dict[str, float], within=None) -> None:
    for tube in tubes:
        for segment in tube.segments:
            canvas.paint(segment, hu[tube.tissue], within=within)


class _Canvas:
    """The arrays being painted at points (x, y, z). Each shape is evaluated only inside its bounding box,
    which keeps the many small shapes (pancreas samples, bowel loops) cheap on a large grid."""

    def __init__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, background_hu: float):
        self.shape = np.broadcast_shapes(x.shape, y.shape, z.shape)
        ndim = len(self.shape)
        self.coords = [np.reshape(c, (1,) * (ndim - c.ndim) + c.shape) for c in (x, y, z)]
        self.hu = np.full(self.shape, background_hu, np.float32)
        self.labels, self.organs, self.sides = (np.zeros(self.shape, np.uint8) for _ in range(3))

    def paint(self, shape, hu: float, organ: int = 0, side: int = 0, label: int = 0, within=None,
              only_label: int | None = None) -> None:
        """Set the points inside `shape` (and inside `within`, and where labels == only_label) to the values."""
        region = self._region(*shape.bounds())
        if region is None:
            return
        x, y, z = (c[tuple(s if n > 1 else slice(None) for s, n in zip(region, c.shape))] for c in self.coords)
        mask = shape.contains(x, y, z)
        if within is not None:
            mask = mask & within.contains(x, y, z)
        if only_label is not None:
            mask = mask & (self.labels[region] == only_label)
        mask = np.broadcast_to(mask, self.hu[region].shape)
        for array, value in ((self.hu, hu), (self.labels, label), (self.organs, organ), (self.sides, side)):
            array[region][mask] = value

    def _region(self, low: np.ndarray, high: np.ndarray) -> tuple[slice, ...] | None:
        """Index slices of the canvas covering the RAS box [low, high], or None when no point lies in it."""
        region = [slice(None)] * len(self.shape)
        for coord, lo, hi in zip(self.coords, low - _BOUNDS_PAD_MM, high + _BOUNDS_PAD_MM):
            inside = (coord >= lo) & (coord <= hi)
            for axis, n in enumerate(coord.shape):
                if n == 1:
                    continue
                hits = np.flatnonzero(inside.any(axis=tuple(a for a in range(coord.ndim) if a != axis)))
                if hits.size == 0:
                    return None
                current = region[axis]
                start = max(hits[0], current.start or 0)
                stop = min(hits[-1] + 1, self.shape[axis] if current.stop is None else current.stop)
                if start >= stop:
                    return None
                region[axis] = slice(int(start), int(stop))
        return tuple(region)

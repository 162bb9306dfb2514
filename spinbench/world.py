"""The SpinBench world: procedural dogs in procedural rooms, deterministic by seed, with exact masks.

A benchmark for the whole SpinML loop needs ground truth that real photos cannot give: the exact
target mask of every image, a state that is carried by the subject alone, a "public" distribution a
diffusion model can be trained on, and a user whose subject and room that model has never seen. This
module draws all of it in code, with vectorised numpy on small grids (no downloads, no per-pixel
Python loops: `public_corpus(2000)` takes a few seconds on one core).

Design choices
--------------
- **64 px.** Images are `SIZE` = 64 px square RGB: large enough that the four poses are plain to a
  person and to Canny (the L1 release), small enough that a diffusion model can be trained on the
  public corpus in minutes and a classifier on its output in seconds. Every length is a fraction of
  the image size, so other sizes work too.
- **The dog.** Ellipses, capsules (a segment with a radius: legs, neck, tail) and triangles (pointy
  ears), laid out in the dog's own frame (x forward, y up, the floor at y = 0, one unit = the length
  of the torso) and painted without anti-aliasing, so the mask is *exactly* the set of pixels the dog
  painted. Where the dog's colour happens to equal the room's at a pixel, that pixel is moved by one
  level, so the mask is also exactly the set of pixels that differ from the empty room (tested).
  Parts are painted back to front (far legs darker, then tail, torso, near legs, neck, head, ear,
  snout, nose, eye); patterns (spots, stripes, a patch) live in the torso's and head's own frames,
  so they move with the pose.
- **The state is the pose and nothing else.** `sleeping`: lying flat on the floor, head down, front
  legs stretched forward, eye closed. `sitting`: rear on the floor, torso raised at about 60 degrees,
  front legs straight. `standing`: level torso on four vertical legs. `jumping`: torso tilted up
  and in the air, front legs stretched forward and hind legs backward, diagonally. Each image
  jitters the position along and into the floor (farther means smaller), the scale, the facing
  (left or right), a small tilt and the pose's own angles.
- **Rooms are state-independent.** A `Room` is drawn from its own random stream and its picture
  (`render_room`) is a function of the `Room` alone; the dog is painted last, and lighting multiplies
  room and dog alike. There are no shadows or contact marks (a jumping dog's shadow would be a
  background cue). So nothing outside the mask says which state the image shows, and the L0/L1/L2
  background releases carry the room but never the label (tested pixel for pixel).
- **Public versus user.** Public dogs have natural coat colours (browns, tans, golden, cream, white,
  greys, black: low saturation, or an orange-brown hue) and public rooms muted walls and natural
  floors. A user's dog has a saturated hue no public dog has (green, teal, blue, purple, pink,
  lime) and the user's room a vivid palette (coral, mint, lavender, ... walls; coloured floors).
  `is_public_colour` is the membership test. A model trained on the public corpus has therefore
  never seen the user's dog or room: what an L1 or L2 release of a user's reference carries is
  information the model cannot have from its training data, which is what the privacy levels trade.
  The colour words of user captions (`USER_DOG_WORDS`, `USER_WALL_WORDS`) never occur in public
  captions.
- **Randomness.** Sample i of `public_corpus(n, seed)` uses its own generators, keyed by (seed, i)
  and by purpose (appearance, room, pose), so a corpus of n images is the prefix of a longer one and
  the room never depends on the pose drawn. A user's references and test images come from disjoint
  keys as well. The room is drawn first and a coat too close to its wall or floor colour
  (`MIN_CONTRAST`) is drawn again, so no dog is camouflaged (the room still knows nothing of the
  state).
- **Edges.** `Sample.target_edges` / `background_edges` call `spinml_ray.sanitizer.release` at L1
  with the mask and its complement: exactly what the system releases at L1 for that image.
"""

from __future__ import annotations

import colorsys
import functools
import json
import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np

SIZE = 64
STATES: tuple[str, ...] = ("sleeping", "sitting", "standing", "jumping")
STATE_PHRASES: dict[str, str] = {"sleeping": "sleeping", "sitting": "sitting", "standing": "standing",
                                 "jumping": "jumping"}
PATTERNS: tuple[str, ...] = ("solid", "spots", "stripes", "patch")
PATTERN_WORDS: dict[str, str] = {"solid": "", "spots": "spotted", "stripes": "striped", "patch": "patched"}
WALL_TEXTURES: tuple[str, ...] = ("plain", "stripes", "checker", "gradient")
FLOOR_TEXTURES: tuple[str, ...] = ("planks", "tiles", "carpet")
FURNITURE: tuple[str, ...] = ("sofa", "table", "window", "lamp", "shelf")
SUBJECT = "dog"

# Colour ranges in HSV: word -> (hue range in degrees, saturation range, value range).
PUBLIC_DOG_COLOURS: dict[str, tuple[tuple[float, float], tuple[float, float], tuple[float, float]]] = {
    "brown": ((20, 34), (0.55, 0.70), (0.35, 0.55)),
    "dark brown": ((18, 32), (0.50, 0.70), (0.20, 0.30)),
    "tan": ((28, 38), (0.40, 0.55), (0.70, 0.85)),
    "golden": ((35, 45), (0.55, 0.70), (0.75, 0.90)),
    "cream": ((38, 48), (0.13, 0.22), (0.88, 0.96)),
    "white": ((30, 50), (0.00, 0.05), (0.90, 0.97)),
    "grey": ((0, 360), (0.00, 0.05), (0.42, 0.62)),
    "black": ((0, 360), (0.00, 0.08), (0.10, 0.17)),
}
USER_DOG_COLOURS = {
    "green": ((110, 130), (0.60, 0.85), (0.50, 0.80)),
    "teal": ((170, 185), (0.60, 0.85), (0.50, 0.80)),
    "blue": ((210, 230), (0.60, 0.85), (0.60, 0.90)),
    "purple": ((265, 280), (0.55, 0.80), (0.50, 0.80)),
    "pink": ((315, 330), (0.50, 0.75), (0.80, 0.95)),
    "lime": ((85, 95), (0.60, 0.85), (0.70, 0.90)),
}
USER_SECONDARY_COLOURS = {"white": PUBLIC_DOG_COLOURS["white"], "cream": PUBLIC_DOG_COLOURS["cream"],
                          "black": PUBLIC_DOG_COLOURS["black"]}
PUBLIC_WALLS = {
    "white": ((30, 60), (0.00, 0.04), (0.86, 0.94)),
    "beige": ((33, 45), (0.15, 0.25), (0.78, 0.88)),
    "grey": ((0, 360), (0.00, 0.05), (0.58, 0.72)),
    "cream": ((42, 52), (0.10, 0.18), (0.88, 0.95)),
    "taupe": ((22, 34), (0.14, 0.24), (0.52, 0.64)),
}
USER_WALLS = {
    "coral": ((4, 14), (0.55, 0.70), (0.85, 0.95)),
    "mint": ((140, 155), (0.40, 0.55), (0.80, 0.90)),
    "lavender": ((255, 270), (0.38, 0.50), (0.80, 0.90)),
    "turquoise": ((172, 182), (0.60, 0.75), (0.70, 0.85)),
    "mustard": ((46, 52), (0.70, 0.85), (0.70, 0.80)),
    "magenta": ((295, 305), (0.60, 0.75), (0.60, 0.75)),
}
PUBLIC_FLOORS = {  # texture -> colour ranges
    "planks": ((20, 34), (0.40, 0.60), (0.40, 0.62)),
    "tiles": ((0, 360), (0.00, 0.06), (0.55, 0.85)),
    "carpet": ((25, 45), (0.10, 0.30), (0.45, 0.70)),
}
USER_FLOOR_HUES = ((350, 360), (95, 115), (195, 215), (280, 292))  # red, green, blue, violet floors
PUBLIC_DOG_WORDS = frozenset(PUBLIC_DOG_COLOURS)
USER_DOG_WORDS = frozenset(USER_DOG_COLOURS)
USER_WALL_WORDS = frozenset(USER_WALLS)

# The public coat-colour range, in HSV: near-neutral (any hue), or an orange-brown hue.
_NEUTRAL_SATURATION = 0.12
_BROWN_HUES = (15.0, 50.0)
_BROWN_SATURATION = 0.75
_DARK = np.array([22.0, 18.0, 18.0])

# Separate generator keys, so the streams never overlap.
_APPEARANCE, _ROOM, _POSE = 0, 1, 2
_PUBLIC_KEY, _USER_KEY = 104_729, 7_919
SPLITS = {"references": 1, "test": 2}


# ----------------------------------------------------------------------------------------------
# colours


def hsv(rgb) -> tuple[float, float, float]:
    """(hue in degrees, saturation, value) of an RGB triple of 0-255 values."""
    h, s, v = colorsys.rgb_to_hsv(*(float(c) / 255.0 for c in rgb))
    return h * 360.0, s, v


def _from_hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((h % 360.0) / 360.0, s, v)
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def _draw_colour(ranges, rng: np.random.Generator) -> tuple[int, int, int]:
    (h0, h1), (s0, s1), (v0, v1) = ranges
    return _from_hsv(rng.uniform(h0, h1), rng.uniform(s0, s1), rng.uniform(v0, v1))


def is_public_colour(rgb) -> bool:
    """Whether a colour lies in the public coat-colour range: near-neutral (black, greys, white,
    cream) or a brown/tan/golden hue that is not fully saturated."""
    h, s, _ = hsv(rgb)
    if s <= _NEUTRAL_SATURATION:
        return True
    return _BROWN_HUES[0] <= h <= _BROWN_HUES[1] and s <= _BROWN_SATURATION


def is_public_appearance(appearance: Appearance) -> bool:
    """Whether both of a dog's colours lie in the public coat-colour range."""
    return is_public_colour(appearance.body) and is_public_colour(appearance.secondary)


def hue_distance_from_public(rgb) -> float:
    """Degrees between a colour's hue and the public brown-hue band (0 inside it)."""
    h = hsv(rgb)[0]
    lo, hi = _BROWN_HUES
    if lo <= h <= hi:
        return 0.0
    return min((lo - h) % 360.0, (h - hi) % 360.0)


# ----------------------------------------------------------------------------------------------
# the data types


@dataclass(frozen=True)
class Appearance:
    """How one dog looks. `pattern_seed` fixes where its spots/stripes/patch are, so the same dog
    keeps its markings in every image; the words are what its captions call its colours."""

    body: tuple[int, int, int]
    secondary: tuple[int, int, int]
    pattern: str
    size_scale: float = 1.0
    body_word: str = "brown"
    secondary_word: str = "white"
    ears: str = "floppy"  # or "pointy"
    pattern_seed: int = 0

    def __post_init__(self):
        if self.pattern not in PATTERNS:
            raise ValueError(f"pattern {self.pattern!r} is not one of {PATTERNS}")
        if self.ears not in ("floppy", "pointy"):
            raise ValueError(f"ears {self.ears!r} is not 'floppy' or 'pointy'")

    @property
    def words(self) -> str:
        """Colour and pattern words of a caption, e.g. 'brown and white spotted'."""
        if self.pattern == "solid":
            return self.body_word
        return f"{self.body_word} and {self.secondary_word} {PATTERN_WORDS[self.pattern]}"


@dataclass(frozen=True)
class Furniture:
    """One piece of furniture; positions and sizes are fractions of the image size."""

    kind: str
    x: float  # left edge
    width: float
    height: float
    colour: tuple[int, int, int]
    colour2: tuple[int, int, int]
    y: float = 0.0  # top edge for wall items (window, shelf); ignored for floor items


@dataclass(frozen=True)
class Room:
    """A room: wall, floor (split at `horizon`, a fraction of the height), furniture and light.
    Its picture is a function of these fields alone (`texture_seed` fixes the floor's noise)."""

    wall: tuple[int, int, int]
    wall_texture: str
    floor: tuple[int, int, int]
    floor_texture: str
    horizon: float
    furniture: tuple[Furniture, ...]
    brightness: float = 1.0
    light_gradient: float = 0.0  # left-to-right change of brightness, -0.2 .. 0.2
    texture_seed: int = 0
    wall_word: str = "white"
    texture_scale: float = 1.0

    def __post_init__(self):
        if self.wall_texture not in WALL_TEXTURES:
            raise ValueError(f"wall_texture {self.wall_texture!r} is not one of {WALL_TEXTURES}")
        if self.floor_texture not in FLOOR_TEXTURES:
            raise ValueError(f"floor_texture {self.floor_texture!r} is not one of {FLOOR_TEXTURES}")

    @property
    def words(self) -> str:
        return self.wall_word


@dataclass(eq=False)
class Sample:
    """One rendered image with its exact dog mask, state and caption."""

    image: np.ndarray  # HxWx3 uint8
    mask: np.ndarray  # HxW bool: exactly the pixels the dog painted
    state: str
    caption: str
    appearance: Appearance
    room: Room

    @functools.cached_property
    def target_edges(self) -> np.ndarray:
        """HxW uint8 0/255: the L1 release of the dog (spinml_ray.sanitizer.release, region = mask)."""
        return _l1(self.image, self.mask)

    @functools.cached_property
    def background_edges(self) -> np.ndarray:
        """HxW uint8 0/255: the L1 release of the background (region = ~mask)."""
        return _l1(self.image, ~self.mask)


def _l1(image: np.ndarray, region: np.ndarray) -> np.ndarray:
    from spinml_ray.sanitizer import release
    from spinml_ray.spec import Level

    edges, _, _ = release(image, region, Level.L1)
    return edges


def caption_for(appearance: Appearance, room: Room, state: str) -> str:
    """'a photo of a {colour words} dog {state phrase} in a {room words} room'."""
    return f"a photo of a {appearance.words} {SUBJECT} {STATE_PHRASES[state]} in a {room.words} room"


def prompt_for(state: str) -> str:
    """The caption without appearance or room: what the system's text-only (L0) prompt says."""
    return f"a photo of a {SUBJECT} {STATE_PHRASES[state]}"


# ----------------------------------------------------------------------------------------------
# drawing primitives, in the dog's frame (x forward, y up, floor at y = 0)


class _Ellipse:
    def __init__(self, cx, cy, rx, ry, angle=0.0):
        self.cx, self.cy, self.rx, self.ry, self.angle = cx, cy, rx, ry, angle

    def frame(self, u, v):
        """Coordinates normalised to the ellipse: inside is p^2 + q^2 <= 1, p along its long axis."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        du, dv = u - self.cx, v - self.cy
        return (du * c + dv * s) / self.rx, (dv * c - du * s) / self.ry

    def inside(self, u, v):
        p, q = self.frame(u, v)
        return p * p + q * q <= 1.0

    def outline(self):
        t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        c, s = math.cos(self.angle), math.sin(self.angle)
        px, py = self.rx * np.cos(t), self.ry * np.sin(t)
        return self.cx + px * c - py * s, self.cy + px * s + py * c


class _Capsule:
    def __init__(self, a, b, r):
        self.a, self.b, self.r = a, b, r

    def inside(self, u, v):
        (x0, y0), (x1, y1) = self.a, self.b
        dx, dy = x1 - x0, y1 - y0
        t = np.clip(((u - x0) * dx + (v - y0) * dy) / max(dx * dx + dy * dy, 1e-12), 0.0, 1.0)
        ex, ey = u - (x0 + t * dx), v - (y0 + t * dy)
        return ex * ex + ey * ey <= self.r * self.r

    def outline(self):
        t = np.linspace(0, 2 * np.pi, 12, endpoint=False)
        xs = np.concatenate([self.a[0] + self.r * np.cos(t), self.b[0] + self.r * np.cos(t)])
        ys = np.concatenate([self.a[1] + self.r * np.sin(t), self.b[1] + self.r * np.sin(t)])
        return xs, ys


class _Triangle:
    def __init__(self, *points):
        self.points = points

    def inside(self, u, v):
        (x0, y0), (x1, y1), (x2, y2) = self.points
        sign = 1.0 if (x1 - x0) * (y2 - y0) - (y1 - y0) * (x2 - x0) >= 0 else -1.0
        result = np.ones(np.shape(u), dtype=bool)
        for (ax, ay), (bx, by) in (((x0, y0), (x1, y1)), ((x1, y1), (x2, y2)), ((x2, y2), (x0, y0))):
            result &= sign * ((bx - ax) * (v - ay) - (by - ay) * (u - ax)) >= 0
        return result

    def outline(self):
        return np.array([p[0] for p in self.points]), np.array([p[1] for p in self.points])


def _rot(angle: float, x: float, y: float) -> tuple[float, float]:
    c, s = math.cos(angle), math.sin(angle)
    return x * c - y * s, x * s + y * c


def _add(p, q):
    return p[0] + q[0], p[1] + q[1]


# ----------------------------------------------------------------------------------------------
# poses: a list of (part, colour role) in painting order, plus which ellipses carry the pattern


@dataclass
class _Pose:
    parts: list = field(default_factory=list)  # (primitive, role)
    torso: _Ellipse | None = None
    head: _Ellipse | None = None
    grounded: bool = True


def _head(pose: _Pose, appearance: Appearance, centre, tilt: float, eye_closed: bool = False) -> None:
    """Neck-less head group at `centre`, nose pointing along `tilt` (radians, up is positive)."""
    head = _Ellipse(centre[0], centre[1], 0.16, 0.14, tilt)
    snout = _Ellipse(*_add(centre, _rot(tilt, 0.17, -0.035)), 0.12, 0.075, tilt)
    nose = _Ellipse(*_add(centre, _rot(tilt, 0.28, -0.02)), 0.04, 0.04)
    pose.parts += [(head, "head"), (snout, "snout"), (nose, "nose")]
    if appearance.ears == "pointy":
        base = _add(centre, _rot(tilt, -0.04, 0.08))
        ear = _Triangle(_add(base, _rot(tilt, -0.09, 0.0)), _add(base, _rot(tilt, 0.05, 0.02)),
                        _add(base, _rot(tilt, -0.07, 0.17)))
    else:
        ear = _Ellipse(*_add(centre, _rot(tilt, -0.07, 0.0)), 0.055, 0.12, tilt + 0.35)
    pose.parts.append((ear, "ear"))
    eye_at = _add(centre, _rot(tilt, 0.05, 0.045))
    if eye_closed:
        pose.parts.append((_Ellipse(eye_at[0], eye_at[1], 0.06, 0.028, tilt), "eye"))
    else:
        pose.parts.append((_Ellipse(eye_at[0], eye_at[1], 0.048, 0.048), "eye"))
    pose.head = head


def _standing(appearance: Appearance, rng: np.random.Generator) -> _Pose:
    pose = _Pose()
    height = rng.uniform(0.58, 0.66)
    torso = _Ellipse(0.0, height, 0.5, rng.uniform(0.16, 0.19), rng.uniform(-0.05, 0.05))
    r, top = 0.065, height - 0.06
    spread = rng.uniform(-0.04, 0.04, size=4)
    far_front = _Capsule((0.26, top), (0.28 + spread[0], 0.0), r)
    far_hind = _Capsule((-0.40, top), (-0.42 + spread[1], 0.0), r)
    near_front = _Capsule((0.35, top), (0.37 + spread[2], 0.0), r)
    near_hind = _Capsule((-0.31, top), (-0.33 + spread[3], 0.0), r)
    tail_up = rng.uniform(0.5, 1.1)  # radians above the horizontal, pointing back
    tail_base = (-0.46, height + 0.06)
    tail = _Capsule(tail_base, _add(tail_base, (-0.26 * math.cos(tail_up), 0.26 * math.sin(tail_up))), 0.035)
    head_at = (0.62, height + rng.uniform(0.28, 0.36))
    neck = _Capsule((0.38, height + 0.05), (head_at[0] - 0.05, head_at[1] - 0.04), 0.1)
    pose.parts += [(far_front, "far"), (far_hind, "far"), (tail, "body"), (torso, "torso"),
                   (near_front, "body"), (near_hind, "body"), (neck, "body")]
    _head(pose, appearance, head_at, rng.uniform(-0.15, 0.15))
    pose.torso = torso
    return pose


def _sitting(appearance: Appearance, rng: np.random.Generator) -> _Pose:
    pose = _Pose()
    angle = math.radians(rng.uniform(52, 68))
    haunch = _Ellipse(-0.13, 0.2, 0.25, 0.2, rng.uniform(-0.1, 0.1))
    torso = _Ellipse(*_add((-0.15, 0.2), _rot(angle, 0.34, 0.0)), 0.38, 0.16, angle)
    chest = _add((-0.15, 0.2), _rot(angle, 0.6, -0.06))
    r = 0.06
    far_front = _Capsule((chest[0] - 0.06, chest[1] - 0.05), (chest[0] - 0.05, 0.0), r)
    near_front = _Capsule((chest[0] + 0.01, chest[1] - 0.05), (chest[0] + 0.02, 0.0), r)
    paw = _Ellipse(0.02, 0.045, 0.15, 0.05)
    tail = _Capsule((-0.32, 0.06), (-0.32 - rng.uniform(0.22, 0.3), rng.uniform(0.03, 0.12)), 0.035)
    neck_top = _add((-0.15, 0.2), _rot(angle, 0.78, 0.0))
    head_at = (neck_top[0] + 0.07, neck_top[1] + rng.uniform(0.1, 0.16))
    neck = _Capsule(_add((-0.15, 0.2), _rot(angle, 0.55, 0.0)), (head_at[0] - 0.04, head_at[1] - 0.04), 0.1)
    pose.parts += [(far_front, "far"), (tail, "body"), (haunch, "torso"), (torso, "torso"), (paw, "body"),
                   (near_front, "body"), (neck, "body")]
    _head(pose, appearance, head_at, rng.uniform(-0.1, 0.2))
    pose.torso = torso
    return pose


def _sleeping(appearance: Appearance, rng: np.random.Generator) -> _Pose:
    pose = _Pose()
    ry = rng.uniform(0.18, 0.21)
    torso = _Ellipse(0.0, ry, 0.5, ry, rng.uniform(-0.03, 0.03))
    legs_y = 0.045
    front = _Capsule((0.25, legs_y), (rng.uniform(0.7, 0.8), legs_y), 0.05)
    hind = _Ellipse(-0.2, 0.055, 0.22, 0.06)
    tail = _Capsule((-0.45, 0.06), (-0.45 - rng.uniform(0.22, 0.32), rng.uniform(0.025, 0.05)), 0.035)
    pose.parts += [(tail, "body"), (torso, "torso"), (hind, "body"), (front, "body")]
    # the head rests on the front paws, chin down, eye closed
    _head(pose, appearance, (rng.uniform(0.52, 0.58), rng.uniform(0.15, 0.18)), rng.uniform(-0.18, -0.02),
          eye_closed=True)
    pose.torso = torso
    return pose


def _jumping(appearance: Appearance, rng: np.random.Generator) -> _Pose:
    pose = _Pose(grounded=False)
    lift = rng.uniform(0.38, 0.55)
    tilt = rng.uniform(0.15, 0.35)
    centre = (0.0, lift + 0.4)
    torso = _Ellipse(centre[0], centre[1], 0.5, 0.16, tilt)
    r = 0.06
    shoulder = _add(centre, _rot(tilt, 0.32, -0.04))
    hip = _add(centre, _rot(tilt, -0.34, -0.04))
    front_dir, hind_dir = math.radians(rng.uniform(-38, -22)), math.radians(rng.uniform(200, 215))
    length = 0.5

    def leg(start, direction, offset):
        return _Capsule(start, _add(start, _rot(direction + offset, length, 0.0)), r)

    far_front, near_front = leg(shoulder, front_dir, 0.18), leg(shoulder, front_dir, 0.0)
    far_hind, near_hind = leg(hip, hind_dir, -0.18), leg(hip, hind_dir, 0.0)
    tail_base = _add(centre, _rot(tilt, -0.47, 0.04))
    tail = _Capsule(tail_base, _add(tail_base, _rot(rng.uniform(2.5, 2.9), 0.3, 0.0)), 0.035)
    neck_base = _add(centre, _rot(tilt, 0.36, 0.06))
    head_at = _add(centre, _rot(tilt, 0.62, 0.28))
    neck = _Capsule(neck_base, head_at, 0.1)
    pose.parts += [(far_front, "far"), (far_hind, "far"), (tail, "body"), (torso, "torso"),
                   (near_front, "body"), (near_hind, "body"), (neck, "body")]
    _head(pose, appearance, head_at, tilt + rng.uniform(-0.1, 0.1))
    pose.torso = torso
    return pose


_POSES = {"sleeping": _sleeping, "sitting": _sitting, "standing": _standing, "jumping": _jumping}


def _pattern(appearance: Appearance, pose: _Pose, u, v) -> np.ndarray:
    """Pixels (of the local grid u, v) that take the secondary colour, before clipping to the dog."""
    rng = np.random.default_rng(appearance.pattern_seed)
    out = np.zeros(u.shape, dtype=bool)
    if appearance.pattern == "solid":
        return out
    p, q = pose.torso.frame(u, v)
    if appearance.pattern == "spots":
        for _ in range(int(rng.integers(3, 6))):
            radius = rng.uniform(0.5, 0.65)
            angle = rng.uniform(0, 2 * np.pi)
            dist = rng.uniform(0.0, 0.7)
            cp, cq = dist * math.cos(angle), dist * math.sin(angle)
            out |= ((p - cp) / 0.32) ** 2 + (q - cq) ** 2 <= radius ** 2  # round in the dog's units
        hp, hq = pose.head.frame(u, v)
        out |= (hp + 0.25) ** 2 + (hq - 0.4) ** 2 <= rng.uniform(0.2, 0.35) ** 2
    elif appearance.pattern == "stripes":
        bands = rng.uniform(2.5, 3.5)
        phase = rng.uniform(0, 1)
        out |= (np.sin(np.pi * (bands * p + phase)) > 0.25) & (p * p + q * q <= 1.0)
    else:  # patch: a saddle over the back, sometimes one over the eye
        cp, cq = rng.uniform(-0.35, 0.2), rng.uniform(0.35, 0.65)
        out |= ((p - cp) / rng.uniform(0.5, 0.7)) ** 2 + ((q - cq) / rng.uniform(0.6, 0.9)) ** 2 <= 1.0
        if rng.uniform() < 0.6:
            hp, hq = pose.head.frame(u, v)
            out |= (hp - 0.3) ** 2 + (hq - 0.35) ** 2 <= 0.45 ** 2
    return out


# ----------------------------------------------------------------------------------------------
# rooms


def _px(fraction: float, size: int) -> int:
    return int(round(fraction * size))


def _shade(colour, factor: float) -> np.ndarray:
    return np.asarray(colour, dtype=np.float32) * factor


def _draw_furniture(canvas: np.ndarray, item: Furniture, horizon: int, size: int) -> None:
    """Paint one piece of furniture onto the float canvas (in place)."""
    x0 = _px(item.x, size)
    w = max(4, _px(item.width, size))
    h = max(4, _px(item.height, size))
    one = max(1, size // 64)
    main, second = _shade(item.colour, 1.0), _shade(item.colour2, 1.0)
    if item.kind == "window":
        y0 = _px(item.y, size)
        h = min(h, horizon - y0 - 2 * one)
        if h < 4:
            return
        canvas[y0:y0 + h, x0:x0 + w] = main
        canvas[y0 + one:y0 + h - one, x0 + one:x0 + w - one] = second
        glass = canvas[y0 + one:y0 + h - one, x0 + one:x0 + w - one]
        glass += np.linspace(18, -18, glass.shape[0], dtype=np.float32)[:, None, None]
        canvas[y0 + h // 2:y0 + h // 2 + one, x0:x0 + w] = main
        canvas[y0:y0 + h, x0 + w // 2:x0 + w // 2 + one] = main
    elif item.kind == "shelf":
        y0 = _px(item.y, size)
        if y0 + 2 * one >= horizon:
            return
        canvas[y0:y0 + 2 * one, x0:x0 + w] = main
        rng = np.random.default_rng(int(item.x * 1e6) ^ int(item.width * 1e6))
        x = x0 + one
        while x < x0 + w - 2 * one:
            bw = int(rng.integers(1, 3)) * one
            bh = int(rng.integers(3, 7)) * one
            book = np.array(_from_hsv(rng.uniform(0, 360), rng.uniform(0.3, 0.6), rng.uniform(0.35, 0.75)), np.float32)
            canvas[max(0, y0 - bh):y0, x:x + bw] = book
            x += bw + (one if rng.uniform() < 0.3 else 0)
    else:
        base = horizon + max(1, _px(0.04, size))
        top = max(1, base - h)
        if item.kind == "sofa":
            back = top
            seat = top + h // 3
            canvas[back:seat + 1, x0 + one:x0 + w - one] = _shade(item.colour, 0.9)
            canvas[seat:base, x0:x0 + w] = main
            canvas[seat - one:base, x0:x0 + 2 * one] = _shade(item.colour, 0.8)
            canvas[seat - one:base, x0 + w - 2 * one:x0 + w] = _shade(item.colour, 0.8)
            canvas[seat:seat + one, x0 + 2 * one:x0 + w - 2 * one] = _shade(item.colour, 0.75)
            canvas[seat + one:base - 2 * one, x0 + w // 2:x0 + w // 2 + one] = _shade(item.colour, 0.8)
            canvas[base - one:base, x0 + one:x0 + 2 * one] = _DARK
            canvas[base - one:base, x0 + w - 2 * one:x0 + w - one] = _DARK
        elif item.kind == "table":
            top = max(1, base - h * 2 // 3)
            canvas[top:top + 2 * one, x0:x0 + w] = main
            canvas[top + 2 * one:base, x0 + one:x0 + 2 * one] = _shade(item.colour, 0.8)
            canvas[top + 2 * one:base, x0 + w - 2 * one:x0 + w - one] = _shade(item.colour, 0.8)
            vase_w = max(2 * one, w // 5)
            vx = x0 + w // 2 - vase_w // 2
            canvas[max(0, top - 3 * one):top, vx:vx + vase_w] = second
        elif item.kind == "lamp":
            w = max(6 * one, min(w, _px(0.16, size)))
            shade_h = max(3 * one, h // 3)
            cx = x0 + w // 2
            canvas[top + shade_h:base, cx:cx + one] = _DARK
            canvas[base - one:base, cx - 2 * one:cx + 3 * one] = _DARK
            rows = np.arange(top, top + shade_h)
            cols = np.arange(x0, x0 + w)
            half = (w / 2) * (0.55 + 0.45 * (rows - top) / max(1, shade_h - 1))
            inside = np.abs(cols[None, :] + 0.5 - (x0 + w / 2)) <= half[:, None]
            region = canvas[top:top + shade_h, x0:x0 + w]
            region[inside[:region.shape[0], :region.shape[1]]] = second


def _room_canvas(room: Room, size: int) -> np.ndarray:
    """The unlit room as float32 HxWx3 (a function of `room` and `size` only)."""
    rng = np.random.default_rng(room.texture_seed)
    horizon = _px(room.horizon, size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    canvas = np.empty((size, size, 3), dtype=np.float32)
    wall = _shade(room.wall, 1.0)
    period = max(4, int(round(rng.uniform(6, 11) * size / 64 * room.texture_scale)))
    wy, wx = yy[:horizon], xx[:horizon]
    if room.wall_texture == "plain":
        factor = np.ones_like(wy)
    elif room.wall_texture == "stripes":
        factor = np.where((wx // period) % 2 == 0, 1.0, 0.86)
    elif room.wall_texture == "checker":
        factor = np.where(((wx // period) + (wy // period)) % 2 == 0, 1.0, 0.85)
    else:  # gradient: darker towards the ceiling or the floor
        t = wy / max(1, horizon - 1)
        factor = 1.0 - 0.28 * (t if rng.uniform() < 0.5 else 1.0 - t)
    canvas[:horizon] = wall * factor[..., None]
    floor = _shade(room.floor, 1.0)
    fy, fx = yy[horizon:] - horizon + 1.0, xx[horizon:]
    depth = size / 8.0 / fy  # 1/distance: large at the horizon, small at the bottom
    if room.floor_texture == "planks":
        board = np.floor(np.log(fy) * 2.2).astype(np.int64)  # boards get taller towards the viewer
        tint = rng.uniform(0.82, 1.08, size=64)[np.clip(board, 0, 63)]
        seam = np.diff(board, axis=0, prepend=board[:1] - 1) != 0
        offsets = rng.uniform(0, size, size=64)[np.clip(board, 0, 63)]
        joint = ((fx + offsets) % (size * 0.55)) < 1.0 * size / 64
        factor = tint * np.where(seam | joint, 0.7, 1.0)
    elif room.floor_texture == "tiles":
        step = depth / 2.5  # tile widths per pixel across
        across = (fx - size / 2) * step
        along = np.floor(depth * 3.0)
        # grout lines one pixel wide, left out where tiles get narrower than about two pixels
        line_x = (np.abs(across - np.round(across)) < 0.5 * step) & (step < 0.45)
        line_y = (np.diff(along, axis=0, append=along[-1:] - 1) != 0) & (depth * 3.0 / fy < 0.34)
        checker = ((np.floor(across) + along) % 2 == 0) | (step >= 0.45)
        factor = np.where(line_x | line_y, 0.72, 1.0) * np.where(checker, 1.0, 0.94)
    else:  # carpet: blotchy low-frequency noise plus a fine pile
        cells = max(2, size // 8)
        coarse = rng.uniform(0.85, 1.12, size=(cells, cells)).astype(np.float32)
        coarse = np.kron(coarse, np.ones((size // cells + 1, size // cells + 1), np.float32))[:size - horizon, :size]
        factor = coarse * rng.uniform(0.92, 1.06, size=fy.shape)
    canvas[horizon:] = floor * factor[..., None]
    canvas[horizon:horizon + max(1, size // 64)] = _shade(room.wall, 0.62)  # skirting board
    for item in room.furniture:
        _draw_furniture(canvas, item, horizon, size)
    return canvas


def _lighting(room: Room, size: int) -> np.ndarray:
    x = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    return (room.brightness * (1.0 + room.light_gradient * x))[None, :, None].astype(np.float32)


@functools.lru_cache(maxsize=32)
def _cached_room(room: Room, size: int) -> tuple[np.ndarray, np.ndarray]:
    canvas = _room_canvas(room, size)
    light = _lighting(room, size)
    image = np.clip(np.rint(canvas * light), 0, 255).astype(np.uint8)
    canvas.flags.writeable = False
    image.flags.writeable = False
    return canvas, image


def render_room(room: Room, size: int = SIZE) -> np.ndarray:
    """The room alone, lit, as HxWx3 uint8: what `render` shows everywhere outside the dog's mask."""
    return _cached_room(room, size)[1].copy()


# ----------------------------------------------------------------------------------------------
# rendering a sample


def _role_colours(appearance: Appearance) -> dict[str, np.ndarray]:
    body = np.asarray(appearance.body, dtype=np.float32)
    secondary = np.asarray(appearance.secondary, dtype=np.float32)
    ear = secondary if appearance.pattern != "solid" else body * 0.72
    return {"torso": body, "head": body, "body": body, "snout": body, "far": body * 0.78, "ear": ear,
            "nose": _DARK, "eye": _DARK}


def render(appearance: Appearance, room: Room, state: str, rng: np.random.Generator, size: int = SIZE) -> Sample:
    """Draw the dog in `state` into `room`; pose jitter (placement, scale, facing, tilt, the pose's own
    angles) comes from `rng`, which the room never touches."""
    if state not in STATES:
        raise ValueError(f"state {state!r} is not one of {STATES}")
    pose = _POSES[state](appearance, rng)
    facing = 1.0 if rng.uniform() < 0.5 else -1.0
    tilt = rng.uniform(-0.07, 0.07)
    depth = rng.uniform()
    horizon = room.horizon * size
    feet = horizon + 3 * size / 64 + depth * (size - 2 * size / 64 - horizon - 3 * size / 64)
    scale = size * 0.31 * appearance.size_scale * (0.82 + 0.3 * depth)

    # extent of the dog in pixels, per unit of scale, around the origin (the floor under the dog)
    xs, ys = (np.concatenate(parts) for parts in zip(*(prim.outline() for prim, _ in pose.parts)))
    c, s = math.cos(tilt), math.sin(tilt)
    px, py = facing * (xs * c - ys * s), -(xs * s + ys * c)
    x_lo, x_hi, y_lo, y_hi = px.min(), px.max(), py.min(), py.max()
    margin = 1.5 * size / 64
    height = (y_hi if pose.grounded else 0.0) - y_lo  # feet (or the floor under a jump) to the top
    scale = min(scale, (size - 2 * margin) / (x_hi - x_lo), (feet - margin) / max(1e-6, height))
    ty = feet - (y_hi * scale if pose.grounded else 0.0)
    lo, hi = margin - x_lo * scale, size - margin - x_hi * scale
    tx = rng.uniform(lo, max(lo, hi))  # hi < lo only by rounding, when the width is what limits the scale

    # the dog's window of pixels, and the local coordinates of their centres
    r0, r1 = max(0, int(math.floor(ty + y_lo * scale)) - 1), min(size, int(math.ceil(ty + y_hi * scale)) + 2)
    c0, c1 = max(0, int(math.floor(tx + x_lo * scale)) - 1), min(size, int(math.ceil(tx + x_hi * scale)) + 2)
    rows, cols = np.mgrid[r0:r1, c0:c1].astype(np.float64) + 0.5
    a, b = facing * (cols - tx) / scale, -(rows - ty) / scale
    u, v = a * c + b * s, -a * s + b * c

    canvas, room_image = _cached_room(room, size)
    window = canvas[r0:r1, c0:c1].copy()
    colours = _role_colours(appearance)
    painted = np.zeros(u.shape, dtype=bool)
    marks = _pattern(appearance, pose, u, v)
    secondary = np.asarray(appearance.secondary, dtype=np.float32)
    for prim, role in pose.parts:
        inside = prim.inside(u, v)
        window[inside] = colours[role]
        if role in ("torso", "head"):
            window[inside & marks] = secondary
        painted |= inside

    image = room_image.copy()
    lit = np.clip(np.rint(window * _lighting(room, size)[:, c0:c1]), 0, 255).astype(np.uint8)
    same = painted & np.all(lit == room_image[r0:r1, c0:c1], axis=-1)
    if same.any():  # the dog's colour equals the room's here: move it one level, so it shows
        lit[same, 0] = np.where(lit[same, 0] < 255, lit[same, 0] + 1, 254)
    image[r0:r1, c0:c1][painted] = lit[painted]
    mask = np.zeros((size, size), dtype=bool)
    mask[r0:r1, c0:c1] = painted
    return Sample(image=image, mask=mask, state=state, caption=caption_for(appearance, room, state),
                  appearance=appearance, room=room)


# ----------------------------------------------------------------------------------------------
# the public distribution


def _appearance(rng: np.random.Generator, body_colours: dict, secondary_colours: dict) -> Appearance:
    body_word = str(rng.choice(sorted(body_colours)))
    body = _draw_colour(body_colours[body_word], rng)
    candidates = [w for w in sorted(secondary_colours) if w != body_word
                  and abs(np.mean(secondary_colours[w][2]) - np.mean(body_colours[body_word][2])) >= 0.25]
    secondary_word = str(rng.choice(candidates))
    secondary = _draw_colour(secondary_colours[secondary_word], rng)
    return Appearance(body=body, secondary=secondary, pattern=str(rng.choice(PATTERNS)),
                      size_scale=float(rng.uniform(0.88, 1.12)), body_word=body_word, secondary_word=secondary_word,
                      ears=str(rng.choice(["floppy", "pointy"])), pattern_seed=int(rng.integers(2**31)))


def public_appearance(rng: np.random.Generator) -> Appearance:
    """A dog from the public range: natural coat colours, any pattern."""
    return _appearance(rng, PUBLIC_DOG_COLOURS, PUBLIC_DOG_COLOURS)


def _furniture(rng: np.random.Generator, horizon: float, vivid: bool) -> tuple[Furniture, ...]:
    kinds = rng.choice(FURNITURE, size=int(rng.integers(1, 4)), replace=False)
    slot = 1.0 / len(kinds)
    items = []
    saturation = (0.45, 0.75) if vivid else (0.15, 0.45)
    for i, kind in enumerate(kinds):
        kind = str(kind)
        width = {"sofa": (0.3, 0.42), "table": (0.2, 0.3), "window": (0.16, 0.26), "lamp": (0.1, 0.14),
                 "shelf": (0.18, 0.28)}[kind]
        w = min(rng.uniform(*width), slot * 0.95)
        x = i * slot + rng.uniform(0, max(0.0, slot - w))
        colour = _from_hsv(rng.uniform(0, 360), rng.uniform(*saturation), rng.uniform(0.35, 0.7))
        if kind == "window":
            frame, glass = _from_hsv(40, 0.05, 0.95), _from_hsv(rng.uniform(195, 215), rng.uniform(0.2, 0.45), 0.9)
            items.append(Furniture(kind, x, w, rng.uniform(0.25, 0.35), frame, glass, y=rng.uniform(0.06, 0.12)))
        elif kind == "shelf":
            wood = _from_hsv(rng.uniform(20, 35), 0.5, rng.uniform(0.3, 0.5))
            items.append(Furniture(kind, x, w, 0.1, wood, wood, y=rng.uniform(0.45, 0.75) * horizon))
        elif kind == "table":
            wood = _from_hsv(rng.uniform(20, 35), rng.uniform(0.4, 0.6), rng.uniform(0.3, 0.55))
            items.append(Furniture(kind, x, w, rng.uniform(0.2, 0.28), wood, colour))
        elif kind == "lamp":
            shade = _from_hsv(rng.uniform(35, 50), rng.uniform(0.1, 0.3), 0.92)
            items.append(Furniture(kind, x, w, rng.uniform(0.4, 0.5), (22, 18, 18), shade))
        else:
            items.append(Furniture(kind, x, w, rng.uniform(0.2, 0.27), colour, colour))
    return tuple(items)


def _room(rng: np.random.Generator, walls: dict, floor_colour, vivid: bool) -> Room:
    wall_word = str(rng.choice(sorted(walls)))
    wall = _draw_colour(walls[wall_word], rng)
    wall_texture = str(rng.choice(WALL_TEXTURES))
    floor_texture = str(rng.choice(FLOOR_TEXTURES))
    horizon = float(rng.uniform(0.36, 0.52))
    return Room(wall=wall, wall_texture=wall_texture, floor=floor_colour(floor_texture), floor_texture=floor_texture,
                horizon=horizon, furniture=_furniture(rng, horizon, vivid), brightness=float(rng.uniform(0.85, 1.12)),
                light_gradient=float(rng.uniform(-0.2, 0.2)), texture_seed=int(rng.integers(2**31)),
                wall_word=wall_word, texture_scale=float(rng.uniform(0.8, 1.25)))


def public_room(rng: np.random.Generator) -> Room:
    """A public room: muted walls, wooden/grey/beige floors, 1-3 pieces of furniture."""
    return _room(rng, PUBLIC_WALLS, lambda texture: _draw_colour(PUBLIC_FLOORS[texture], rng), vivid=False)


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


MIN_CONTRAST = 60.0  # RGB distance between a dog's coat and its room's wall and floor colours


def contrast(appearance: Appearance, room: Room) -> float:
    """RGB distance from the dog's coat to the nearer of its room's wall and floor colours."""
    body = np.asarray(appearance.body, dtype=np.float64)
    return float(min(np.linalg.norm(body - np.asarray(room.wall)), np.linalg.norm(body - np.asarray(room.floor))))


def _visible(draw, rng: np.random.Generator, room: Room) -> Appearance:
    """Draw appearances until one stands out from the room (a grey dog on a grey wall is redrawn)."""
    for _ in range(100):
        appearance = draw(rng)
        if contrast(appearance, room) >= MIN_CONTRAST:
            return appearance
    return appearance


def public_corpus(n: int, seed: int = 0, size: int = SIZE) -> list[Sample]:
    """`n` public samples, states round-robin (balanced), deterministic by seed; sample i uses
    generators keyed by (seed, i), so a shorter corpus is a prefix of a longer one."""
    samples = []
    for i in range(n):
        room = public_room(_rng(_PUBLIC_KEY, seed, i, _ROOM))
        appearance = _visible(public_appearance, _rng(_PUBLIC_KEY, seed, i, _APPEARANCE), room)
        samples.append(render(appearance, room, STATES[i % len(STATES)], _rng(_PUBLIC_KEY, seed, i, _POSE), size))
    return samples


# ----------------------------------------------------------------------------------------------
# users


@dataclass(frozen=True)
class User:
    """One SpinBench user: a dog and a room outside the public range, both fixed by the seed."""

    seed: int
    appearance: Appearance
    room: Room


def user_appearance(rng: np.random.Generator) -> Appearance:
    """A dog with a saturated coat hue that no public dog has; markings white, cream or black."""
    return _appearance(rng, USER_DOG_COLOURS, USER_SECONDARY_COLOURS)


def user_room(rng: np.random.Generator) -> Room:
    """A room with a vivid wall colour and a coloured floor, unlike any public room."""
    def floor(_texture):
        lo, hi = USER_FLOOR_HUES[int(rng.integers(len(USER_FLOOR_HUES)))]
        return _from_hsv(rng.uniform(lo, hi), rng.uniform(0.45, 0.65), rng.uniform(0.45, 0.7))

    return _room(rng, USER_WALLS, floor, vivid=True)


def make_user(user_seed: int) -> User:
    """The user with this seed (any int >= 0): same seed, same user."""
    if user_seed < 0:
        raise ValueError(f"user_seed must be >= 0, got {user_seed}")
    room = user_room(_rng(_USER_KEY, user_seed, _ROOM))
    return User(seed=user_seed, appearance=_visible(user_appearance, _rng(_USER_KEY, user_seed, _APPEARANCE), room),
                room=room)


def user_samples(user: User, per_state: int, split: str, size: int = SIZE) -> list[Sample]:
    """`per_state` images of the user's dog in each state, in the user's room (k-th of every state,
    then the next k). `split` is 'references' or 'test': the two use disjoint generators."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {sorted(SPLITS)}")
    return [render(user.appearance, user.room, state, _rng(_USER_KEY, user.seed, _POSE, SPLITS[split], si, k), size)
            for k in range(per_state) for si, state in enumerate(STATES)]


# ----------------------------------------------------------------------------------------------
# a request folder for `spinml run`

DEFAULT_PRIVACY = {"target": "L1", "background": "L0"}
DEFAULT_SYNTHESIS = {"images_per_label": 16, "resolution": 64, "steps": 20, "guidance": 3.0,
                     "scheduler": "dpmsolver++", "seed": 0}
# ResNet-18 from scratch: trained on 64 images of a user's own world per state it scores 1.00 on their test
# set at 64 px, where MobileNetV2 from scratch scores 0.55 (its 32x downsampling leaves 2x2 features).
# From scratch ("pretrained: none"), as the baselines train: the benchmark's figures must not depend on
# whether a node has ImageNet weights in its cache.
DEFAULT_TRAINING = {"architecture": "resnet18", "image_size": 64, "epochs": 15, "batch_size": 32,
                    "learning_rate": 1e-3, "pretrained": "none"}


def _save_png(array: np.ndarray, path: str) -> None:
    from PIL import Image

    Image.fromarray(array).save(path, format="PNG")


def request_document(user: User, references: list[dict], privacy: dict | None = None,
                     synthesis: dict | None = None, training: dict | None = None) -> dict:
    """The request for `user` (fields given in privacy/synthesis/training override the defaults)."""
    return {
        "request_id": f"spinbench-user-{user.seed}",
        "tenant": "spinbench",
        "task": "classification",
        "subject": SUBJECT,
        "labels": [{"name": state, "phrase": STATE_PHRASES[state]} for state in STATES],
        "references": references,
        "privacy": {**DEFAULT_PRIVACY, **(privacy or {})},
        "synthesis": {**DEFAULT_SYNTHESIS, **(synthesis or {})},
        "training": {**DEFAULT_TRAINING, **(training or {})},
        "test_set": "test_set",
    }


def write_user_request(user_seed: int, out_dir: str, references_per_state: int = 4, test_per_state: int = 25,
                       privacy: dict | None = None, synthesis: dict | None = None,
                       training: dict | None = None) -> str:
    """Write user `user_seed`'s request folder (request.yaml, references/*.png, masks/*.png (0/255),
    test_set/<state>/*.png, spinbench_user.json) and return the request file's path.

    privacy, synthesis and training override single fields of the defaults. The document is
    validated before anything is written and the written file is read back with `load_request`;
    a file that does not load is removed and the error raised.
    """
    import yaml

    from spinml_ray.spec import SpecError, load_request, parse_request

    if references_per_state < 1:
        raise ValueError(f"references_per_state must be >= 1, got {references_per_state}")
    if test_per_state < 0:
        raise ValueError(f"test_per_state must be >= 0, got {test_per_state}")
    user = make_user(user_seed)
    references = []
    for k in range(references_per_state):
        for state in STATES:
            name = f"{state}-{k}"
            references.append({"uri": f"references/{name}.png", "label": state, "mask_uri": f"masks/{name}.png"})
    document = request_document(user, references, privacy, synthesis, training)
    parse_request(document, source=f"spinbench user {user_seed}")  # a bad override fails before any write

    for sub in ["references", "masks"] + [os.path.join("test_set", state) for state in STATES]:
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    for sample, ref in zip(user_samples(user, references_per_state, "references"), references):
        _save_png(sample.image, os.path.join(out_dir, ref["uri"]))
        _save_png(sample.mask.astype(np.uint8) * 255, os.path.join(out_dir, ref["mask_uri"]))
    for i, sample in enumerate(user_samples(user, test_per_state, "test")):
        _save_png(sample.image, os.path.join(out_dir, "test_set", sample.state, f"{i // len(STATES)}.png"))
    with open(os.path.join(out_dir, "spinbench_user.json"), "w") as handle:
        json.dump({"seed": user.seed, "appearance": asdict(user.appearance), "room": asdict(user.room),
                   "captions": {state: caption_for(user.appearance, user.room, state) for state in STATES}},
                  handle, indent=1)
    path = os.path.join(out_dir, "request.yaml")
    with open(path, "w") as handle:
        handle.write(f"# SpinBench user {user_seed}: {user.appearance.words} dog in a {user.room.words} room "
                     "(written by `spinml spinbench world`).\n")
        yaml.safe_dump(document, handle, sort_keys=False)
    try:
        spec = load_request(path)
    except SpecError:
        os.remove(path)
        raise
    if len(spec.references) != len(references):
        os.remove(path)
        raise SpecError(f"{path}: {len(spec.references)} references read back, {len(references)} written")
    return path


def contact_sheet(images: list[np.ndarray], columns: int, scale: int = 2, gap: int = 2) -> np.ndarray:
    """Images (HxWx3 uint8, or HxW masks/edges) in a grid, enlarged `scale` times: for looking at."""
    tiles = [np.repeat(img[..., None], 3, -1) if img.ndim == 2 else img for img in images]
    tiles = [(t.astype(np.uint8) * 255 if t.dtype == bool else t) for t in tiles]
    tiles = [np.kron(t, np.ones((scale, scale, 1), dtype=np.uint8)) for t in tiles]
    h, w = tiles[0].shape[:2]
    rows = -(-len(tiles) // columns)
    sheet = np.full((rows * (h + gap) + gap, columns * (w + gap) + gap, 3), 255, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        sheet[gap + r * (h + gap):gap + r * (h + gap) + h, gap + c * (w + gap):gap + c * (w + gap) + w] = tile
    return sheet

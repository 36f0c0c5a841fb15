"""The demo video world: shapes that appear, move, change colour and disappear.

A scene is drawn from a seed, lives in continuous time t in [0, 1] on a unit canvas, and is
rendered at any frame count and resolution, so one scene can be a 256- or a 25,000-token video.
Everything said about a scene (captions, questions, answers) comes from its event log here.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import numpy as np

KINDS = ("square", "circle", "triangle", "cross")
COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "purple": (170, 60, 230),
    "cyan": (40, 220, 230),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
}
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
BACKGROUND = (24, 24, 24)

SIZE = 0.25  # shape side as a fraction of the canvas
MIN_GAP = 0.1  # between two appearance times, so "which appears first" is visible in frames


@dataclass
class Shape:
    kind: str
    colour: str
    direction: str
    appear: float
    start: tuple[float, float]  # centre at `appear`, unit canvas coordinates
    speed: float  # canvas units per unit time
    disappear: float | None = None  # None: visible until the end
    new_colour: str | None = None
    change_at: float | None = None

    @property
    def end(self) -> float:
        return 1.0 if self.disappear is None else self.disappear

    def centre(self, t: float) -> tuple[float, float]:
        dx, dy = DIRECTIONS[self.direction]
        d = self.speed * (t - self.appear)
        return self.start[0] + dx * d, self.start[1] + dy * d

    def colour_at(self, t: float) -> str:
        if self.change_at is not None and t >= self.change_at:
            return self.new_colour
        return self.colour

    def visible(self, t: float) -> bool:
        return self.appear <= t < self.end

    @property
    def final_colour(self) -> str:
        return self.new_colour if self.new_colour is not None else self.colour


@dataclass
class Scene:
    seed: int
    shapes: list[Shape] = field(default_factory=list)  # sorted by appearance time

    def to_json(self) -> dict:
        return {"seed": self.seed, "shapes": [dataclasses.asdict(s) for s in self.shapes]}

    @classmethod
    def from_json(cls, d: dict) -> "Scene":
        shapes = [Shape(**{**s, "start": tuple(s["start"])}) for s in d["shapes"]]
        return cls(seed=d["seed"], shapes=shapes)

    def dumps(self) -> str:
        return json.dumps(self.to_json())


def _overlaps(a: Shape, b: Shape) -> bool:
    """True if the two shapes' boxes ever overlap while both are on screen (checked at 12 times)."""
    lo, hi = max(a.appear, b.appear), min(a.end, b.end)
    if lo >= hi:
        return False
    step = (hi - lo) / 11
    for i in range(12):
        t = hi if i == 11 else lo + i * step  # np.linspace(lo, hi, 12) to the bit, without its cost
        (ax, ay), (bx, by) = a.centre(t), b.centre(t)
        if abs(ax - bx) < SIZE * 1.15 and abs(ay - by) < SIZE * 1.15:
            return True
    return False


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    """`rng.choice(options)` (the same draw from the stream) without its array conversion, a tenth of
    scene drawing."""
    return options[int(rng.integers(len(options)))]


def _draw_shape(rng: np.random.Generator, kind: str, appear: float, others: list[Shape]) -> Shape | None:
    for _ in range(50):
        direction = _pick(rng, list(DIRECTIONS))
        disappear = None
        if rng.random() < 0.4:
            disappear = float(rng.uniform(appear + 0.35, 0.97)) if appear + 0.35 < 0.97 else None
        end = 1.0 if disappear is None else disappear
        travel = float(rng.uniform(0.22, 0.35))
        speed = travel / (end - appear)
        dx, dy = DIRECTIONS[direction]
        half = SIZE / 2 + 0.02
        # choose the start so that the whole path stays inside the canvas
        xs = (half - min(0.0, dx * travel), 1 - half - max(0.0, dx * travel))
        ys = (half - min(0.0, dy * travel), 1 - half - max(0.0, dy * travel))
        start = (float(rng.uniform(*xs)), float(rng.uniform(*ys)))
        colour = _pick(rng, list(COLOURS))
        new_colour = change_at = None
        if rng.random() < 0.5:
            new_colour = _pick(rng, [c for c in COLOURS if c != colour])
            change_at = float(rng.uniform(appear + 0.12, end - 0.12))
        shape = Shape(kind, colour, direction, appear, start, speed, disappear, new_colour, change_at)
        if not any(_overlaps(shape, o) for o in others):
            return shape
    return None


def make_scene(seed: int, n_shapes: int | None = None) -> Scene:
    """Draw a scene from a seed: 1-4 shapes of distinct kinds, appearing in a clear order."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 5)) if n_shapes is None else n_shapes
    if not 1 <= n <= len(KINDS):
        raise ValueError(f"n_shapes must be in 1..{len(KINDS)}, got {n}")
    kinds = [str(k) for k in rng.permutation(KINDS)[:n]]
    # appearance times: the first at 0, the others spaced at least MIN_GAP apart before 0.55
    times = [0.0]
    while len(times) < n:
        t = float(rng.uniform(MIN_GAP, 0.55))
        if all(abs(t - u) >= MIN_GAP for u in times):
            times.append(t)
    times.sort()
    while True:  # redraw the whole layout when a shape finds no free path
        shapes: list[Shape] = []
        for kind, t in zip(kinds, times):
            shape = _draw_shape(rng, kind, t, shapes)
            if shape is None:
                break
            shapes.append(shape)
        if len(shapes) == n:
            return Scene(seed=seed, shapes=shapes)


def _mask(kind: str, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    u, v = xx - cx, yy - cy
    if kind == "square":
        return (np.abs(u) <= r) & (np.abs(v) <= r)
    if kind == "circle":
        return u * u + v * v <= r * r
    if kind == "triangle":  # apex up
        return (v <= r) & (v >= -r) & (np.abs(u) <= (v + r) / 2)
    if kind == "cross":
        arm = r / 3
        return ((np.abs(u) <= arm) & (np.abs(v) <= r)) | ((np.abs(v) <= arm) & (np.abs(u) <= r))
    raise ValueError(f"unknown shape kind {kind!r}")


def _painted(scene: Scene, num_frames: int, height: int, width: int, frames=None):
    """Yield (output index, time, shape, pixel mask) in painting order (later shapes lie on top), for
    the frames of index `frames` (default all) of a `num_frames` video."""
    if num_frames < 1 or height < 16 or width < 16:
        raise ValueError(f"need at least 1 frame of 16x16 pixels, got {num_frames}x{height}x{width}")
    scale = min(height, width)  # keep shapes square on non-square canvases
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    xx = (xx + 0.5) / scale
    yy = (yy + 0.5) / scale
    for j, i in enumerate(range(num_frames) if frames is None else frames):
        t = (i + 0.5) / num_frames
        for s in scene.shapes:
            if s.visible(t):
                cx, cy = s.centre(t)
                yield j, t, s, _mask(s.kind, xx, yy, cx * width / scale, cy * height / scale, SIZE / 2)


def render(scene: Scene, num_frames: int, height: int, width: int) -> np.ndarray:
    """Render the scene to uint8 frames `[N, H, W, 3]`, frame i showing time (i + 0.5) / N."""
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)  # [N, H, W, 3]
    frames[:] = BACKGROUND
    for i, t, s, m in _painted(scene, num_frames, height, width):
        frames[i][m] = COLOURS[s.colour_at(t)]
    return frames


NUM_OBJECT_CLASSES = 1 + len(KINDS) * len(COLOURS)


def object_classes(scene: Scene, num_frames: int, height: int, width: int, frames=None) -> np.ndarray:
    """What each pixel shows, `[N, H, W]` uint8: 0 background, else 1 + kind * 8 + colour; only the
    frames of index `frames` (default all) of a `num_frames` video."""
    frames = range(num_frames) if frames is None else frames
    out = np.zeros((len(frames), height, width), dtype=np.uint8)  # [len(frames), H, W]
    colours = list(COLOURS)
    for i, t, s, m in _painted(scene, num_frames, height, width, frames):
        out[i][m] = 1 + KINDS.index(s.kind) * len(COLOURS) + colours.index(s.colour_at(t))
    return out


def blank_like(frames: np.ndarray) -> np.ndarray:
    """Frames of the same shape with nothing on them (the 'does the model read the video' check)."""
    out = np.empty_like(frames)
    out[:] = BACKGROUND
    return out


def frames_for_visual_tokens(n_tokens: int) -> tuple[int, int]:
    """(num_frames, side) so a square video has about `n_tokens` visual tokens for the demo target.

    One visual token covers a 16x16 pixel cell over 2 frames (patch 8, spatial merge 2, temporal
    patch 2). Short videos keep 64 px and grow in time; long ones grow the resolution too.
    """
    if n_tokens < 16:
        raise ValueError(f"visual token count must be at least 16, got {n_tokens}")
    side = 64 if n_tokens <= 2048 else 128 if n_tokens <= 8192 else 256
    per_slice = (side // 16) ** 2
    slices = max(1, round(n_tokens / per_slice))
    return 2 * slices, side

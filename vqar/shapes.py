"""`shapes`: a captioned data set that ships with vqar, and how well a text prior follows its prompts.

Each 32 px image shows one or two filled shapes of one colour in one half of a dark canvas, and
its caption names the colour, the shape, the half and the count, in varied phrasings ("two blue
squares at the top", "On the left side: a red circle"). Everything follows from the image's index
and a seed. Some colour-shape pairs never appear in the training set (`HELD_OUT`): prompts that
combine them measure compositional generalisation, apart from the seen ones.

`detect` reads the four attributes back from pixels, deterministically: the colour nearest to
the shapes' median colour, the half their centre of mass lies in, the count of connected
components, and the shape from how much of its bounding box the largest component fills. Its
accuracy on real images is the ceiling of a prior's (`prompt_following`), in the spirit of GenEval.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import datasets
import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

SIZE = 32
SUPERSAMPLE = 4  # drawn at 4x and reduced: soft edges, as a photographed shape has
BACKGROUND = (24, 24, 28)
COLOURS = {
    "red": (220, 45, 40),
    "green": (45, 185, 65),
    "blue": (50, 95, 235),
    "yellow": (235, 210, 45),
    "purple": (155, 65, 205),
    "white": (235, 235, 235),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom")
COUNTS = (1, 2)
ATTRIBUTES = ("colour", "shape", "position", "count")
# never in the training set: each colour misses one shape, each shape two colours
HELD_OUT = frozenset(
    {("red", "triangle"), ("green", "circle"), ("blue", "square"), ("yellow", "triangle"), ("purple", "circle"),
     ("white", "square")}
)  # fmt: skip
DEFAULT_COUNT = 6000

PLACES = {
    "left": ("on the left", "at the left", "to the left", "in the left half", "on the left side"),
    "right": ("on the right", "at the right", "to the right", "in the right half", "on the right side"),
    "top": ("at the top", "on top", "in the top half", "near the top", "up top"),
    "bottom": ("at the bottom", "in the bottom half", "near the bottom", "down below", "along the bottom"),
}
NUMBERS = {1: ("a", "one", "a single"), 2: ("two", "a pair of", "two")}
TEMPLATES = (
    "{number} {colour} {shape} {place}",
    "{Place}, {number} {colour} {shape}",
    "{number} {shape} in {colour} {place}",
    "there {is_are} {number} {colour} {shape} {place}",
    "{Place}: {number} {colour} {shape}",
    "{colour} {shape}, {count_word}, {place}",
)


@dataclass(frozen=True)
class Scene:
    """What one image shows."""

    colour: str
    shape: str
    position: str
    count: int

    @property
    def held_out(self) -> bool:
        return (self.colour, self.shape) in HELD_OUT

    def canonical_prompt(self) -> str:
        """The plainest caption: "a red circle on the left", "two red circles on the left"."""
        shape = self.shape + ("s" if self.count > 1 else "")
        return f"{'a' if self.count == 1 else 'two'} {self.colour} {shape} {PLACES[self.position][0]}"

    def caption(self, rng: np.random.Generator) -> str:
        place = PLACES[self.position][rng.integers(len(PLACES[self.position]))]
        template = TEMPLATES[rng.integers(len(TEMPLATES))]
        words = {
            "number": NUMBERS[self.count][rng.integers(len(NUMBERS[self.count]))],
            "colour": self.colour,
            "shape": self.shape + ("s" if self.count > 1 else ""),
            "place": place,
            "Place": place[0].upper() + place[1:],
            "is_are": "is" if self.count == 1 else "are",
            "count_word": "just one" if self.count == 1 else "two of them",
        }
        return template.format(**words)


def all_scenes(held_out: bool | None = None) -> list[Scene]:
    """Every combination of the attributes; `held_out` True/False: only those (not) held out of training."""
    scenes = [Scene(*combo) for combo in itertools.product(COLOURS, SHAPES, POSITIONS, COUNTS)]
    return [s for s in scenes if held_out is None or s.held_out == held_out]


def render(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """The scene at SIZE px: its shapes at random places within its half (two share the half's long
    side, a part each), 2 px clear of its edges, their size jittered."""
    big = SIZE * SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(image)
    tall = scene.position in ("left", "right")
    x0 = big // 2 if scene.position == "right" else 0
    y0 = big // 2 if scene.position == "bottom" else 0
    long, short = big, big // 2
    side = (rng.uniform(0.55, 0.7) if scene.count == 1 else rng.uniform(0.5, 0.6)) * short
    margin = side / 2 + 2 * SUPERSAMPLE
    span = long / scene.count
    # a single shape keeps to the middle third of its half's long side, so that the half is never in doubt
    slack = span / 6 if scene.count == 1 else span / 2 - margin
    for k in range(scene.count):
        along = k * span + span / 2 + rng.uniform(-slack, slack)
        across = rng.uniform(margin, short - margin)
        cx, cy = (x0 + across, y0 + along) if tall else (x0 + along, y0 + across)
        _draw(draw, scene.shape, cx, cy, side, COLOURS[scene.colour])
    return image.resize((SIZE, SIZE), Image.Resampling.BOX)


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, side: float, colour) -> None:
    r = side / 2
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=colour)


@functools.cache
def shapes_dataset(count: int = DEFAULT_COUNT, seed: int = 0, held_out: bool = False) -> datasets.Dataset:
    """`count` images with captions and their attributes (`colour`, `shape`, `position`, `count`),
    the same for the same seed; the scenes cycle through every combination not held out (held_out
    True: only held-out ones, for evaluation)."""
    scenes = all_scenes(held_out=held_out)
    order = np.random.default_rng(seed).permutation(len(scenes))
    rows = {"image": [], "caption": [], **{a: [] for a in ATTRIBUTES}}
    for i in range(count):
        scene = scenes[order[i % len(scenes)]]
        rng = np.random.default_rng([seed, i])
        rows["image"].append(render(scene, rng))
        rows["caption"].append(scene.caption(rng))
        for attribute in ATTRIBUTES:
            rows[attribute].append(getattr(scene, attribute))
    features = datasets.Features(
        {"image": datasets.Image(), "caption": datasets.Value("string"), "colour": datasets.Value("string"),
         "shape": datasets.Value("string"), "position": datasets.Value("string"), "count": datasets.Value("int64")}
    )  # fmt: skip
    return datasets.Dataset.from_dict(rows, features=features)


# -- reading the attributes back ----------------------------------------------------------------

FOREGROUND = 70.0  # colour distance from the background beyond which a pixel belongs to a shape
CORE = 0.8  # the share of that distance at which a pixel is taken as the shape's own colour


def detect(images: Tensor) -> list[dict]:
    """Images [B, 3, H, W] in [-1, 1] -> each one's {"colour", "shape", "position", "count"} as read
    from its pixels (None where nothing stands out from the background)."""
    from scipy import ndimage

    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 1).numpy()
    palette = np.array(list(COLOURS.values()), dtype=np.float64)
    distance = np.linalg.norm(pixels - np.array(BACKGROUND), axis=-1)  # [B, H, W]
    found = []
    for image, far in zip(pixels, distance):
        mask = far > FOREGROUND
        components, n = ndimage.label(mask)
        sizes = np.bincount(components.ravel(), minlength=n + 1)[1:]
        kept = np.flatnonzero(sizes >= 6) + 1  # specks of a few pixels are noise
        if len(kept) == 0:
            found.append(dict.fromkeys(ATTRIBUTES))
            continue
        core = far > CORE * far[mask].max()
        colour = np.median(image[core], axis=0)
        largest = components == kept[np.argmax(sizes[kept - 1])]
        ys, xs = np.nonzero(largest)
        coverage = np.clip(far[largest] / far[core].mean(), 0, 1)  # soft edges count by the share they cover
        fill = coverage.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
        cy, cx = np.nonzero(np.isin(components, kept))
        dx, dy = cx.mean() - (image.shape[1] - 1) / 2, cy.mean() - (image.shape[0] - 1) / 2
        found.append(
            {
                "colour": list(COLOURS)[int(np.argmin(np.linalg.norm(palette - colour, axis=1)))],
                "shape": "square" if fill > 0.8 else "circle" if fill > 0.59 else "triangle",
                "position": ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("bottom" if dy > 0 else "top"),
                "count": len(kept),
            }
        )
    return found


def accuracy(found: list[dict], scenes: list[Scene]) -> dict[str, float]:
    """The share of images whose detected attribute is the scene's, per attribute, and for all four at once."""
    hits = {a: np.mean([f[a] == getattr(s, a) for f, s in zip(found, scenes)]) for a in ATTRIBUTES}
    hits["all"] = np.mean([all(f[a] == getattr(s, a) for a in ATTRIBUTES) for f, s in zip(found, scenes)])
    return {k: float(v) for k, v in hits.items()}


CHANCE = {"colour": 1 / len(COLOURS), "shape": 1 / len(SHAPES), "position": 1 / len(POSITIONS), "count": 1 / 2}


# -- prompt following ---------------------------------------------------------------------------

PROMPT_CFG_SCALES = (0.0, 1.0, 2.0, 4.0)  # 0: unconditional (the empty caption), the chance line


def evaluation_scenes(held_out: bool, count: int) -> list[Scene]:
    """`count` scenes cycling through the seen (or held-out) combinations in a fixed order."""
    scenes = all_scenes(held_out=held_out)
    return [scenes[i % len(scenes)] for i in range(count)]


def detector_ceiling(scenes: list[Scene], seed: int = 0) -> dict[str, float]:
    """The detector's accuracy on real renders of `scenes`: the best a prior can score."""
    images = [render(scene, np.random.default_rng([seed, 10_000 + i])) for i, scene in enumerate(scenes)]
    pixels = torch.from_numpy(np.stack([np.asarray(image) for image in images])).permute(0, 3, 1, 2)
    return accuracy(detect(pixels.float() / 127.5 - 1), scenes)


def prompt_following(
    prior,
    tokenizer,
    layout,
    text,
    *,
    num_images: int = 96,
    cfg_scales: tuple[float, ...] = PROMPT_CFG_SCALES,
    batch_size: int = 48,
    seed: int = 0,
    sampling=None,
) -> list[dict]:
    """How often a text prior's images show what their prompts ask, as `detect` reads them.

    For the seen and the held-out colour-shape combinations (`num_images` canonical prompts each) and
    every CFG scale, one row {"combinations", "cfg_scale", "colour", "shape", "position", "count", "all"}
    of accuracies, then per group the detector's ceiling (cfg_scale None) and chance ("chance" rows).
    CFG 0 samples from the empty caption: what the prior draws unprompted."""
    from dataclasses import replace as with_changes

    from .generation import SamplingConfig, generate_images

    base = sampling or SamplingConfig()
    rows = []
    for group, held_out in (("seen", False), ("held-out", True)):
        scenes = evaluation_scenes(held_out, num_images)
        prompts = [scene.canonical_prompt() for scene in scenes]
        for scale in cfg_scales:
            asked = [""] * len(prompts) if scale == 0 else prompts
            settings = with_changes(base, cfg_scale=1.0 if scale == 0 else float(scale), seed=seed)
            found = []
            for start in range(0, len(asked), batch_size):
                chunk = asked[start : start + batch_size]
                images = generate_images(prior, tokenizer, layout, chunk, settings, text=text)
                found += detect(images)
            rows.append({"combinations": group, "cfg_scale": float(scale), **accuracy(found, scenes)})
        rows.append(
            {
                "combinations": group,
                "cfg_scale": None,
                "source": "detector on real images",
                **detector_ceiling(scenes, seed),
            }
        )
    rows.append(
        {
            "combinations": "any",
            "cfg_scale": None,
            "source": "chance",
            **CHANCE,
            "all": float(np.prod(list(CHANCE.values()))),
        }
    )
    return rows

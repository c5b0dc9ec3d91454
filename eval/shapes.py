"""The shapes task: synthetic fine-detail VQA, generated on the fly and deterministic.

Each image, 96x96 px, so that the testbed model's AnyRes cuts it into a 2x2 grid of 48 px
crops beside the 48 px base view, holds 3 or 4 small shapes, 9 to 12 px, each another shape
(circle, square, triangle, cross) and another colour (of six), on a noisy background with
grey clutter. The question asks for the colour of one shape, "What colour is the triangle?";
the answer is one word. The base view halves every object to 4 to 6 px, less than one 8 px
patch: colours survive there, shapes hardly do, so finding the object asked about needs the
crops. Objects never straddle a crop boundary (each is whole in one crop), which keeps the
vision tower's per-crop labels exact.

Sample i of a split is drawn from its own seed (split, seed, i): any sample can be made alone,
the same arguments always give the same sample, and splits never share a seed.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..checks import UsageError, UsageTypeError, check_int
from ..layout import EncodedImage, ImageLayout
from ..method import Method
from ..selection import keep_count
from .generation import generate_answers

COLOURS = {
    "red": (225, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (165, 60, 205),
    "cyan": (40, 205, 215),
}
SHAPES = ("circle", "square", "triangle", "cross")
SPLITS = ("train", "validation", "test")
QUESTION = "What colour is the {shape}?"
SIZE, TILE = 96, 48  # a pinpoint of the testbed model: no resizing, no padding, 2x2 crops
OBJECTS = (3, 4)  # the least and most objects in an image: distinct colours, distinct shapes
OBJECT_PX = (9, 12)
MAX_NEW_TOKENS = 3  # a one-word answer, its end of turn, one spare
SUPERSAMPLE = 4  # shapes are drawn this much larger, then downscaled: anti-aliased edges


def shapes_sample(split: str, index: int, seed: int = 0) -> dict:
    """Sample `index` of `split`: {id, image, question, answer, objects}. `objects` lists
    (colour, shape, (x0, y0, x1, y1)) in image pixels, the object asked about first."""
    check_split(split)
    check_count("index", index)
    check_count("seed", seed)
    rng = np.random.default_rng([SPLITS.index(split), seed, index])
    n = int(rng.integers(OBJECTS[0], OBJECTS[1] + 1))
    colours, shapes = rng.permutation(list(COLOURS))[:n], rng.permutation(SHAPES)[:n]
    pairs = list(zip((str(c) for c in colours), (str(s) for s in shapes)))
    image, boxes = render(pairs, rng)
    colour, shape = pairs[0]
    return dict(
        id=f"shapes-{split}-{seed}-{index}",
        image=image,
        question=QUESTION.format(shape=shape),
        answer=colour,
        objects=[(c, s, box) for (c, s), box in zip(pairs, boxes)],
    )


def shapes_samples(split: str, n: int, seed: int = 0) -> Iterator[dict]:
    """Samples 0..n-1 of `split` (see `shapes_sample`); a longer run extends a shorter one."""
    check_split(split)
    check_count("n", n)
    check_count("seed", seed)
    return (shapes_sample(split, index, seed) for index in range(n))


def check_split(split) -> None:
    if split not in SPLITS:
        raise UsageError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")


def check_count(name: str, value) -> None:
    if check_int(name, value) < 0:
        raise UsageError(f"{name} must be >= 0, got {value}")


def questions_about(objects: list[tuple]) -> list[tuple[str, str]]:
    """Every (question, answer) the task can ask about an image holding `objects`."""
    return [(QUESTION.format(shape=shape), colour) for colour, shape, _ in objects]


def render(pairs: list[tuple[str, str]], rng: np.random.Generator) -> tuple[Image.Image, list[tuple]]:
    """The image and each object's box (x0, y0, x1, y1): objects apart, each whole in one crop."""
    pixels = rng.normal(45, 12, size=(SIZE, SIZE, 3)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 7))):  # clutter: grey strokes, no vocabulary colour
        x, y = rng.integers(0, SIZE, size=2)
        dx, dy = rng.integers(-14, 15, size=2)
        grey = int(rng.integers(70, 140))
        draw.line([(x, y), (x + dx, y + dy)], fill=(grey, grey, grey), width=int(rng.integers(1, 3)))
    boxes: list[tuple] = []
    for colour, shape in pairs:
        while True:
            size = int(rng.integers(OBJECT_PX[0], OBJECT_PX[1] + 1))
            x0, y0 = (int(v) for v in rng.integers(1, SIZE - size, size=2))
            box = (x0, y0, x0 + size, y0 + size)
            if whole_in_one_tile(box) and all(apart(box, other, 3) for other in boxes):
                break
        boxes.append(box)
        tint = np.clip(np.array(COLOURS[colour]) + rng.integers(-15, 16, size=3), 0, 255)
        paste_shape(image, shape, box, tuple(int(v) for v in tint))
    return image, boxes


def whole_in_one_tile(box: tuple) -> bool:
    return box[0] // TILE == (box[2] - 1) // TILE and box[1] // TILE == (box[3] - 1) // TILE


def apart(a: tuple, b: tuple, gap: int) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def paste_shape(image: Image.Image, shape: str, box: tuple, colour: tuple[int, int, int]) -> None:
    size = box[2] - box[0]
    big = size * SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.ellipse([0, 0, big - 1, big - 1], fill=255)
    elif shape == "square":
        draw.rectangle([0, 0, big - 1, big - 1], fill=255)
    elif shape == "triangle":
        draw.polygon([(big / 2, 0), (big - 1, big - 1), (0, big - 1)], fill=255)
    else:  # cross: two bars a third of the size wide
        third = big // 3
        draw.rectangle([third, 0, big - 1 - third, big - 1], fill=255)
        draw.rectangle([0, third, big - 1, big - 1 - third], fill=255)
    mask = mask.resize((size, size), Image.Resampling.BOX)
    image.paste(Image.new("RGB", (size, size), colour), box[:2], mask)


# --- scoring ----------------------------------------------------------------------------


def normalize(text: str) -> str:
    """The answer word as scored: lower case, outer whitespace and punctuation removed."""
    return text.strip().strip(".,!?;:'\"").strip().lower()


def score(prediction: str, answer: str) -> float:
    """Exact match of the normalised prediction with the one-word answer: 1.0 or 0.0."""
    if not isinstance(prediction, str) or not isinstance(answer, str):
        raise UsageTypeError(f"score takes two strings, got {type(prediction).__name__} and {type(answer).__name__}")
    return float(normalize(prediction) == normalize(answer))


def chance_accuracy(train: list[dict], test: list[dict]) -> float:
    """Accuracy of the best blind guess: for each test question, the answer most often given
    to the same question text in `train` (the image never looked at)."""
    answers: dict[str, Counter] = defaultdict(Counter)
    for sample in train:
        answers[sample["question"]][sample["answer"]] += 1
    overall = Counter(s["answer"] for s in train).most_common(1)[0][0]
    guess = {q: counts.most_common(1)[0][0] for q, counts in answers.items()}
    return sum(score(guess.get(s["question"], overall), s["answer"]) for s in test) / len(test)


def evaluate(model, processor, samples: list[dict], batch_size: int = 32, oracle: Oracle | None = None) -> dict:
    """Greedy answers to `samples` in left-padded batches: accuracy in percent and the
    predictions. `oracle`: the Oracle the model is patched with, given each batch's targets."""
    predictions = []
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        if oracle is not None:
            oracle.targets = [s["objects"][0][2] for s in batch]
        predictions += generate_answers(
            model, processor, [[s["image"]] for s in batch], [s["question"] for s in batch], MAX_NEW_TOKENS
        )
    right = [score(p, s["answer"]) for p, s in zip(predictions, samples)]
    return dict(accuracy=100 * sum(right) / len(right), n=len(right), predictions=predictions)


class Split(Sequence):
    """The first `size` samples of a split as a sequence, each made when indexed: what the
    sweep's `shapes` task reads as its rows."""

    def __init__(self, split: str, size: int, seed: int = 0):
        check_split(split)
        check_count("size", size)
        self.split, self.size, self.seed = split, size, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.size:
            raise IndexError(f"sample {index} is outside the {self.size} samples of this {self.split} split")
        return shapes_sample(self.split, index, self.seed)


# --- where the objects are, in tokens -----------------------------------------------------


def object_features(layout: ImageLayout, box: tuple) -> torch.Tensor:
    """(N,) bool over a shapes image's feature tokens: those whose patch overlaps `box`
    (x0, y0, x1, y1 in image pixels), in the base view and in the crops. Shapes images are
    exactly a pinpoint, so the canvas is unpadded and the base view is the whole image."""
    y, x = layout.canvas_yx
    in_base = layout.partition == 0
    base_rows, base_cols = layout.tile_shape
    rows = torch.where(in_base, torch.tensor(base_rows), torch.tensor(layout.grid[0] * layout.side))
    cols = torch.where(in_base, torch.tensor(base_cols), torch.tensor(layout.grid[1] * layout.side))
    height, width = SIZE / rows, SIZE / cols  # image pixels per patch, per token
    x0, y0, x1, y1 = box
    return (y * height < y1) & ((y + 1) * height > y0) & (x * width < x1) & ((x + 1) * width > x0)


@dataclass
class Oracle(Method):
    """The ceiling of any selector on the shapes task (evaluation only, not a public method): the
    queried object's tokens first, then the rest, each group ranked by CLS attention at the
    feature layer. Before each call, `targets` is set to the queried object's box of every
    image in the call, in order (the sweep's shapes task does this). Each image takes the box
    at its own place in the call (images of one size are selected together, out of call
    order), and each box serves once: the list is empty again after the call."""

    name = "oracle"
    targets: list = field(default_factory=list, repr=False)
    layer: int = field(init=False, default=-2, repr=False)

    def resolve(self, adapter) -> Oracle:
        self.layer = adapter.feature_layer
        return self

    def signals(self) -> dict[int, str]:
        return {self.layer: "probs"}

    def select(self, image: EncodedImage) -> torch.Tensor:
        place = image.index
        if place is None or place >= len(self.targets) or self.targets[place] is None:
            raise ValueError(f"oracle: no target box left for image {place} of the call; set .targets before each call")
        box, self.targets[place] = self.targets[place], None
        if all(target is None for target in self.targets):
            self.targets.clear()  # every box served: a later call without its own fails
        layout = image.layout
        on_object = object_features(layout, box)
        attention = layout.per_feature(image.cls_scores(self.layer))
        # lexicographic: object tokens before all others, then by attention; ties to the lower index
        order = torch.sort(-attention, stable=True).indices
        order = order[torch.sort((~on_object[order]).long(), stable=True).indices]
        return torch.sort(order[: keep_count(self.budget, layout.n_features)]).values

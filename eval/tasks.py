"""Benchmarks: where each one's rows live, how a row becomes a prompt, how answers are scored.

Prompts follow the LLaVA / lmms-eval conventions (the user turn is the image, then the
question with the task's answer-format instruction; the model's chat template wraps it).
Default sources are the lmms-lab copies on the hub that lmms-eval reads; `--data TASK=PATH`
points a task at a local copy (see `tokendrop.eval.data` for the layouts read).
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from PIL import Image

from ..checks import UsageError
from ..method import Method
from ..registry import Registry
from . import shapes
from .data import StoredImage, column, load_rows
from .metrics import exact_match, mme_answer, mme_scores, option_letter, pope_answer, pope_metrics, vqa_accuracy

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
OPTION_LETTER = "\nAnswer with the option's letter from the given choices directly."


@dataclass(frozen=True)
class Sample:
    index: int  # row in the data source: with the cell, the key of its record
    id: str  # the benchmark's own question id
    question: str  # the user's text after the image, answer-format instruction included
    reference: object
    image: Callable[[], Image.Image]  # decodes on call, inside the sample's failure guard
    meta: dict = field(default_factory=dict)


class Task:
    name: ClassVar[str]
    hub: ClassVar[tuple[str, str | None, str]]  # (dataset id, config, split)
    headline: ClassVar[str]  # the metric a cell's score is
    max_new_tokens: ClassVar[int] = 16
    # evaluation-only selections the task can offer beside the registry's (the shapes task's oracle)
    methods: ClassVar[dict[str, type[Method]]] = {}

    def load(self, source: str | None, split: str | None = None):
        """(rows, image_of): the rows, and a function from (row, index) to its image loader.
        `split`: another split than the evaluated one (`train` for training a router)."""
        path, config, default_split = self.hub
        rows, root = load_rows(source or path, split or default_split, config)
        return rows, own_images(rows, root)

    def before_batch(self, method: Method | None, samples: list[Sample]) -> None:
        """Called with the patched method before each batch: a task's own methods learn here
        what they need to know about the samples."""

    def sample(self, row: dict, index: int, image) -> Sample:
        raise NotImplementedError

    def score(self, prediction: str, sample: Sample) -> float:
        """The sample's own score in [0, 1], stored in its record."""
        raise NotImplementedError

    def metrics(self, records: list[dict]) -> dict[str, float]:
        """The task's metrics over successful records; accuracies in percent."""
        return {self.headline: 100 * sum(r["score"] for r in records) / len(records)}


def own_images(rows, root):
    """image_of for rows that hold their image in an `image` field."""
    return lambda row, index: StoredImage(rows[index]["image"], root)


TASKS: Registry[type[Task]] = Registry("task")


def register(name: str):
    def add(cls):
        cls.name = name
        return TASKS.register(name)(cls)

    return add


# a task's old name: its name now. The old one still works, with a FutureWarning.
# "testbed" now names only the model trained on the shapes task.
RENAMED = {"testbed": "shapes"}


def current_task_name(name: str | None) -> str | None:
    """The name `name` stands for now: a renamed task's new name, else `name` unchanged (it is
    checked where it is looked up, with the registry's did-you-mean error)."""
    if isinstance(name, str) and name in RENAMED:
        warnings.warn(
            f"task {name!r} is now called {RENAMED[name]!r}; the old name will stop working in a later release",
            FutureWarning,
            stacklevel=2,
        )
        return RENAMED[name]
    return name


def build_task(name: str) -> Task:
    return TASKS.get(current_task_name(name))()


@register("vqav2")
class VQAv2(Task):
    hub = ("lmms-lab/VQAv2", None, "validation")
    headline = "accuracy"

    def sample(self, row, index, image):
        answers = [a["answer"] if isinstance(a, dict) else a for a in row["answers"]]
        return Sample(index, str(row["question_id"]), row["question"] + SHORT_ANSWER, answers, image)

    def score(self, prediction, sample):
        return vqa_accuracy(prediction, sample.reference)


@register("textvqa")
class TextVQA(VQAv2):
    hub = ("lmms-lab/textvqa", None, "validation")

    def sample(self, row, index, image):
        # capitalize() as lmms-eval's textvqa prompt, which the published numbers used
        return Sample(
            index, str(row["question_id"]), row["question"].capitalize() + SHORT_ANSWER, list(row["answers"]), image
        )


@register("gqa")
class GQA(Task):
    """Questions and images are two configs joined on `imageId`; a local copy is a folder
    holding both (as the hub snapshot), or rows that carry their own `image`."""

    hub = ("lmms-lab/GQA", "testdev_balanced_instructions", "testdev")
    images = "testdev_balanced_images"
    headline = "accuracy"

    def load(self, source, split=None):
        path, config, default_split = self.hub
        source, split = source or path, split or default_split
        rows, root = load_rows(source, split, config)
        if _has(rows, "image"):
            return rows, own_images(rows, root)
        local = Path(source).expanduser()
        if local.exists() and not (local / self.images).is_dir():
            raise UsageError(
                f"gqa: {source} has no `image` column and no {self.images}/ folder beside the questions; "
                f"pass a folder holding {config}/ and {self.images}/ (the hub layout)"
            )
        images, image_root = load_rows(source, split, self.images)
        position = {image_id: i for i, image_id in enumerate(column(images, "id"))}

        def image_of(row, index):
            if row["imageId"] in position:
                return StoredImage(images[position[row["imageId"]]]["image"], image_root)

            def missing():  # fails this sample only
                raise UsageError(f"gqa: no image with id {row['imageId']!r} in {source}")

            return missing

        return rows, image_of

    def sample(self, row, index, image):
        return Sample(index, str(row["id"]), row["question"] + SHORT_ANSWER, row["answer"], image)

    def score(self, prediction, sample):
        return exact_match(prediction, sample.reference)


def _has(rows, name: str) -> bool:
    features = getattr(rows, "column_names", None)  # datasets.Dataset
    if features is not None:
        return name in features
    if hasattr(rows, "table"):  # ArrowRows
        return name in rows.table.column_names
    return bool(rows) and name in rows[0]


@register("pope")
class POPE(Task):
    hub = ("lmms-lab/POPE", None, "test")
    headline = "f1"
    METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")

    def sample(self, row, index, image):
        return Sample(
            index,
            str(row["question_id"]),
            row["question"].strip() + SHORT_ANSWER,
            row["answer"].strip().lower(),
            image,
            {"category": row.get("category")},
        )

    def score(self, prediction, sample):
        return float(pope_answer(prediction) == sample.reference)

    def metrics(self, records):
        """Over all questions, then per split (`category`: adversarial, popular, random)."""
        groups = defaultdict(list)
        for r in records:
            groups[None].append(r)
            if r["meta"].get("category"):
                groups[r["meta"]["category"]].append(r)
        out = {}
        for category, members in groups.items():
            values = pope_metrics([pope_answer(r["prediction"]) for r in members], [r["reference"] for r in members])
            prefix = "" if category is None else f"{category}_"
            out.update({prefix + k: 100 * v for k, v in values.items()})
        return out


@register("scienceqa_img")
class ScienceQAImg(Task):
    hub = ("lmms-lab/ScienceQA", "ScienceQA-IMG", "test")
    headline = "accuracy"

    def sample(self, row, index, image):
        choices = list(row["choices"])
        options = "\n".join(f"{chr(ord('A') + i)}. {c}" for i, c in enumerate(choices))
        context = f"Context: {row['hint']}\n" if row.get("hint") else ""
        question = f"{context}{row['question']}\n{options}{OPTION_LETTER}"
        return Sample(
            index, str(row.get("id", index)), question, chr(ord("A") + int(row["answer"])), image, {"choices": choices}
        )

    def score(self, prediction, sample):
        return float(option_letter(prediction, sample.meta["choices"]) == sample.reference)


@register("mme")
class MME(Task):
    """Two yes/no questions per image; `question_id` names the image."""

    hub = ("lmms-lab/MME", None, "test")
    headline = "perception"

    def sample(self, row, index, image):
        # LLaVA's convention: its short-answer instruction replaces MME's "Please answer yes or no."
        question = row["question"].strip().replace(" Please answer yes or no.", "") + SHORT_ANSWER
        meta = {"category": row["category"], "image": str(row["question_id"])}
        return Sample(index, str(row["question_id"]), question, row["answer"].strip().lower(), image, meta)

    def score(self, prediction, sample):
        return float(mme_answer(prediction) == sample.reference)

    def metrics(self, records):
        return mme_scores([(r["meta"]["category"], r["meta"]["image"], r["score"] == 1.0) for r in records])


@register("custom")
class Custom(Task):
    """Your own JSONL (or parquet / save_to_disk) rows: `image` (a path relative to the file,
    or bytes), `question` (used verbatim: put any answer-format instruction in it), and
    `answer` (a string, or a list of the accepted answers) or `answers` (a list); optional
    `id`. Every answer is a non-empty string or a number. A prediction scores 1 when,
    normalised as VQA answers are, it equals one of the answers."""

    hub = ("", None, "test")
    headline = "accuracy"
    max_new_tokens = 32

    def load(self, source, split=None):
        if not source:
            raise UsageError("the custom task reads your own file: pass --data custom=PATH.jsonl")
        return super().load(source)

    def sample(self, row, index, image):
        if not isinstance(row.get("question"), str):
            raise UsageError(f"custom row {index}: no `question` (a string), got {row.get('question')!r}")
        if "answers" not in row and "answer" not in row:
            raise UsageError(f"custom row {index}: has neither `answer` nor `answers`")
        answers = row["answers"] if "answers" in row else row["answer"]
        if "answer" in row and not isinstance(answers, list):
            answers = [answers]
        # an empty answer scores 0 whatever the model says; None would be scored as "None"
        if not isinstance(answers, list) or not answers or not all(_an_answer(a) for a in answers):
            raise UsageError(
                f"custom row {index}: `answer` must be a non-empty string (or a list of the accepted "
                f"answers), `answers` a list of them; got {answers!r}"
            )
        return Sample(index, str(row.get("id", index)), row["question"], [str(a) for a in answers], image)

    def score(self, prediction, sample):
        return exact_match(prediction, sample.reference)


def _an_answer(value) -> bool:
    """A reference answer: a non-empty string, or a number (scored as its text)."""
    if isinstance(value, str):
        return bool(value.strip())
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@register("shapes")
class Shapes(Task):
    """The synthetic fine-detail task the `testbed` model was trained on
    (`tokendrop.eval.shapes`), generated on the fly: nothing to download. Rows are the first
    TEST_SIZE samples of the test split; `--data shapes=validation` reads the validation split."""

    TEST_SIZE = 1000
    TRAIN_SIZE = 1_000_000  # generated on demand: as many as a router's training reads
    hub = ("test", None, "test")
    headline = "accuracy"
    max_new_tokens = shapes.MAX_NEW_TOKENS
    methods = {"oracle": shapes.Oracle}

    def load(self, source, split=None):
        if split == "train":
            return shapes.Split("train", self.TRAIN_SIZE), lambda row, index: lambda: row["image"]
        split = source or "test"
        if split not in ("validation", "test"):
            raise UsageError(
                f"shapes: --data shapes=SPLIT takes validation or test (the testbed model "
                f"learnt from train), got {split!r}"
            )
        return shapes.Split(split, self.TEST_SIZE), lambda row, index: lambda: row["image"]

    def sample(self, row, index, image):
        box = list(row["objects"][0][2])  # where the object asked about is: the oracle reads it
        return Sample(index, row["id"], row["question"], row["answer"], image, {"box": box})

    def before_batch(self, method, samples):
        if isinstance(method, shapes.Oracle):
            method.targets = [tuple(s.meta["box"]) for s in samples]

    def score(self, prediction, sample):
        return shapes.score(prediction, sample.reference)

"""The shapes task (`tokendrop.eval.shapes`, the sweep task `shapes`): deterministic, it
answers what it asks, it knows where each object's tokens are (its oracle); sweeps of the
testbed model on it score as the task does, and its old name "testbed" still runs it."""

import argparse
import json
import warnings

import numpy as np
import pytest
import torch

import tokendrop
from tokendrop.cli import main, profile_inputs, task_examples
from tokendrop.eval import shapes
from tokendrop.eval.sweep import SweepConfig, sweep
from tokendrop.eval.tasks import build_task
from tokendrop.harness import chat_prompt
from tokendrop.presets import build_preset, build_processor
from tokendrop.selection import keep_count

RENAMED_WARNING = "task 'testbed' is now called 'shapes'; the old name will stop working in a later release"


@pytest.fixture(scope="module")
def trained():
    return build_preset("testbed")


def pixels(image):
    return torch.from_numpy(np.array(image, dtype=np.float32))  # (height, width, 3)


def test_samples_are_deterministic_and_splits_differ():
    again = shapes.shapes_sample("test", 7)
    first = shapes.shapes_sample("test", 7)
    assert (first["question"], first["answer"], first["objects"]) == (
        again["question"],
        again["answer"],
        again["objects"],
    )
    assert torch.equal(pixels(first["image"]), pixels(again["image"]))
    others = [shapes.shapes_sample(split, 7, seed) for split, seed in (("train", 0), ("validation", 0), ("test", 1))]
    for other in others:
        assert not torch.equal(pixels(first["image"]), pixels(other["image"]))
    assert [s["id"] for s in shapes.shapes_samples("test", 3)] == [f"shapes-test-0-{i}" for i in range(3)]


def test_every_answer_follows_from_the_objects():
    for sample in shapes.shapes_samples("validation", 300):
        objects = sample["objects"]
        pairs = [(c, s) for c, s, _ in objects]
        assert sample["image"].size == (shapes.SIZE, shapes.SIZE)
        assert shapes.OBJECTS[0] <= len(objects) <= shapes.OBJECTS[1]
        assert len({c for c, _ in pairs}) == len({s for _, s in pairs}) == len(pairs)
        for i, (_, _, box) in enumerate(objects):
            assert shapes.OBJECT_PX[0] <= box[2] - box[0] <= shapes.OBJECT_PX[1]
            assert shapes.whole_in_one_tile(box)
            assert all(shapes.apart(box, other[2], 3) for other in objects[i + 1 :])
        shape = sample["question"].rstrip("?").split()[-1]
        assert dict((s, c) for c, s in pairs)[shape] == sample["answer"]
        assert (sample["question"], sample["answer"]) in shapes.questions_about(objects)


def test_objects_are_drawn_where_their_boxes_say():
    """A box holds its colour; outside every box there is none of the six colours."""
    sample = shapes.shapes_sample("test", 3)
    image = pixels(sample["image"])
    inside = torch.zeros(shapes.SIZE, shapes.SIZE, dtype=torch.bool)
    for colour, _, (x0, y0, x1, y1) in sample["objects"]:
        inside[y0:y1, x0:x1] = True
        box = image[y0:y1, x0:x1].reshape(-1, 3)
        nearest = (box - torch.tensor(shapes.COLOURS[colour], dtype=torch.float)).norm(dim=-1).min()
        assert nearest < 40
    saturation = image.max(-1).values - image.min(-1).values
    assert saturation[~inside].max() < 100 < saturation[inside].max()


def test_task_words_are_whole_tokens_of_the_testbed_tokenizer():
    tokenizer = build_processor("testbed").tokenizer
    words = [*shapes.COLOURS, *shapes.SHAPES, *shapes.QUESTION.rstrip("?").split()[:-1]]
    for word in words:  # each after a space in a prompt or an answer
        assert len(tokenizer(" " + word, add_special_tokens=False)["input_ids"]) == 1, word


def test_scoring_and_chance():
    assert shapes.score(" Red.", "red") == 1.0 and shapes.score("red circle", "red") == 0.0
    with pytest.raises(TypeError, match="two strings"):
        shapes.score(None, "red")
    chance = shapes.chance_accuracy(
        list(shapes.shapes_samples("train", 3000)), list(shapes.shapes_samples("test", 1000))
    )
    assert 0.15 < chance <= 0.2  # six colours, drawn uniformly


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda: shapes.shapes_sample("dev", 0), "split must be one of train, validation, test"),
        (lambda: shapes.shapes_sample("test", -1), "index must be >= 0"),
        (lambda: shapes.Split("test", 10)[10], "outside the 10 samples"),
    ],
)
def test_bad_task_arguments(call, error):
    with pytest.raises((ValueError, IndexError), match=error):
        call()


def test_sweep_of_the_testbed_scores_as_the_task_does(trained, tmp_path):
    model, processor = trained
    summary = sweep(
        SweepConfig(
            "testbed",
            ["shapes"],
            tmp_path / "sweep",
            methods=["hired", "random"],
            budgets=[0.1],
            limit=24,
            progress=False,
        )
    )
    cells = {(c["method"], c["budget"]): c for c in summary["cells"]}
    records = [json.loads(line) for line in (tmp_path / "sweep" / "records.rank0.jsonl").read_text().splitlines()]
    indices = sorted({r["index"] for r in records})
    assert len(indices) == 24
    expected = shapes.evaluate(model, processor, [shapes.shapes_sample("test", i) for i in indices])
    assert cells[("none", None)]["score"] == pytest.approx(expected["accuracy"])
    assert set(cells) == {("none", None), ("hired", 0.1), ("random", 0.1)}


def test_sweep_refuses_the_train_split(tmp_path):
    with pytest.raises(ValueError, match="takes validation or test"):
        sweep(
            SweepConfig(
                "testbed",
                ["shapes"],
                tmp_path,
                methods=["random"],
                budgets=[0.1],
                data={"shapes": "train"},
                limit=2,
                progress=False,
            )
        )


def test_the_old_name_testbed_runs_the_shapes_task_with_a_warning(tmp_path):
    """Published commands (`sweep --model testbed --tasks testbed`, `--data testbed=...`) still
    run: the same run id and the same records as with the new name `shapes`."""
    runs = {}
    for name in ("testbed", "shapes"):
        command = ["sweep", "--model", "testbed", "--tasks", name, "--data", f"{name}=validation"]
        command += ["--methods", "hired", "--budgets", "0.1", "--limit", "6", "--batch-size", "3"]
        command += ["--out", str(tmp_path / name), "--no-progress"]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert main(command) == 0
        renamed = [str(w.message) for w in caught if "is now called" in str(w.message)]
        assert all(w.category is FutureWarning for w in caught if "is now called" in str(w.message))
        expected = [RENAMED_WARNING] * 2 if name == "testbed" else []  # one for --tasks, one for --data
        assert renamed == expected
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        runs[name] = summary["run"]["run_id"], summary["cells"], (tmp_path / name / "records.rank0.jsonl").read_text()
    assert runs["testbed"] == runs["shapes"]
    records = [json.loads(line) for line in runs["shapes"][2].splitlines()]
    assert {r["task"] for r in records} == {"shapes"} and len(records) == 12  # 6 unpatched, 6 at 0.1
    assert all(r["id"].startswith("shapes-validation-0-") for r in records)
    with pytest.warns(FutureWarning, match=RENAMED_WARNING):
        assert type(build_task("testbed")) is type(build_task("shapes"))
    with pytest.warns(FutureWarning, match=RENAMED_WARNING):
        old = profile_inputs(argparse.Namespace(model="tiny", task="testbed", prompt=None, image_size=None))
    new = profile_inputs(argparse.Namespace(model="tiny", task="shapes", prompt=None, image_size=None))
    assert old[1] == new[1] and np.array_equal(np.array(old[0][0]), np.array(new[0][0]))
    with pytest.warns(FutureWarning, match=RENAMED_WARNING):
        old = task_examples("testbed=validation", None)
    new = task_examples("shapes=validation", None)
    assert old.identity == new.identity and (old[3].question, old[3].answer) == (new[3].question, new[3].answer)


# --- the oracle: where the objects are, in tokens ---------------------------------------------


def object_tokens_from_pixels(model, box):
    """Feature indices whose patch overlaps `box`, from the shapes images' pixel geometry: the base
    view is the 96 px image at half size in 8 px patches (16 image px each), the crops are its
    48 px quarters in 8 px patches."""
    import reference

    feats, _ = reference.features(model, shapes.SIZE, shapes.SIZE)
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    x0, y0, x1, y1 = box
    hits = set()
    for index, (partition, local) in enumerate(feats):
        y, x = divmod(local, side)
        if partition == 0:
            top, left, size = 16 * y, 16 * x, 16
        else:
            row, col = divmod(partition - 1, 2)
            top, left, size = shapes.TILE * row + 8 * y, shapes.TILE * col + 8 * x, 8
        if top < y1 and top + size > y0 and left < x1 and left + size > x0:
            hits.add(index)
    return hits


def encode_sample(model, processor, sample):
    from tokendrop.adapters import adapter_for

    inputs = processor(images=[sample["image"]], text=[chat_prompt(processor, sample["question"])], return_tensors="pt")
    with torch.no_grad():
        return adapter_for(model).encode(inputs["pixel_values"], inputs["image_sizes"], {-2: "probs"})[0], inputs


def test_object_tokens_match_the_pixel_geometry(trained):
    model, processor = trained
    for sample in shapes.shapes_samples("validation", 12):
        image, _ = encode_sample(model, processor, sample)
        for _, _, box in sample["objects"]:
            found = set(torch.nonzero(shapes.object_features(image.layout, box)).flatten().tolist())
            assert found == object_tokens_from_pixels(model, box)
            assert any(i >= 36 for i in found) and any(i < 36 for i in found)  # in a crop and in the base


@pytest.mark.parametrize("budget", [0.25, 0.05, 0.02, 2])
def test_oracle_keeps_the_object_first_then_cls_attention(trained, budget):
    model, processor = trained
    for sample in shapes.shapes_samples("test", 4):
        image, inputs = encode_sample(model, processor, sample)
        on_object = object_tokens_from_pixels(model, sample["objects"][0][2])
        attention = image.layout.per_feature(image.cls_scores(-2)).tolist()
        # ranked by (not on the object, -attention, index), written out
        ranked = sorted(range(len(attention)), key=lambda i: (i not in on_object, -attention[i], i))
        expected = sorted(ranked[: keep_count(budget, len(attention))])
        oracle = shapes.Oracle(budget=budget)
        oracle.targets = [sample["objects"][0][2]]
        with tokendrop.patched(model, oracle) as handle, torch.no_grad():
            model.generate(**inputs, max_new_tokens=1)
        assert handle.last[0].indices == expected
        assert oracle.targets == []


def test_oracle_gives_each_image_of_a_mixed_size_batch_its_own_box(trained):
    """Images of one size are selected together, so the oracle sees them out of call order:
    each must still get the box at its own place in the call."""
    model, processor = trained
    samples = [shapes.shapes_sample("test", i) for i in range(3)]
    images = [samples[0]["image"], samples[1]["image"].resize((144, 96)), samples[2]["image"]]
    boxes = [s["objects"][0][2] for s in samples]

    def kept(images, boxes):
        inputs = processor(
            images=images,
            text=[chat_prompt(processor, s["question"]) for s in samples[: len(images)]],
            return_tensors="pt",
            padding=True,
        )
        oracle = shapes.Oracle(budget=0.05)
        oracle.targets = list(boxes)
        with tokendrop.patched(model, oracle) as handle, torch.no_grad():
            model.generate(**inputs, max_new_tokens=1)
        assert oracle.targets == []
        return [r.indices for r in handle.last]

    alone = [kept([image], [box])[0] for image, box in zip(images, boxes)]
    assert kept(images, boxes) == alone
    assert alone[0] != kept([images[0]], [boxes[2]])[0]  # the boxes do decide the selection


def test_oracle_in_a_sweep_and_refused_elsewhere(trained, tmp_path):
    model, processor = trained
    summary = sweep(
        SweepConfig(
            "loaded",
            ["shapes"],
            tmp_path / "run",
            methods=["oracle"],
            budgets=[0.05],
            limit=8,
            batch_size=4,
            progress=False,
        ),
        model=model,
        processor=processor,
    )
    cell = next(c for c in summary["cells"] if c["method"] == "oracle")
    assert cell["n"] == 8 and cell["kept_pct"] == 5.0
    with pytest.raises(ValueError, match="evaluation-only, offered by the shapes task"):
        sweep(
            SweepConfig(
                "loaded",
                ["shapes", "custom"],
                tmp_path / "other",
                methods=["oracle"],
                data={"custom": str(tmp_path / "x.jsonl")},
                progress=False,
            ),
            model=model,
            processor=processor,
        )
    with pytest.raises(TypeError, match="carries its own budget"):
        tokendrop.patch(model, shapes.Oracle(budget=0.1), budget=0.2)
    with pytest.raises(ValueError, match="no target box left"):
        with tokendrop.patched(model, shapes.Oracle(budget=0.1)):
            shapes.evaluate(model, processor, [shapes.shapes_sample("test", 0)])

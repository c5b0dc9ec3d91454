"""The testbed: its task is deterministic and answers what it asks; the committed model loads,
still reaches its accuracy, and loses it when the detail is dropped; `--model testbed` and
`--task testbed` work in sweep, profile and demo."""

import json
import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tokendrop
from tokendrop import testbed as testbed_model
from tokendrop.cli import main
from tokendrop.eval import testbed
from tokendrop.eval.sweep import SweepConfig, sweep
from tokendrop.presets import build_preset, build_processor
from tokendrop.selection import keep_count

ACCURACY_SAMPLES = 300  # the first samples of the test split
FULL_ACCURACY = 90.0  # the committed model's floor on them (MODEL_CARD.md has its measured accuracy)


@pytest.fixture(scope="module")
def trained():
    return build_preset("testbed")


@pytest.fixture(scope="module")
def test_samples():
    return list(testbed.testbed_samples("test", ACCURACY_SAMPLES))


def pixels(image):
    return torch.from_numpy(np.array(image, dtype=np.float32))  # (height, width, 3)


def test_samples_are_deterministic_and_splits_differ():
    again = testbed.testbed_sample("test", 7)
    first = testbed.testbed_sample("test", 7)
    assert (first["question"], first["answer"], first["objects"]) == (
        again["question"],
        again["answer"],
        again["objects"],
    )
    assert torch.equal(pixels(first["image"]), pixels(again["image"]))
    others = [testbed.testbed_sample(split, 7, seed) for split, seed in (("train", 0), ("validation", 0), ("test", 1))]
    for other in others:
        assert not torch.equal(pixels(first["image"]), pixels(other["image"]))
    assert [s["id"] for s in testbed.testbed_samples("test", 3)] == [f"testbed-test-0-{i}" for i in range(3)]


def test_every_answer_follows_from_the_objects():
    for sample in testbed.testbed_samples("validation", 300):
        objects = sample["objects"]
        pairs = [(c, s) for c, s, _ in objects]
        assert sample["image"].size == (testbed.SIZE, testbed.SIZE)
        assert testbed.OBJECTS[0] <= len(objects) <= testbed.OBJECTS[1]
        assert len({c for c, _ in pairs}) == len({s for _, s in pairs}) == len(pairs)
        for i, (_, _, box) in enumerate(objects):
            assert testbed.OBJECT_PX[0] <= box[2] - box[0] <= testbed.OBJECT_PX[1]
            assert testbed.whole_in_one_tile(box)
            assert all(testbed.apart(box, other[2], 3) for other in objects[i + 1 :])
        shape = sample["question"].rstrip("?").split()[-1]
        assert dict((s, c) for c, s in pairs)[shape] == sample["answer"]
        assert (sample["question"], sample["answer"]) in testbed.questions_about(objects)


def test_objects_are_drawn_where_their_boxes_say():
    """A box holds its colour; outside every box there is none of the six colours."""
    sample = testbed.testbed_sample("test", 3)
    image = pixels(sample["image"])
    inside = torch.zeros(testbed.SIZE, testbed.SIZE, dtype=torch.bool)
    for colour, _, (x0, y0, x1, y1) in sample["objects"]:
        inside[y0:y1, x0:x1] = True
        box = image[y0:y1, x0:x1].reshape(-1, 3)
        nearest = (box - torch.tensor(testbed.COLOURS[colour], dtype=torch.float)).norm(dim=-1).min()
        assert nearest < 40
    saturation = image.max(-1).values - image.min(-1).values
    assert saturation[~inside].max() < 100 < saturation[inside].max()


def test_task_words_are_whole_tokens_of_the_testbed_tokenizer():
    tokenizer = build_processor("testbed").tokenizer
    words = [*testbed.COLOURS, *testbed.SHAPES, *testbed.QUESTION.rstrip("?").split()[:-1]]
    for word in words:  # each after a space in a prompt or an answer
        assert len(tokenizer(" " + word, add_special_tokens=False)["input_ids"]) == 1, word


def test_scoring_and_chance():
    assert testbed.score(" Red.", "red") == 1.0 and testbed.score("red circle", "red") == 0.0
    with pytest.raises(TypeError, match="two strings"):
        testbed.score(None, "red")
    chance = testbed.chance_accuracy(
        list(testbed.testbed_samples("train", 3000)), list(testbed.testbed_samples("test", 1000))
    )
    assert 0.15 < chance <= 0.2  # six colours, drawn uniformly


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda: testbed.testbed_sample("dev", 0), "split must be one of train, validation, test"),
        (lambda: testbed.testbed_sample("test", -1), "index must be >= 0"),
        (lambda: testbed.Split("test", 10)[10], "outside the 10 samples"),
    ],
)
def test_bad_task_arguments(call, error):
    with pytest.raises((ValueError, IndexError), match=error):
        call()


def test_committed_model_reaches_its_accuracy_and_needs_the_detail(trained, test_samples):
    model, processor = trained
    full = testbed.evaluate(model, processor, test_samples)
    assert full["accuracy"] >= FULL_ACCURACY
    with tokendrop.patched(model, "random", budget=0.1):
        dropped = testbed.evaluate(model, processor, test_samples)
    assert dropped["accuracy"] <= full["accuracy"] - 20


def test_batched_answers_equal_one_by_one(trained, test_samples):
    model, processor = trained
    batched = testbed.evaluate(model, processor, test_samples[:12], batch_size=12)["predictions"]
    single = [testbed.evaluate(model, processor, [s], batch_size=1)["predictions"][0] for s in test_samples[:12]]
    assert batched == single


def test_loader_names_a_missing_or_foreign_weights_file(tmp_path, monkeypatch):
    for name in ("config.json", "model.safetensors"):
        shutil.copy(testbed_model.HERE / name, tmp_path / name)
    monkeypatch.setattr(testbed_model, "CONFIG", tmp_path / "config.json")
    monkeypatch.setattr(testbed_model, "WEIGHTS", tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.safetensors is missing"):
        testbed_model.load_testbed_model(build_processor("testbed"))
    monkeypatch.setattr(testbed_model, "WEIGHTS", tmp_path / "model.safetensors")
    config = json.loads((tmp_path / "config.json").read_text())
    config["text_config"]["vocab_size"] += 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="another task vocabulary"):
        testbed_model.load_testbed_model(build_processor("testbed"))


def test_sweep_of_the_testbed_scores_as_the_task_does(trained, tmp_path):
    model, processor = trained
    summary = sweep(
        SweepConfig(
            "testbed",
            ["testbed"],
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
    expected = testbed.evaluate(model, processor, [testbed.testbed_sample("test", i) for i in indices])
    assert cells[("none", None)]["score"] == pytest.approx(expected["accuracy"])
    assert set(cells) == {("none", None), ("hired", 0.1), ("random", 0.1)}


def test_sweep_refuses_the_train_split(tmp_path):
    with pytest.raises(ValueError, match="takes validation or test"):
        sweep(
            SweepConfig(
                "testbed",
                ["testbed"],
                tmp_path,
                methods=["random"],
                budgets=[0.1],
                data={"testbed": "train"},
                limit=2,
                progress=False,
            )
        )


def test_the_demo_answers_on_the_testbed(capsys, tmp_path):
    """The default demo: answers next to the truth, the accuracy per method and budget, the picture."""
    assert (
        main(
            [
                "demo",
                "--budgets",
                "0.5",
                "0.1",
                "--samples",
                "20",
                "--examples",
                "2",
                "--out",
                str(tmp_path),
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "random weights" not in out and "Answers on test images" in out
    answers = out.split("Answers on test images")[1].split("testbed (accuracy)")[0]
    assert answers.count("What colour is the") == 2
    accuracy = [line.split() for line in out.split("testbed (accuracy)")[1].splitlines()]
    cells = [(row[0], row[1], row[2]) for row in accuracy if row[:1] and row[0] in ("none", "hired", "random")][:5]
    assert cells == [
        ("none", "-", "20"),
        ("hired", "0.5", "20"),
        ("hired", "0.1", "20"),
        ("random", "0.5", "20"),
        ("random", "0.1", "20"),
    ]
    assert (tmp_path / "kept.png").stat().st_size > 5_000
    assert (
        main(
            [
                "demo",
                "--budgets",
                "0.5",
                "0.1",
                "--samples",
                "20",
                "--examples",
                "2",
                "--out",
                str(tmp_path),
                "--no-progress",
            ]
        )
        == 0
    )  # again: resumed, nothing to redo
    assert "resuming" not in capsys.readouterr().out  # --no-progress: quiet


def test_profile_takes_the_testbed(capsys, tmp_path):
    assert (
        main(
            [
                "profile",
                "--model",
                "testbed",
                "--task",
                "testbed",
                "--budgets",
                "0.25",
                "--repeats",
                "1",
                "--max-new-tokens",
                "2",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    cells = json.loads((tmp_path / "profile.json").read_text())["cells"]
    # the 96x96 test image: 36 base + 144 crop features (and 12 newlines), a quarter kept
    assert [(c["method"], c["features_before"], c["features_kept"]) for c in cells if c["status"] == "ok"] == [
        ("none", None, None),
        ("hired", 180, 45),
    ]
    with pytest.raises(SystemExit) as exit_info:  # a usage error, not a traceback
        main(["profile", "--model", "testbed", "--task", "testbed", "--prompt", "Hi", "--repeats", "1"])
    assert exit_info.value.code == 2 and "brings its own question" in capsys.readouterr().err


def test_training_script_runs_end_to_end_and_writes_a_loadable_model(tmp_path, monkeypatch):
    """Two steps per stage: the recipe's plumbing (labels, cached prefixes, the card), not its
    accuracy, which the committed model's test above covers."""
    script = Path(__file__).parents[1] / "examples" / "train_testbed.py"
    monkeypatch.setattr(
        sys,
        "argv",
        [
            str(script),
            "--out",
            str(tmp_path),
            "--batch",
            "2",
            "--vision-steps",
            "2",
            "--language-steps",
            "2",
            "--spell-steps",
            "1",
            "--drop-share",
            "1",
            "--eval-samples",
            "4",
        ],
    )
    runpy.run_path(str(script), run_name="__main__")
    monkeypatch.setattr(testbed_model, "CONFIG", tmp_path / "config.json")
    monkeypatch.setattr(testbed_model, "WEIGHTS", tmp_path / "model.safetensors")
    processor = build_processor("testbed")
    model = testbed_model.load_testbed_model(processor)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in build_preset("testbed")[0].parameters())
    card = (tmp_path / "MODEL_CARD.md").read_text()
    assert "--vision-steps 2" in card and "| test |" in card and "`oracle` at 25%" in card


# --- the oracle: where the objects are, in tokens ---------------------------------------------


def object_tokens_from_pixels(model, box):
    """Feature indices whose patch overlaps `box`, from the testbed's pixel geometry: the base
    view is the 96 px image at half size in 8 px patches (16 image px each), the crops are its
    48 px quarters in 8 px patches."""
    import reference

    feats, _ = reference.features(model, testbed.SIZE, testbed.SIZE)
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    x0, y0, x1, y1 = box
    hits = set()
    for index, (partition, local) in enumerate(feats):
        y, x = divmod(local, side)
        if partition == 0:
            top, left, size = 16 * y, 16 * x, 16
        else:
            row, col = divmod(partition - 1, 2)
            top, left, size = testbed.TILE * row + 8 * y, testbed.TILE * col + 8 * x, 8
        if top < y1 and top + size > y0 and left < x1 and left + size > x0:
            hits.add(index)
    return hits


def encode_sample(model, processor, sample):
    from tokendrop.adapters import adapter_for

    inputs = processor(images=[sample["image"]], text=[chat_prompt(processor, sample["question"])], return_tensors="pt")
    with torch.no_grad():
        return adapter_for(model).encode(inputs["pixel_values"], inputs["image_sizes"], {-2: "probs"})[0], inputs


def chat_prompt(processor, question):
    from tokendrop.harness import chat_prompt as render

    return render(processor, question)


def test_object_tokens_match_the_pixel_geometry(trained):
    model, processor = trained
    for sample in testbed.testbed_samples("validation", 12):
        image, _ = encode_sample(model, processor, sample)
        for _, _, box in sample["objects"]:
            found = set(torch.nonzero(testbed.object_features(image.layout, box)).flatten().tolist())
            assert found == object_tokens_from_pixels(model, box)
            assert any(i >= 36 for i in found) and any(i < 36 for i in found)  # in a crop and in the base


@pytest.mark.parametrize("budget", [0.25, 0.05, 0.02, 2])
def test_oracle_keeps_the_object_first_then_cls_attention(trained, budget):
    model, processor = trained
    for sample in testbed.testbed_samples("test", 4):
        image, inputs = encode_sample(model, processor, sample)
        on_object = object_tokens_from_pixels(model, sample["objects"][0][2])
        attention = image.layout.per_feature(image.cls_scores(-2)).tolist()
        # ranked by (not on the object, -attention, index), written out
        ranked = sorted(range(len(attention)), key=lambda i: (i not in on_object, -attention[i], i))
        expected = sorted(ranked[: keep_count(budget, len(attention))])
        oracle = testbed.Oracle(budget=budget)
        oracle.targets = [sample["objects"][0][2]]
        with tokendrop.patched(model, oracle) as handle, torch.no_grad():
            model.generate(**inputs, max_new_tokens=1)
        assert handle.last[0].indices == expected
        assert oracle.targets == []


def test_oracle_in_a_sweep_and_refused_elsewhere(trained, tmp_path):
    model, processor = trained
    summary = sweep(
        SweepConfig(
            "loaded",
            ["testbed"],
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
    with pytest.raises(ValueError, match="evaluation-only, offered by the testbed task"):
        sweep(
            SweepConfig(
                "loaded",
                ["testbed", "custom"],
                tmp_path / "other",
                methods=["oracle"],
                data={"custom": str(tmp_path / "x.jsonl")},
                progress=False,
            ),
            model=model,
            processor=processor,
        )
    with pytest.raises(TypeError, match="carries its own budget"):
        tokendrop.patch(model, testbed.Oracle(budget=0.1), budget=0.2)
    with pytest.raises(ValueError, match="no target box left"):
        with tokendrop.patched(model, testbed.Oracle(budget=0.1)):
            testbed.evaluate(model, processor, [testbed.testbed_sample("test", 0)])

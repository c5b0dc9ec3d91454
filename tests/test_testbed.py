"""The testbed model (`tokendrop.testbed`, preset `testbed`): the committed weights load, reach
their accuracy on the shapes task and lose it when the detail is dropped; the demo and
profile run on it; its training script runs; the prompts it was trained and is evaluated on
are the chat template written out, token for token."""

import json
import runpy
import shutil
import sys
from pathlib import Path

import pytest

import tokendrop
from tokendrop import testbed as testbed_model
from tokendrop.cli import main
from tokendrop.eval import shapes
from tokendrop.presets import build_preset, build_processor

ACCURACY_SAMPLES = 300  # the first samples of the test split
FULL_ACCURACY = 90.0  # the committed model's floor on them (MODEL_CARD.md has its measured accuracy)


@pytest.fixture(scope="module")
def trained():
    return build_preset("testbed")


@pytest.fixture(scope="module")
def test_samples():
    return list(shapes.shapes_samples("test", ACCURACY_SAMPLES))


def test_committed_model_reaches_its_accuracy_and_needs_the_detail(trained, test_samples):
    model, processor = trained
    full = shapes.evaluate(model, processor, test_samples)
    assert full["accuracy"] >= FULL_ACCURACY
    with tokendrop.patched(model, "random", budget=0.1):
        dropped = shapes.evaluate(model, processor, test_samples)
    assert dropped["accuracy"] <= full["accuracy"] - 20


def test_batched_answers_equal_one_by_one(trained, test_samples):
    model, processor = trained
    batched = shapes.evaluate(model, processor, test_samples[:12], batch_size=12)["predictions"]
    single = [shapes.evaluate(model, processor, [s], batch_size=1)["predictions"][0] for s in test_samples[:12]]
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
    answers = out.split("Answers on test images")[1].split("shapes (accuracy)")[0]
    assert answers.count("What colour is the") == 2
    accuracy = [line.split() for line in out.split("shapes (accuracy)")[1].splitlines()]
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


def test_profile_takes_the_shapes_task(capsys, tmp_path):
    assert (
        main(
            [
                "profile",
                "--model",
                "testbed",
                "--task",
                "shapes",
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
        main(["profile", "--model", "testbed", "--task", "shapes", "--prompt", "Hi", "--repeats", "1"])
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

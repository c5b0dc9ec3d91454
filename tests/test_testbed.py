"""The testbed model (`tokendrop.testbed`, preset `testbed`): the committed weights load, reach
their accuracy on the shapes task and lose it when the detail is dropped; the demo and
profile run on it; its training script runs; the prompts it was trained and is evaluated on
are the chat template written out, token for token."""

import json
import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

import tokendrop
from tokendrop import testbed as testbed_model, training
from tokendrop.cli import main
from tokendrop.eval import shapes
from tokendrop.harness import chat_prompt
from tokendrop.presets import build_preset, build_processor

ACCURACY_SAMPLES = 300  # the first samples of the test split
FULL_ACCURACY = 90.0  # the committed model's floor on them (MODEL_CARD.md has its measured accuracy)
TRAINING_SCRIPT = Path(__file__).parents[1] / "examples" / "train_testbed.py"


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
    demo = [
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
    assert main(demo) == 0
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
    # the best methods at the lowest budget beside hired and random, and what that budget buys
    assert [row[0] for row in accuracy if row[1:2] == ["0.1"]] == ["router", "divprune", "hired", "random"]
    assert all(f"{m} 0.1" in answers for m in ("router", "divprune", "hired", "random")) and "0.5" not in answers
    (buys,) = [line for line in out.splitlines() if line.startswith("What budget 0.1 buys")]
    figures = dict(part.strip().split(" ", 1) for part in buys.split("median of 3): ")[1].split(", "))
    assert list(figures) == ["unpatched", "router", "divprune", "hired", "random"]
    tokens = {name: [int(n) for n in text.split(" / ")[:2]] for name, text in figures.items()}
    assert tokens["unpatched"] == [192, 202]  # 180 features and 12 newlines of the 96x96 image; the prompt
    assert all(18 <= kept <= 30 and prompt == kept + 10 for kept, prompt in list(tokens.values())[1:])
    assert (tmp_path / "kept.png").stat().st_size > 5_000
    assert main(demo) == 0  # again: resumed, nothing to redo
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
    script = TRAINING_SCRIPT
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


def test_prompts_are_the_chat_template_written_out_token_for_token():
    """What the model was trained on (examples/train_testbed.py), what a router trains on
    (training.py) and what evaluation asks (harness.chat_prompt, which generate_answers uses)
    are the testbed template written out, with the ids they had before chat_prompt built them all."""
    processor = build_processor("testbed")

    def ids(text):
        return processor.tokenizer(text, add_special_tokens=False)["input_ids"]

    samples = list(shapes.shapes_samples("train", 4))
    for sample in samples:
        question, answer = sample["question"], sample["answer"]
        written = f"USER: <image>\n{question} ASSISTANT:"
        assert chat_prompt(processor, question) == training.prompt_for(processor, question, None) == written
        assert training.answer_text(processor, question, answer, None) == f" {answer}</s>"
        assert chat_prompt(processor, question, answer=answer) == f"{written} {answer}</s>"
    # sample 0, "What colour is the square?" (yellow): the ids the committed model was trained and measured on
    assert ids(chat_prompt(processor, samples[0]["question"])) == [260, 224, 3, 202, 262, 279, 280, 281, 289, 34, 277]
    assert ids(training.answer_text(processor, samples[0]["question"], samples[0]["answer"], None)) == [285, 2]

    script = runpy.run_path(str(TRAINING_SCRIPT))  # its definitions; main() runs only as __main__
    chats = script["Chats"](processor)
    assert (chats.prefix, chats.rest) == ("USER: <image>\n", " ASSISTANT: {answer}</s>")
    prefix, rest, labels = chats.batch(samples, 3, False, np.random.default_rng(0))
    rng = np.random.default_rng(0)  # the questions drawn as the batch drew them
    asked = [pair for s in samples for pair in script["questions"](s, 3, rng)]
    written = processor(images=[s["image"] for s in samples], text=["USER: <image>\n"] * 4, return_tensors="pt")
    assert prefix["input_ids"].tolist() == written["input_ids"].tolist()
    for row, (question, answer) in enumerate(asked):
        expected = ids(f"{question} ASSISTANT: {answer}</s>")
        assert rest["input_ids"][row, : len(expected)].tolist() == expected
        assert labels[row][labels[row] != -100].tolist() == ids(f" {answer}</s>")

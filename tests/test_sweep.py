"""`tokendrop sweep` end to end, on the tiny preset (random weights) and small benchmark copies
written here in the schemas and file layouts of the real ones (lmms-lab's, on the hub)."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tokendrop
from tokendrop.cli import main
from tokendrop.eval import sweep as sweep_module
from tokendrop.eval.data import load_rows, open_image, subset
from tokendrop.eval.generation import generate_answers
from tokendrop.eval.sweep import REFERENCE, SweepConfig, read_records, sweep
from tokendrop.eval.tasks import TASKS, build_task
from tokendrop.loading import load_model, load_processor
from tokendrop.method import METHODS
from tokendrop.presets import synthetic_image

SIZES = [(96, 38), (38, 96), (100, 60), (64, 64), (120, 50)]  # (width, height): different AnyRes grids
FAST = dict(max_new_tokens=2, progress=False)


def tiny_model():
    """The model and processor a sweep of the tiny preset runs."""
    return load_model("tiny"), load_processor("tiny")


def pictures():
    return [synthetic_image(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]


def key(r):
    return r["task"], r["method"], r["budget"], r["index"]


def write_custom(folder: Path, questions, answers) -> Path:
    """A custom-task JSONL whose images are PNG files beside it, named by relative path."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "data.jsonl", "w") as file:
        for i, (image, question, answer) in enumerate(zip(pictures(), questions, answers)):
            image.save(folder / f"{i}.png")
            file.write(json.dumps({"id": f"q{i}", "image": f"{i}.png", "question": question, "answers": answer}) + "\n")
    return folder / "data.jsonl"


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """{task: path}: five rows per benchmark, with decoy splits and configs beside them."""
    datasets = pytest.importorskip("datasets")
    root = tmp_path_factory.mktemp("bench")
    images = pictures()

    def table(**columns):
        return datasets.Dataset.from_dict(columns)

    def parquet(dataset, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        dataset.to_parquet(str(path))

    n = len(images)
    vqa = table(
        question_id=[100 + i for i in range(n)],
        question=[f"What color is thing {i}?" for i in range(n)],
        answers=[
            [
                {"answer": a, "answer_confidence": "yes", "answer_id": j}
                for j, a in enumerate(["red"] * 6 + ["dark red"] * 4)
            ]
            for _ in range(n)
        ],
        multiple_choice_answer=["red"] * n,
        answer_type=["other"] * n,
        image=images,
    )
    parquet(vqa, root / "vqav2/data/validation-00000-of-00001.parquet")
    parquet(vqa.select(range(2)), root / "vqav2/data/testdev-00000-of-00001.parquet")  # a decoy split

    textvqa = table(
        question_id=list(range(n)),
        question=[f"what is written on sign {i}?" for i in range(n)],
        answers=[["stop"] * 10] * n,
        ocr_tokens=[["stop"]] * n,
        image_id=[str(i) for i in range(n)],
        image=images,
    )
    datasets.DatasetDict(validation=textvqa, train=textvqa.select(range(1))).save_to_disk(str(root / "textvqa"))

    # GQA: questions name their image by id; images are stored in another order, one shared
    image_ids = ["n3", "n1", "n0", "n1", "n2"]
    parquet(
        table(
            id=[f"g{i}" for i in range(n)],
            imageId=image_ids,
            question=[f"Is object {i} left?" for i in range(n)],
            answer=["yes", "no", "yes", "no", "left"],
            fullAnswer=["..."] * n,
        ),
        root / "gqa/testdev_balanced_instructions/testdev-00000-of-00001.parquet",
    )
    parquet(
        table(id=["n2", "n0", "n3", "n1"], image=[images[2], images[0], images[3], images[1]]),
        root / "gqa/testdev_balanced_images/testdev-00000-of-00001.parquet",
    )

    table(
        id=list(range(n)),
        question_id=[str(i % 3) for i in range(n)],
        question=["Is there a cat in the image?"] * n,
        answer=["yes", "no", "yes", "no", "yes"],
        category=["adversarial", "popular", "random", "random", "popular"],
        image_source=["coco"] * n,
        image=images,
    ).save_to_disk(str(root / "pope"))

    sqa = table(
        question=[f"Which animal is {i}?" for i in range(n)],
        choices=[["dog", "cat"], ["a", "b", "c"]] * 2 + [["x", "y"]],
        answer=[1, 2, 0, 0, 1],
        hint=["A farm.", "", "", "Look closely.", ""],
        subject=["natural science"] * n,
        image=images,
    )
    parquet(sqa, root / "sqa/ScienceQA-IMG/test-00000-of-00001.parquet")
    parquet(sqa.select(range(1)), root / "sqa/ScienceQA-FULL/test-00000-of-00001.parquet")  # a decoy config

    parquet(
        table(
            question_id=["existence/1.jpg", "existence/1.jpg", "OCR/2.jpg", "OCR/2.jpg", "code_reasoning/3.png"],
            question=["Is there a dog? Please answer yes or no."] * n,
            answer=["Yes", "No", "Yes", "No", "Yes"],
            category=["existence", "existence", "OCR", "OCR", "code_reasoning"],
            image=images,
        ),
        root / "mme/data/test-00000-of-00001.parquet",
    )

    custom = write_custom(root / "custom", [f"Name thing {i}." for i in range(n)], [["thing"]] * n)
    return {
        "vqav2": root / "vqav2",
        "textvqa": root / "textvqa",
        "gqa": root / "gqa",
        "pope": root / "pope",
        "scienceqa_img": root / "sqa",
        "mme": root / "mme",
        "custom": custom,
    }


# --- data ------------------------------------------------------------------------------


def test_sources_pick_the_task_split_and_config(bench):
    assert len(load_rows(bench["vqav2"], "validation")[0]) == 5  # not the testdev decoy
    assert len(load_rows(bench["textvqa"], "validation")[0]) == 5  # a DatasetDict's split
    assert len(load_rows(bench["scienceqa_img"], "test", "ScienceQA-IMG")[0]) == 5
    with pytest.raises(ValueError, match="has splits validation, train, not 'test'"):
        load_rows(bench["textvqa"], "test")
    with pytest.raises(ValueError, match="holds 2 .parquet files, none named after split 'train'"):
        load_rows(bench["vqav2"], "train")


def test_gqa_joins_questions_to_their_images(bench):
    rows, image_of = build_task("gqa").load(str(bench["gqa"]))
    expected = {"n0": 0, "n1": 1, "n2": 2, "n3": 3}  # image id -> picture
    for i in range(len(rows)):
        shown = image_of(rows[i], i)()
        assert shown.tobytes() == pictures()[expected[rows[i]["imageId"]]].convert("RGB").tobytes()
    with pytest.raises(ValueError, match="no `image` column"):
        build_task("gqa").load(str(bench["gqa"] / "testdev_balanced_instructions"))


def test_hub_ids_go_to_datasets_load_dataset(bench, monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return datasets.load_from_disk(str(bench["pope"]))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    rows, _ = build_task("pope").load(None)
    assert calls == [("lmms-lab/POPE", None, "test")] and len(rows) == 5
    assert isinstance(rows[0]["image"], dict)  # left undecoded until its sample runs

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match="not a local path.*ConnectionError.*--data TASK=PATH"):
        build_task("textvqa").load(None)


def test_jsonl_errors_name_the_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"question": "a"}\n{"question": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: not valid JSON"):
        load_rows(tmp_path / "bad.jsonl", "test")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no dataset"):
        load_rows(tmp_path / "empty", "test")


def test_images_open_from_every_stored_form(tmp_path):
    image = pictures()[0]
    image.save(tmp_path / "a.png")
    raw = (tmp_path / "a.png").read_bytes()
    forms = [
        image,
        {"bytes": raw, "path": None},
        {"bytes": None, "path": "a.png"},
        raw,
        "a.png",
        str(tmp_path / "a.png"),
    ]
    for form in forms:
        assert open_image(form, tmp_path).tobytes() == image.convert("RGB").tobytes()
    with pytest.raises(ValueError, match="cannot read an image from int"):
        open_image(3, tmp_path)


def test_subset_is_fixed_by_the_seed():
    assert subset(10, 4, seed=0) == subset(10, 4, seed=0) == sorted(subset(10, 4, seed=0))
    assert len(subset(10, 4, seed=0)) == 4 and subset(10, 4, seed=0) != subset(10, 4, seed=1)
    assert subset(3, 5, seed=0) == subset(3, None, seed=0) == [0, 1, 2]


# --- the sweep -------------------------------------------------------------------------


def test_sweep_every_task_end_to_end(bench, tmp_path):
    out = tmp_path / "run"
    summary = sweep(
        SweepConfig(
            "tiny",
            list(TASKS.names()),
            out,
            methods=["hired"],
            budgets=[0.25, 8],
            data={t: str(p) for t, p in bench.items()},
            limit=3,
            batch_size=2,
            **FAST,
        )
    )
    records = read_records(out)
    cells = 1 + 2
    assert len(records) == len({key(r) for r in records}) == len(TASKS.names()) * cells * 3
    assert all(r["error"] is None for r in records)
    for r in records:
        if r["method"] == REFERENCE:
            assert r["kept"] is None
        elif r["budget"] == 8:
            assert r["kept"] == min(8, r["before"])
        else:
            assert r["kept"] == max(1, math.floor(0.25 * r["before"]))

    # every cell's score is its task's metric over that cell's records
    assert len(summary["cells"]) == len(TASKS.names()) * cells
    for row in summary["cells"]:
        assert (row["n"], row["failed"], row["missing"]) == (3, 0, 0)
        mine = [
            r for r in records if (r["task"], r["method"], r["budget"]) == (row["task"], row["method"], row["budget"])
        ]
        task = build_task(row["task"])
        assert row["metrics"] == pytest.approx(task.metrics(mine))
        assert row["score"] == pytest.approx(task.metrics(mine)[task.headline])
        reference = next(c for c in summary["cells"] if c["task"] == row["task"] and c["method"] == REFERENCE)
        assert row["unpatched"] == reference["score"]
    pope = next(c for c in summary["cells"] if c["task"] == "pope" and c["method"] == REFERENCE)["metrics"]
    assert {"accuracy", "precision", "recall", "f1", "yes_ratio"} <= set(pope)
    assert summary["run"]["run_id"] == json.loads((out / "run.json").read_text())["run_id"]

    # prompts and references follow each benchmark's conventions
    by_task = {}
    for r in records:
        by_task.setdefault(r["task"], {})[r["index"]] = r
    sqa = by_task["scienceqa_img"][0]
    assert sqa["question"] == (
        "Context: A farm.\nWhich animal is 0?\nA. dog\nB. cat\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert sqa["reference"] == "B"
    for r in by_task["mme"].values():
        assert r["question"] == "Is there a dog?\nAnswer the question using a single word or phrase."
    assert all(r["question"].startswith("What is written") for r in by_task["textvqa"].values())
    assert all(len(r["reference"]) == 10 for r in by_task["vqav2"].values())

    # GQA's joined images are the ones the model saw: the unpatched answer, recomputed
    model, processor = tiny_model()
    rows, image_of = build_task("gqa").load(str(bench["gqa"]))
    for index, r in by_task["gqa"].items():
        if r["method"] == REFERENCE:
            answer = generate_answers(model, processor, [[image_of(rows[index], index)()]], [r["question"]], 2)
            assert answer == [r["prediction"]]

    with open(out / "summary.csv") as file:
        table = list(csv.DictReader(file))
    assert len(table) == len(summary["cells"]) and {"task", "score", "pct_of_unpatched", "f1"} <= set(table[0])
    for task in TASKS.names():
        assert (out / "plots" / f"{task}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def unpatched_answers(questions, n_new=2):
    model, processor = tiny_model()
    return generate_answers(model, processor, [[p] for p in pictures()[: len(questions)]], questions, n_new)


def test_scores_against_known_answers(tmp_path):
    """Answers written to equal the unpatched model's own for two of three questions: the
    unpatched score is 2/3, and budget 1.0 (identical to unpatched) keeps 100% of it."""
    questions = ["Name it.", "What is this?", "Which color?"]
    predicted = unpatched_answers(questions)
    data = write_custom(tmp_path / "data", questions, [[predicted[0]], [predicted[1], "other"], ["zzz-never"]])
    summary = sweep(
        SweepConfig(
            "tiny",
            ["custom"],
            tmp_path / "run",
            methods=["hired"],
            budgets=[1.0, 0.25],
            data={"custom": str(data)},
            **FAST,
        )
    )
    rows = {(r["method"], r["budget"]): r for r in summary["cells"]}
    assert rows[(REFERENCE, None)]["score"] == pytest.approx(200 / 3)
    assert rows[("hired", 1.0)]["score"] == pytest.approx(200 / 3)
    assert rows[("hired", 1.0)]["pct_of_unpatched"] == pytest.approx(100.0)
    records = read_records(tmp_path / "run")
    assert [r["prediction"] for r in sorted(records, key=lambda r: r["index"]) if r["method"] == REFERENCE] == predicted
    assert [r["score"] for r in sorted(records, key=lambda r: r["index"]) if r["method"] == REFERENCE] == [
        1.0,
        1.0,
        0.0,
    ]


def test_a_checkpoint_directory_loads_like_the_preset(tmp_path):
    """The from_pretrained path (AutoProcessor + LlavaNext), offline: the tiny preset saved."""
    model, processor = tiny_model()
    model.save_pretrained(tmp_path / "checkpoint")
    processor.save_pretrained(tmp_path / "checkpoint")
    data = write_custom(tmp_path / "data", ["Say it.", "Say that."], [["x"]] * 2)
    args = dict(methods=["hired"], budgets=[0.25], data={"custom": str(data)}, **FAST)
    sweep(SweepConfig("tiny", ["custom"], tmp_path / "preset", **args))
    sweep(SweepConfig(str(tmp_path / "checkpoint"), ["custom"], tmp_path / "loaded", **args))
    preset, loaded = read_records(tmp_path / "preset"), read_records(tmp_path / "loaded")
    assert [(key(r), r["prediction"]) for r in preset] == [(key(r), r["prediction"]) for r in loaded]


def test_batched_equals_one_by_one_for_every_method(bench, tmp_path):
    runs = {}
    for batch_size in (1, 4):
        sweep(
            SweepConfig(
                "tiny",
                ["pope"],
                tmp_path / f"b{batch_size}",
                budgets=[0.25],
                data={"pope": str(bench["pope"])},
                batch_size=batch_size,
                **FAST,
            )
        )
        runs[batch_size] = {key(r): (r["prediction"], r["kept"]) for r in read_records(tmp_path / f"b{batch_size}")}
    assert runs[1] == runs[4]
    assert {k[1] for k in runs[1]} == {REFERENCE, *METHODS.names()}  # every registered method by default
    assert len(runs[1]) == 5 * (1 + len(METHODS.names()))


def test_resume_after_an_interrupted_run(tmp_path, monkeypatch):
    data = write_custom(tmp_path / "data", [f"Say {i}." for i in range(5)], [["x"]] * 5)
    args = dict(methods=["random"], budgets=[0.25, 8], data={"custom": str(data)}, batch_size=2, **FAST)
    whole = sweep(SweepConfig("tiny", ["custom"], tmp_path / "whole", **args))
    expected = {key(r): r["prediction"] for r in read_records(tmp_path / "whole")}

    write = sweep_module.RecordLog.write
    written = []

    def killed_after_seven(self, record):
        if len(written) == 7:
            raise KeyboardInterrupt
        written.append(record)
        write(self, record)

    monkeypatch.setattr(sweep_module.RecordLog, "write", killed_after_seven)
    with pytest.raises(KeyboardInterrupt):
        sweep(SweepConfig("tiny", ["custom"], tmp_path / "cut", **args))
    monkeypatch.setattr(sweep_module.RecordLog, "write", write)
    log = tmp_path / "cut" / "records.rank0.jsonl"
    with open(log, "a") as file:  # a kill in the middle of a write
        file.write('{"index": 4, "id": "q4", "predic')
    assert len(read_records(tmp_path / "cut")) == 7

    resumed = sweep(SweepConfig("tiny", ["custom"], tmp_path / "cut", **args))
    records = read_records(tmp_path / "cut")
    assert {key(r): r["prediction"] for r in records} == expected
    assert len(records) == len(expected)  # no duplicate
    assert all(json.loads(line) for line in log.read_text().splitlines())  # the cut line is gone
    assert [r["score"] for r in resumed["cells"]] == [r["score"] for r in whole["cells"]]


def test_a_changed_configuration_is_refused(tmp_path):
    data = write_custom(tmp_path / "data", ["Say it."] * 2, [["x"]] * 2)
    args = dict(methods=["random"], data={"custom": str(data)}, **FAST)
    sweep(SweepConfig("tiny", ["custom"], tmp_path / "run", budgets=[0.25], **args))
    before = (tmp_path / "run" / "run.json").read_text(), read_records(tmp_path / "run")
    with pytest.raises(ValueError, match=r"holds run \w+, whose configuration differs in: budgets\. Resume"):
        sweep(SweepConfig("tiny", ["custom"], tmp_path / "run", budgets=[0.5], **args))
    assert ((tmp_path / "run" / "run.json").read_text(), read_records(tmp_path / "run")) == before
    # what does not change a record (batch size) resumes the same run
    sweep(SweepConfig("tiny", ["custom"], tmp_path / "run", budgets=[0.25], batch_size=2, **args))
    assert read_records(tmp_path / "run") == before[1]


def test_failures_are_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    questions = ["Fine.", "Corrupt image.", "Missing image.", "Too big."]
    data = write_custom(tmp_path / "data", questions, [["x"]] * 4)
    good_png = (data.parent / "1.png").read_bytes()
    (data.parent / "1.png").write_bytes(good_png[:40])  # truncated
    (data.parent / "2.png").unlink()
    real = sweep_module.generate_answers

    def out_of_memory_on_too_big(model, processor, images, questions, *args, **kwargs):
        if "Too big." in questions:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, processor, images, questions, *args, **kwargs)

    monkeypatch.setattr(sweep_module, "generate_answers", out_of_memory_on_too_big)
    args = dict(methods=["random"], budgets=[0.25], data={"custom": str(data)}, **FAST)
    summary = sweep(SweepConfig("tiny", ["custom"], tmp_path / "run", batch_size=4, **args))
    for row in summary["cells"]:
        assert (row["n"], row["failed"], row["missing"]) == (1, 3, 0)
    errors = {r["index"]: r["error"] for r in read_records(tmp_path / "run")}
    assert errors[0] is None
    assert errors[1].startswith(("OSError", "UnidentifiedImageError")) and errors[2].startswith(
        "MissingInputError: image"
    )
    assert errors[3] == "OutOfMemoryError: CUDA out of memory (simulated)"
    # the one good sample, answered after its batch failed, is as when it runs alone
    answered = {r["method"]: r["prediction"] for r in read_records(tmp_path / "run") if r["index"] == 0}
    model, processor = tiny_model()
    alone = {"none": real(model, processor, [[pictures()[0]]], ["Fine."], 2)[0]}
    with tokendrop.patched(model, "random", budget=0.25):
        alone["random"] = real(model, processor, [[pictures()[0]]], ["Fine."], 2)[0]
    assert answered == alone

    # the same command keeps the failures; --retry-failed runs them again
    monkeypatch.setattr(sweep_module, "generate_answers", real)
    (data.parent / "1.png").write_bytes(good_png)
    pictures()[2].save(data.parent / "2.png")
    assert sweep(SweepConfig("tiny", ["custom"], tmp_path / "run", **args))["cells"][0]["failed"] == 3
    summary = sweep(SweepConfig("tiny", ["custom"], tmp_path / "run", retry_failed=True, **args))
    assert [(row["n"], row["failed"]) for row in summary["cells"]] == [(4, 0), (4, 0)]
    assert len(read_records(tmp_path / "run")) == 8


def test_shards_merge_into_the_single_process_result(tmp_path):
    data = write_custom(tmp_path / "data", [f"Say {i}." for i in range(5)], [["x"]] * 5)
    args = dict(methods=["hired"], budgets=[0.25], data={"custom": str(data)}, **FAST)
    single = sweep(SweepConfig("tiny", ["custom"], tmp_path / "single", **args))
    expected = {key(r): r["prediction"] for r in read_records(tmp_path / "single")}

    assert sweep(SweepConfig("tiny", ["custom"], tmp_path / "sharded", rank=1, world_size=2, **args)) is None
    merged = sweep(SweepConfig("tiny", ["custom"], tmp_path / "sharded", rank=0, world_size=2, **args))
    files = [read_records_file(tmp_path / "sharded" / f"records.rank{r}.jsonl") for r in (0, 1)]
    assert {r["index"] for r in files[0]} == {0, 2, 4} and {r["index"] for r in files[1]} == {1, 3}
    assert {key(r): r["prediction"] for r in files[0] + files[1]} == expected
    assert merged["cells"] == single["cells"]

    # a shard run alone, then one process: it does only what is left
    sweep(SweepConfig("tiny", ["custom"], tmp_path / "half", rank=0, world_size=2, **args))
    assert sweep(SweepConfig("tiny", ["custom"], tmp_path / "half", **args))["cells"] == single["cells"]
    assert len(read_records(tmp_path / "half")) == len(expected)


def read_records_file(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_processes_under_torchrun(tmp_path):
    """Real data parallelism: two CPU processes joined over gloo, one shard each, merged once."""
    data = write_custom(tmp_path / "data", [f"Say {i}." for i in range(4)], [["x"]] * 4)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "tokendrop",
        "sweep",
        "--model",
        "tiny",
        "--tasks",
        "custom",
        "--data",
        f"custom={data}",
        "--methods",
        "random",
        "--budgets",
        "0.25",
        "--max-new-tokens",
        "2",
        "--out",
        str(tmp_path / "run"),
        "--no-progress",
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1")
    )
    assert done.returncode == 0, done.stderr[-3000:]
    shards = [read_records_file(tmp_path / "run" / f"records.rank{r}.jsonl") for r in (0, 1)]
    assert sorted(r["index"] for r in shards[0]) == [0, 0, 2, 2] and sorted(r["index"] for r in shards[1]) == [
        1,
        1,
        3,
        3,
    ]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [(c["n"], c["missing"]) for c in summary["cells"]] == [(4, 0), (4, 0)]
    assert done.stdout.count("custom (accuracy)") == 1  # merged and printed once


# --- arguments -------------------------------------------------------------------------


def test_bad_arguments_fail_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    bad = [
        (dict(tasks=["textvqa"], methods=["hird"]), ValueError, "unknown method 'hird'. Did you mean 'hired'?"),
        (dict(tasks=["txtvqa"]), ValueError, "unknown task 'txtvqa'"),
        (dict(tasks="textvqa"), TypeError, "tasks must be a non-empty list"),
        (dict(tasks=["textvqa"], methods=["none"]), ValueError, "unpatched reference"),
        (dict(tasks=["textvqa"], budgets=[0.0]), ValueError, "must be in \\(0, 1\\]"),
        (dict(tasks=["textvqa"], budgets=[0.2, 0.2]), ValueError, "without repeats"),
        (dict(tasks=["textvqa"], methods=["hired"], options={"hired": {"alpah": 1}}), ValueError, "no option 'alpah'"),
        (dict(tasks=["textvqa"], methods=["random"], options={"hired": {"alpha": 0.3}}), ValueError, "does not run"),
        (dict(tasks=["textvqa"], data={"pope": "x"}), ValueError, "--data names task 'pope'"),
        (dict(tasks=["textvqa"], limit=0), ValueError, "limit must be an int >= 1"),
        (dict(tasks=["textvqa"], batch_size=0), ValueError, "batch_size must be an int >= 1"),
        (dict(tasks=["custom"]), ValueError, "pass --data custom=PATH"),
        (dict(tasks=["textvqa"], rank=2, world_size=2), ValueError, "0 <= rank < world_size"),
    ]
    for kwargs, error, message in bad:
        with pytest.raises(error, match=message):
            sweep(SweepConfig("tiny", out=out, **kwargs))
    assert not out.exists()
    with pytest.raises(TypeError, match="needs its processor"):
        sweep(SweepConfig("loaded", ["textvqa"], out), model=torch.nn.Linear(1, 1))
    with pytest.raises(TypeError, match="model must be a preset name"):
        SweepConfig(torch.nn.Linear(1, 1), ["textvqa"], out)


def test_command_line(tmp_path, capsys):
    data = write_custom(tmp_path / "data", ["Say it.", "Say that."], [["x"]] * 2)
    assert (
        main(
            [
                "sweep",
                "--model",
                "tiny",
                "--tasks",
                "custom",
                "--data",
                f"custom={data}",
                "--methods",
                "hired",
                "random",
                "--budgets",
                "0.5",
                "4",
                "--option",
                "hired.alpha=0.25",
                "--option",
                "random.seed=3",
                "--out",
                str(tmp_path / "run"),
                "--max-new-tokens",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    output = capsys.readouterr().out
    assert "custom (accuracy)" in output and "hired" in output and "summary.json" in output
    config = json.loads((tmp_path / "run" / "run.json").read_text())["provenance"]["config"]
    assert config["budgets"] == [0.5, 4] and config["options"] == {"hired": {"alpha": 0.25}, "random": {"seed": 3}}
    for bad in (
        ["--budgets", "0"],
        ["--option", "alpha=0.3"],
        ["--tasks", "nope"],
        ["--data", "custom"],
        ["--limit", "0"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["sweep", "--model", "tiny", "--tasks", "custom", "--out", str(tmp_path / "x"), *bad])
        assert exit_info.value.code == 2


def test_selection_inside_the_tower_is_part_of_the_run_and_checked_first(tmp_path, capsys):
    data = write_custom(tmp_path / "data", ["Say it.", "Say that."], [["x"]] * 2)
    args = dict(methods=["hired"], budgets=[0.25], data={"custom": str(data)}, **FAST)
    # on the tiny preset (features at layer 1 of 3) only layer 0 is below the feature layer:
    # the layer is checked against the loaded model before anything is written
    model, processor = tiny_model()
    with pytest.raises(ValueError, match="not below the feature layer 1"):
        sweep(SweepConfig("tiny", ["custom"], tmp_path / "bad", vision_prune_layer=1, **args), model, processor)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(TypeError, match="vision_prune_layer must be an int"):
        SweepConfig("tiny", ["custom"], tmp_path / "bad", vision_prune_layer=0.5, **args)
    inside = sweep(SweepConfig("tiny", ["custom"], tmp_path / "inside", vision_prune_layer=0, **args))
    after = sweep(SweepConfig("tiny", ["custom"], tmp_path / "after", **args))
    assert inside["run"]["identity"]["vision_prune_layer"] == 0 and "vision_prune_layer" not in after["run"]["identity"]
    assert inside["run"]["provenance"]["config"]["vision_prune_layer"] == 0
    assert [r["kept_pct"] for r in inside["cells"]] == [r["kept_pct"] for r in after["cells"]]
    with pytest.raises(ValueError, match="differs in: vision_prune_layer"):
        sweep(SweepConfig("tiny", ["custom"], tmp_path / "inside", **args))
    argv = ["sweep", "--model", "tiny", "--tasks", "custom", "--data", f"custom={data}", "--methods", "hired"]
    argv += ["--budgets", "0.25", "--vision-prune-layer", "0", "--out", str(tmp_path / "cli"), "--no-progress"]
    assert main([*argv, "--max-new-tokens", "2"]) == 0
    run = json.loads((tmp_path / "cli" / "run.json").read_text())
    assert run["identity"]["vision_prune_layer"] == 0

"""The sweep's records and data under kills, concurrent runs, changed data and bad input
(issue 13): nothing silently wrong, nothing lost."""

import csv
import io
import json
import os
import threading

import pytest
import torch

import tokendrop
from conftest import without_hanging
from test_sweep import FAST, key, tiny_model, write_custom
from tokendrop.eval import sweep as sweep_module
from tokendrop.eval.sweep import REFERENCE, RecordLog, SweepConfig, read_records, sweep


def custom(tmp_path, n=2, answers=None):
    data = write_custom(tmp_path / "data", [f"Say {i}." for i in range(n)], answers or [["x"]] * n)
    return dict(methods=["random"], budgets=[0.25], data={"custom": str(data)}, **FAST), data


def records_line(index, error=None):
    return json.dumps(dict(task="custom", method="random", budget=0.25, index=index, error=error)) + "\n"


class KilledHalfway:
    """A file being written when its process dies: half the data reaches it."""

    def __init__(self, file):
        self.file = file

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()

    def write(self, data):
        self.file.write(data[: len(data) // 2])
        self.file.flush()
        raise KeyboardInterrupt


def test_a_kill_while_rewriting_the_records_loses_none(tmp_path, monkeypatch):
    log = tmp_path / "records.rank0.jsonl"
    lines = [records_line(0), records_line(1, error="OSError: x"), records_line(2)]
    log.write_text("".join(lines) + '{"index": 3, "predic')  # a half-written last line: rewritten on resume
    real_open = io.open

    def open_killed_on_write(file, mode="r", *args, **kwargs):
        opened = real_open(file, mode, *args, **kwargs)
        return KilledHalfway(opened) if "w" in mode and "records" in str(file) else opened

    monkeypatch.setattr(io, "open", open_killed_on_write)  # what pathlib's writes open with
    with pytest.raises(KeyboardInterrupt):
        RecordLog(tmp_path, 0, retry_failed=True)
    monkeypatch.undo()
    assert read_records(tmp_path) == [json.loads(line) for line in lines]

    RecordLog(tmp_path, 0, retry_failed=True).close()  # the rewrite, not killed: failures dropped
    assert log.read_text() == lines[0] + lines[2] and read_records(tmp_path) == [
        json.loads(lines[0]),
        json.loads(lines[2]),
    ]


def test_resume_refuses_records_of_changed_data(tmp_path, monkeypatch):
    args, data = custom(tmp_path)
    sweep(SweepConfig("tiny", ["custom"], tmp_path / "run", **args))
    before = read_records(tmp_path / "run")
    data.write_text(data.read_text().replace('"x"', '"y"'))  # same path and size, other answers
    with pytest.raises(ValueError, match=r"differs in: tasks\.custom\.data_files \(the data changed"):
        sweep(SweepConfig("tiny", ["custom"], tmp_path / "run", **args))
    assert read_records(tmp_path / "run") == before
    sweep(SweepConfig("tiny", ["custom"], tmp_path / "fresh", **args))

    monkeypatch.setattr(tokendrop, "__version__", "0.0.1")
    with pytest.raises(ValueError, match=r"differs in: .*tokendrop \(another tokendrop version"):
        sweep(SweepConfig("tiny", ["custom"], tmp_path / "fresh", **args))


def test_int_and_float_budgets_stay_apart(tmp_path):
    args, _ = custom(tmp_path)
    args["budgets"] = [1, 1.0]  # one token; all tokens
    summary = sweep(SweepConfig("tiny", ["custom"], tmp_path / "run", **args))
    assert [(c["method"], c["budget"], type(c["budget"]), c["n"]) for c in summary["cells"]] == [
        (REFERENCE, None, type(None), 2),
        ("random", 1, int, 2),
        ("random", 1.0, float, 2),
    ]
    one, whole = summary["cells"][1:]
    assert one["kept_pct"] < whole["kept_pct"] == 100.0
    records = read_records(tmp_path / "run")
    assert sorted(type(r["budget"]).__name__ for r in records) == ["NoneType"] * 2 + ["float"] * 2 + ["int"] * 2
    assert {r["kept"] for r in records if r["budget"] == 1 and isinstance(r["budget"], int)} == {1}

    sweep(SweepConfig("tiny", ["custom"], tmp_path / "run", **args))  # resumes: nothing left to do
    assert read_records(tmp_path / "run") == records
    with open(tmp_path / "run" / "summary.csv") as file:
        assert [row["budget"] for row in csv.DictReader(file)] == ["", "1", "1.0"]  # budgets exactly (issue 26)


def test_a_second_sweep_into_the_same_directory_fails_at_once(tmp_path, monkeypatch):
    args, _ = custom(tmp_path, n=4)
    out = tmp_path / "run"
    real = sweep_module.generate_answers
    started, release, errors = threading.Event(), threading.Event(), []

    def held_in_the_first_sweep(*a, **kw):
        if threading.current_thread() is first:
            started.set()
            release.wait(timeout=120)
        return real(*a, **kw)

    def run_first():
        try:
            sweep(SweepConfig("tiny", ["custom"], out, rank=0, world_size=2, **args))
        except BaseException as error:
            errors.append(error)

    monkeypatch.setattr(sweep_module, "generate_answers", held_in_the_first_sweep)
    first = threading.Thread(target=run_first)
    first.start()
    try:
        assert started.wait(timeout=120)
        with pytest.raises(ValueError, match=r"another sweep is writing .*records\.rank0\.jsonl.*another output"):
            sweep(SweepConfig("tiny", ["custom"], out, rank=0, world_size=2, **args))
        assert sweep(SweepConfig("tiny", ["custom"], out, rank=1, world_size=2, **args)) is None  # a data-parallel peer
    finally:
        release.set()
        first.join()
    assert not errors
    records = read_records(out)
    assert len(records) == len({key(r) for r in records}) == 4 * 2


def test_a_model_the_user_patched_is_refused(tmp_path):
    args, _ = custom(tmp_path)
    model, processor = tiny_model()
    handle = tokendrop.patch(model, "random", budget=0.25)
    with pytest.raises(ValueError, match=r"model is patched .*tokendrop\.unpatch\(model\)"):
        sweep(SweepConfig("loaded", ["custom"], tmp_path / "run", **args), model=model, processor=processor)
    assert model._tokendrop_handle is handle and not (tmp_path / "run").exists()


def test_an_image_that_is_not_a_regular_file_fails_its_sample(tmp_path):
    args, data = custom(tmp_path)
    fifo = data.parent / "1.png"
    fifo.unlink()
    os.mkfifo(fifo)
    done = [without_hanging(lambda: sweep(SweepConfig("tiny", ["custom"], tmp_path / "run", **args)), fifo, 90)]
    errors = {r["index"]: r["error"] for r in read_records(tmp_path / "run")}
    assert errors[0] is None and errors[1].startswith("UsageError") and "not a regular file" in errors[1]
    assert [(c["n"], c["failed"]) for c in done[0]["cells"]] == [(1, 1), (1, 1)]


@pytest.fixture
def no_model_load(monkeypatch):
    def load_model(*args, **kwargs):
        raise AssertionError("the model loaded before the data was checked")

    monkeypatch.setattr(sweep_module, "load_model", load_model)


def test_empty_data_and_empty_answers_fail_before_the_model_loads(tmp_path, no_model_load):
    args, data = custom(tmp_path, n=3)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl holds no rows"):
        sweep(SweepConfig("tiny", ["custom"], tmp_path / "run", **dict(args, data={"custom": str(empty)})))
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    for bad in ({"answer": ""}, {"answers": []}, {"answers": ["", " "]}, {"answers": "x"}):
        row = {k: v for k, v in rows[1].items() if k not in ("answer", "answers")} | bad
        data.write_text("".join(json.dumps(r) + "\n" for r in (rows[0], row, rows[2])))
        with pytest.raises(ValueError, match=r"data\.jsonl: custom row 1: .*answer"):
            sweep(SweepConfig("tiny", ["custom"], tmp_path / "run", **args))


def test_broken_input_names_the_file_and_line(tmp_path, no_model_load):
    args, data = custom(tmp_path, n=3)
    rows = data.read_text().splitlines()
    data.write_text("\n".join([rows[0], '["a list", "not a row"]', rows[2]]) + "\n")
    with pytest.raises(ValueError, match=r"data\.jsonl, line 2: expected a JSON object"):
        sweep(SweepConfig("tiny", ["custom"], tmp_path / "run", **args))
    data.write_text("\n".join([rows[0], json.dumps({"image": "1.png", "answer": "x"}), rows[2]]) + "\n")
    with pytest.raises(ValueError, match=r"data\.jsonl: custom row 1: no `question`"):
        sweep(SweepConfig("tiny", ["custom"], tmp_path / "run", **args))


def test_broken_run_files_say_how_to_recover(tmp_path):
    args, _ = custom(tmp_path, n=3)
    out = tmp_path / "run"
    sweep(SweepConfig("tiny", ["custom"], out, **args))
    log = out / "records.rank0.jsonl"
    good = log.read_text()
    lines = good.splitlines(keepends=True)
    log.write_text(lines[0] + "garbage\n" + "".join(lines[1:]))
    for call in (lambda: read_records(out), lambda: sweep(SweepConfig("tiny", ["custom"], out, **args))):
        with pytest.raises(ValueError, match=r"records\.rank0\.jsonl, line 2: not a record.*delete that line"):
            call()
    log.write_text(good)
    for text in ("", "{}", "[1]"):
        (out / "run.json").write_text(text)
        with pytest.raises(ValueError, match=r"run\.json is not a sweep's run file.*delete"):
            sweep(SweepConfig("tiny", ["custom"], out, **args))


def test_arguments_of_the_wrong_type_say_what_was_expected(tmp_path):
    with pytest.raises(TypeError, match=r"methods must be a list of method names.*got 'hired'"):
        sweep(SweepConfig("tiny", ["textvqa"], tmp_path / "run", methods="hired"))
    with pytest.raises(TypeError, match=r"budgets must be a list .*got 0\.5"):
        sweep(SweepConfig("tiny", ["textvqa"], tmp_path / "run", budgets=0.5))
    assert not (tmp_path / "run").exists()


# --- a run's identity covers what decides its answers (issue 26) -------------------------------


def test_resume_refuses_records_of_changed_images(tmp_path):
    args, data = custom(tmp_path)
    sweep(SweepConfig("tiny", ["custom"], tmp_path / "run", **args))
    image = data.parent / "1.png"
    stat = image.stat()
    tokendrop.presets.synthetic_image(38, 96, seed=7).save(image)  # same name, other pixels
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(
        ValueError, match=f"holds answers about images whose files changed since \\(1, first {image}\\)"
    ):
        sweep(SweepConfig("tiny", ["custom"], tmp_path / "run", **args))


def test_resume_refuses_records_of_a_replaced_router(tmp_path):
    from tokendrop.adapters import adapter_for
    from tokendrop.method.router import RouterWeights, fingerprint, save_router

    model, processor = tiny_model()
    folder = tmp_path / "router"
    save_router(RouterWeights(64, 2, seed=1), folder, fingerprint(adapter_for(model)), {})
    args, _ = custom(tmp_path)
    args.update(methods=["router"], options={"router": {"router": str(folder)}})
    sweep(SweepConfig("tiny", ["custom"], tmp_path / "run", **args))
    save_router(RouterWeights(64, 2, seed=2), folder, fingerprint(adapter_for(model)), {})  # same path
    with pytest.raises(ValueError, match=r"differs in: method_files\.router\.router \(a file a method option names"):
        sweep(SweepConfig("tiny", ["custom"], tmp_path / "run", **args))


def test_resume_refuses_records_of_a_passed_model_whose_weights_changed(tmp_path):
    model, processor = tiny_model()
    args, _ = custom(tmp_path)
    sweep(SweepConfig("mine", ["custom"], tmp_path / "run", **args), model=model, processor=processor)
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1.0
    with pytest.raises(ValueError, match=r"differs in: model\.weights \(the model's weights changed"):
        sweep(SweepConfig("mine", ["custom"], tmp_path / "run", **args), model=model, processor=processor)


def test_custom_answers_null_is_refused_and_a_list_is_several_answers(tmp_path, no_model_load):
    from tokendrop.eval.tasks import Custom

    task = Custom()
    for bad in ({"answer": None}, {"answers": ["x", None]}, {"answer": ["x", {"a": 1}]}):
        with pytest.raises(ValueError, match=r"custom row 0: .*answer"):
            task.sample({"question": "q?", "image": "0.png"} | bad, 0, None)
    sample = task.sample({"question": "Which colour?", "answer": ["cyan", "light blue"]}, 0, None)
    assert sample.reference == ["cyan", "light blue"]
    assert task.score("cyan", sample) == 1.0 and task.score("Light blue.", sample) == 1.0
    assert task.score("blue", sample) == 0.0
    args, data = custom(tmp_path)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    rows[1] = {k: v for k, v in rows[1].items() if k != "answers"} | {"answer": None}
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"data\.jsonl: custom row 1: .*answer"):
        sweep(SweepConfig("tiny", ["custom"], tmp_path / "run", **args))


def test_summary_csv_writes_budgets_exactly(tmp_path):
    args, _ = custom(tmp_path, n=1)
    args["budgets"] = [0.00001, 0.00004]
    sweep(SweepConfig("tiny", ["custom"], tmp_path / "run", **args))
    with open(tmp_path / "run" / "summary.csv") as file:
        assert [row["budget"] for row in csv.DictReader(file)] == ["", "1e-05", "4e-05"]


def test_a_mistyped_local_data_path_never_reaches_the_hub(tmp_path, monkeypatch, no_model_load):
    from tokendrop.eval import data as data_module

    monkeypatch.setattr(data_module, "_from_hub", lambda *a: pytest.fail("asked the hub"))
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    for typo in ("data/missing.jsonl", "./data/missing", "data/textvqa", str(tmp_path / "nowhere"), "~/no/such/dir"):
        with pytest.raises(FileNotFoundError, match="no such local file or folder"):
            sweep(SweepConfig("tiny", ["custom"], tmp_path / "run", data={"custom": typo}, **FAST))


def test_a_bad_layer_option_fails_before_the_model_loads(tmp_path, no_model_load):
    args, _ = custom(tmp_path)
    args.update(methods=["hired"], options={"hired": {"select_layer": 99}})
    with pytest.raises(ValueError, match="select_layer=99 is out of range: the vision tower has 3 layers"):
        sweep(SweepConfig("tiny", ["custom"], tmp_path / "run", **args))
    assert not (tmp_path / "run").exists()

"""`tokendrop sweep`: how much accuracy each method keeps at each budget, on your tasks.

    tokendrop sweep --model llava-hf/llava-v1.6-vicuna-7b-hf --tasks textvqa pope \\
        --budgets 0.2 0.4 --out runs/llava-7b
    accelerate launch -m tokendrop sweep ...      # data-parallel: one shard per process

Cells are (task, method, budget), plus one unpatched reference cell per task (method
"none"). The output directory holds:

    run.json                  the configuration, its hash (the run id), versions
    records.rank<R>.jsonl     one record per (task, method, budget, sample): prompt id,
                              prediction, reference, score (or error), tokens kept;
                              appended and flushed one by one by process R
    records.rank<R>.lock      locked while process R writes: a second sweep into the
                              same directory fails at once
    summary.json, summary.csv one row per cell: score, unpatched score, % of it, failures
    plots/<task>.png          score against the share of visual tokens kept, per method

Running the same command again continues where a run stopped: samples with a record are
skipped, a half-written last line is dropped and redone. Another configuration in the same
directory is refused, and so are changed data files and another tokendrop version. A sample
that fails (unreadable image, out of memory) gets a record with its error, and the sweep
goes on.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import fcntl
import hashlib
import json
import os
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from torch import nn
from tqdm.auto import tqdm

import tokendrop

from ..method import METHODS, build as build_method
from ..selection import check_budget
from .data import fingerprint, subset
from ..cli import budget, grouped, key_value, method_option, positive_int
from ..loading import DTYPES, load_model, load_processor
from ..patch import ATTRIBUTE
from ..presets import PRESETS, with_preset_defaults
from .generation import generate_answers
from .tasks import TASKS, Sample, Task, build_task

REFERENCE = "none"  # the method name of the unpatched cell
TASK_METHODS = sorted({name for _, task in TASKS.items() for name in task.methods})
DEFAULT_BUDGETS = (0.1, 0.2, 0.4)


@dataclass(frozen=True)
class Plan:
    """A validated sweep: everything that decides which records exist and what they hold."""

    model: str
    tasks: dict[str, Task]
    data: dict[str, str | None]
    data_files: dict[str, str | None]  # data.fingerprint of each local source
    methods: list[str]
    budgets: list[float | int]
    options: dict[str, dict]
    limit: int | None
    seed: int
    max_new_tokens: dict[str, int]
    dtype: str
    quantization: str | None

    def cells(self) -> list[tuple[str, float | int | None]]:
        return [(REFERENCE, None)] + [(m, b) for m in self.methods for b in self.budgets]

    def config(self) -> dict:
        return dict(
            model=self.model, dtype=self.dtype, quantization=self.quantization,
            tasks={t: {"data": self.data[t] or task.hub[0], "data_files": self.data_files[t],
                       "max_new_tokens": self.max_new_tokens[t]} for t, task in self.tasks.items()},
            methods=self.methods, budgets=self.budgets, options=self.options, limit=self.limit, seed=self.seed,
            generation="greedy", tokendrop=tokendrop.__version__,
        )


def plan_sweep(model_name: str, processor, tasks, methods=None, budgets=DEFAULT_BUDGETS, options=None, data=None,
               limit=None, seed=0, max_new_tokens=None, dtype="auto", quantization=None) -> Plan:
    """Check every argument before the model or any data loads; errors name the valid
    choices. `processor` is the model's, for the methods that read the prompt."""
    if isinstance(tasks, str) or not tasks:
        raise TypeError(f"tasks must be a non-empty list of task names ({', '.join(TASKS.names())}), got {tasks!r}")
    built = {name: build_task(name) for name in tasks}
    if methods is not None and not isinstance(methods, (list, tuple)):
        raise TypeError(f"methods must be a list of method names ({', '.join(METHODS.names())}), got {methods!r}")
    if not isinstance(budgets, (list, tuple)):
        raise TypeError(f"budgets must be a list of fractions in (0, 1] and/or token counts, e.g. [0.1, 64]; "
                        f"got {budgets!r}")
    methods = list(METHODS.names() if methods is None else methods)
    if REFERENCE in methods:
        raise ValueError(f"{REFERENCE!r} is the unpatched reference, evaluated in every sweep: leave it out of methods")
    for name in methods:
        owners = [t for t, task in TASKS.items() if name in task.methods]
        if not owners:
            METHODS.get(name)
        elif any(t not in owners for t in built):
            raise ValueError(f"method {name!r} is evaluation-only, offered by the {', '.join(owners)} task; this "
                             f"sweep also runs {', '.join(t for t in built if t not in owners)}: sweep it separately")
    budgets = [check_budget(b) for b in budgets]
    if not budgets or len(set(map(repr, budgets))) != len(budgets):
        raise ValueError(f"budgets must be a non-empty list without repeats, got {budgets!r}")
    options = {m: dict(o) for m, o in (options or {}).items()}
    for name, opts in options.items():
        if name not in methods:
            raise ValueError(f"options given for method {name!r}, which this sweep does not run ({', '.join(methods)})")
        if "budget" in opts:
            raise ValueError(f"options for {name!r}: the budget is swept; set it with budgets, not options")
        try:
            json.dumps(opts)
        except TypeError:
            raise TypeError(f"options for {name!r} must be plain values (numbers, strings, lists): they are "
                            f"recorded in run.json; got {opts!r}") from None
    for name in methods:
        for budget in budgets:
            cell_method(built.values(), name, budget, processor, options.get(name, {}))
    data = dict(data or {})
    for name in data:
        if name not in built:
            raise ValueError(f"--data names task {name!r}, which this sweep does not run ({', '.join(built)})")
    for value, what in ((limit, "limit"), (max_new_tokens, "max_new_tokens")):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{what} must be an int >= 1 (or None), got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    sources = {t: _source(data.get(t)) for t in built}
    return Plan(
        model=model_name, tasks=built, methods=methods, budgets=budgets, options=options, limit=limit, seed=seed,
        data=sources, data_files={t: fingerprint(source) for t, source in sources.items()},
        max_new_tokens={t: max_new_tokens or task.max_new_tokens for t, task in built.items()},
        dtype=dtype, quantization=quantization,
    )


def cell_method(tasks, name: str, budget, processor, options: dict):
    """The method of a cell, built: a registered one, or a task's own (the testbed's oracle)."""
    for task in tasks:
        if name in task.methods:
            return task.methods[name](budget=budget, **options)
    return build_method(name, budget=budget, processor=processor, **options)


def _source(source) -> str | None:
    """A local path made absolute (so that the run's identity does not depend on the working
    directory), a hub id kept as given, None for the task's default."""
    if source is None:
        return None
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else str(source)


# --- the output directory -------------------------------------------------------------


def claim_run(out: Path, plan: Plan) -> str:
    """Create run.json, or check that the one there describes the same sweep; the run id."""
    config = plan.config()
    run_id = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    out.mkdir(parents=True, exist_ok=True)
    path = out / "run.json"
    run = dict(run_id=run_id, config=config, created=datetime.datetime.now().astimezone().isoformat(),
               versions=dict(tokendrop=tokendrop.__version__, torch=torch.__version__,
                             transformers=transformers.__version__, python=sys.version.split()[0]))
    scratch = out / f".run.json.{os.getpid()}"
    scratch.write_text(json.dumps(run, indent=2) + "\n")
    try:
        os.link(scratch, path)  # atomic create-if-absent: the first process of a launch wins
    except FileExistsError:
        pass
    finally:
        scratch.unlink()
    try:
        existing = json.loads(path.read_text())
        existing_id, existing_config = existing["run_id"], existing["config"]
    except (ValueError, TypeError, KeyError):
        raise ValueError(f"{path} is not a sweep's run file (it is empty or cut short): delete {out} to start "
                         "the sweep over, or give it another output directory") from None
    if existing_id != run_id:
        changed = ", ".join(f"{k}{WHY_CHANGED.get(k.split('.')[-1], '')}" for k in _differences(config, existing_config))
        raise ValueError(
            f"{out} holds run {existing_id}, whose configuration differs in: {changed}. "
            "Resume it with the same arguments, or give this sweep another output directory"
        )
    return run_id


WHY_CHANGED = {  # what a changed key means, where its name does not say
    "data_files": " (the data changed since the run began: its records would be stale)",
    "tokendrop": " (another tokendrop version: its records may differ)",
}


def _differences(new: dict, old: dict, prefix: str = "") -> list[str]:
    """Dotted names of the keys whose values differ, nested dicts walked into."""
    changed = []
    for k in sorted(set(new) | set(old)):
        a, b = new.get(k), old.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _differences(a, b, f"{prefix}{k}.")
        elif json.dumps(a) != json.dumps(b):  # 1 and 1.0 differ
            changed.append(prefix + k)
    return changed


def read_records(out: Path) -> list[dict]:
    """Every complete record of every process."""
    return [r for path in sorted(out.glob("records.rank*.jsonl")) for r in _parse(path, path.read_text(encoding="utf-8"))]


RECORD_KEYS = {"task", "method", "budget", "index", "error"}


def _parse(path: Path, text: str) -> list[dict]:
    """The records of one file. A last line without its newline is a write cut short (by a
    kill, or by a process still writing): it is not a record."""
    records = []
    for number, line in enumerate(text.split("\n")[:-1], 1):
        if not line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or not RECORD_KEYS <= record.keys():
            raise ValueError(f"{path}, line {number}: not a record. To redo only its sample, delete that line; "
                             "to start the sweep over, delete the directory")
        records.append(record)
    return records


@contextmanager
def _locked(out: Path, rank: int):
    """Hold this rank's lock for the block: two sweeps writing one records file would
    duplicate samples. Ranks of one launch lock their own files."""
    with open(out / f"records.rank{rank}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"another sweep is writing {out / f'records.rank{rank}.jsonl'} now: wait for it to end, "
                             "or give this sweep another output directory") from None
        yield  # the lock goes with the file: closed here, or by the system when the process dies


class RecordLog:
    """This process's records file, appended and flushed one record at a time."""

    def __init__(self, out: Path, rank: int, retry_failed: bool):
        self.path = out / f"records.rank{rank}.jsonl"
        if self.path.exists():
            text = self.path.read_text(encoding="utf-8")
            records = _parse(self.path, text)
            kept = [r for r in records if r["error"] is None] if retry_failed else records
            if len(kept) < len(records) or (text and not text.endswith("\n")):  # failures to redo, or a cut line
                scratch = self.path.with_name(f".{self.path.name}.tmp")
                scratch.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
                os.replace(scratch, self.path)  # atomic: a kill leaves the old records or the new ones
        self.file = open(self.path, "a", encoding="utf-8")

    def __enter__(self) -> "RecordLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()  # a killed process loses no finished record

    def close(self) -> None:
        self.file.close()


def key(task: str, method: str, budget, index: int) -> tuple:
    return task, method, _budget_id(budget), index


def _budget_id(budget) -> str | None:
    """1 (one token) and 1.0 (every token) are equal in Python, but different budgets."""
    return None if budget is None else repr(budget)


# --- running --------------------------------------------------------------------------


def sweep(model: str | nn.Module, tasks, out: str | Path, *, processor=None, methods=None,
          budgets=DEFAULT_BUDGETS, options: dict[str, dict] | None = None, data: dict[str, str] | None = None,
          limit: int | None = None, seed: int = 0, batch_size: int = 1, max_new_tokens: int | None = None,
          dtype: str = "auto", device_map=None, load_in_4bit: bool = False, load_in_8bit: bool = False,
          rank: int | None = None, world_size: int | None = None, retry_failed: bool = False,
          progress: bool = True) -> dict | None:
    """Evaluate `methods` x `budgets` x `tasks` (plus the unpatched model) and write records,
    summary and plots to `out`. Returns the summary on the process that writes it (rank 0),
    None on the others.

    `model`: an embedded preset name, a Hugging Face id or local path, or a loaded
    LlavaNext model (then pass its `processor`). `methods` defaults to every registered
    method. `options`: {method: {option: value}}. `data`: {task: local path or hub id}.
    `limit`: evaluate that many samples per task, the same ones (drawn with `seed`) in every
    cell. `rank`/`world_size`: this process's shard; by default taken from `accelerate launch`
    (one process: everything)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(model, nn.Module):
        if processor is None:
            raise TypeError("a loaded model needs its processor: sweep(model, ..., processor=processor)")
        name = getattr(model, "name_or_path", "") or type(model).__name__
        handle = model.__dict__.get(ATTRIBUTE)
        if handle is not None:  # its reference cell would not be the unpatched model
            raise ValueError(f"the model is patched ({handle!r}): a sweep patches it itself, cell by cell, and "
                             "runs it unpatched for the reference. Call tokendrop.unpatch(model) first")
    elif isinstance(model, str):
        name = model
    else:
        raise TypeError(f"model must be a preset name, a Hugging Face id/path or a loaded model, got {type(model).__name__}")
    quantization = "4bit" if load_in_4bit else "8bit" if load_in_8bit else None
    if isinstance(model, str):
        processor = load_processor(model)  # small, and some methods need it to validate their options
        options = with_preset_defaults(model, METHODS.names() if methods is None else methods, options or {})
    plan = plan_sweep(name, processor, tasks, methods, budgets, options, data, limit, seed, max_new_tokens, dtype,
                      quantization)
    rank, world_size, state = _shard(rank, world_size)
    subsets, samples = {}, {}
    for task_name, task in plan.tasks.items():  # data problems surface before the model loads
        source = plan.data[task_name] or task.hub[0]
        rows, image_of = task.load(plan.data[task_name])
        if len(rows) == 0:
            raise ValueError(f"{task_name}: {source} holds no rows: point --data {task_name}=... at the data")
        subsets[task_name] = subset(len(rows), plan.limit, plan.seed)
        mine = subsets[task_name][rank::world_size]
        samples[task_name] = [_sample(task, source, rows[i], i, image_of) for i in mine]
    out = Path(out)
    claim_run(out, plan)
    with _locked(out, rank), RecordLog(out, rank, retry_failed) as log:
        if isinstance(model, str):
            if state is not None and device_map is None:
                device_map = {"": state.device}  # data-parallel: a whole model per process
            model = load_model(model, dtype, device_map, load_in_4bit, load_in_8bit)
        done = {key(r["task"], r["method"], r["budget"], r["index"]) for r in read_records(out)}
        for task_name, task in plan.tasks.items():
            for method, budget in plan.cells():
                pending = [s for s in samples[task_name] if key(task_name, method, budget, s.index) not in done]
                _run_cell(model, processor, task, plan, method, budget, pending, batch_size, log,
                          progress and rank == 0)
    if state is not None:
        state.wait_for_everyone()
    if rank != 0:
        return None
    return summarize(out, plan, subsets)


def _sample(task: Task, source: str, row: dict, index: int, image_of) -> Sample:
    try:
        return task.sample(row, index, image_of(row, index))
    except KeyError as error:
        raise ValueError(f"{source}: {task.name} row {index}: no field {error}") from None
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None


def _shard(rank, world_size):
    """(rank, world_size, accelerate state or None): explicit, or from `accelerate launch`."""
    if rank is None and world_size is None:
        from accelerate import PartialState

        # without a GPU, processes started by `torchrun` (or `accelerate launch --cpu`) join over gloo
        cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
        state = PartialState(cpu=cpu)
        return state.process_index, state.num_processes, state if state.num_processes > 1 else None
    if rank is None or world_size is None or not 0 <= rank < world_size:
        raise ValueError(f"give both rank and world_size, with 0 <= rank < world_size; got {rank!r}, {world_size!r}")
    return rank, world_size, None


def _run_cell(model, processor, task: Task, plan: Plan, method: str, budget, pending: list[Sample],
              batch_size: int, log: RecordLog, show: bool) -> None:
    label = f"{task.name} {method}" + ("" if budget is None else f" {budget}")
    bar = tqdm(total=len(pending), desc=label, disable=not show or not pending, leave=True)
    patching = nullcontext() if method == REFERENCE else tokendrop.patched(
        model, cell_method([task], method, budget, processor, plan.options.get(method, {})))
    with patching as handle:
        for start in range(0, len(pending), batch_size):
            for record in run_batch(model, processor, task, pending[start : start + batch_size], handle,
                                    plan.max_new_tokens[task.name]):
                log.write(dict(record, task=task.name, method=method, budget=budget))
                if record["error"] is not None:
                    bar.write(f"{label}: sample {record['id']} failed: {record['error']}")
                bar.update(1)
    bar.close()


def run_batch(model, processor, task: Task, samples: list[Sample], handle, max_new_tokens: int) -> list[dict]:
    """One record per sample. A failing batch is retried one sample at a time, so that only
    the samples that fail by themselves are recorded as failed."""
    records, ready, images = [], [], []
    for sample in samples:
        try:
            images.append(sample.image())
            ready.append(sample)
        except Exception as error:  # an unreadable image fails its sample only
            records.append(_record(sample, error=error))
    if not ready:
        return records
    task.before_batch(None if handle is None else handle.method, ready)
    try:
        answers = generate_answers(model, processor, [[image] for image in images], [s.question for s in ready],
                                   max_new_tokens)
    except Exception as error:  # out of memory, or one sample the model cannot take
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(ready) == 1:
            return records + [_record(ready[0], error=error)]
        return records + [r for s in ready for r in run_batch(model, processor, task, [s], handle, max_new_tokens)]
    kept = handle.last if handle is not None else [None] * len(ready)  # one image per sample
    for sample, answer, image_record in zip(ready, answers, kept):
        records.append(_record(sample, answer, task.score(answer, sample), image_record))
    return records


def _record(sample: Sample, prediction=None, score=None, image_record=None, error=None) -> dict:
    return dict(
        index=sample.index, id=sample.id, question=sample.question, prediction=prediction,
        reference=sample.reference, score=score,
        error=None if error is None else f"{type(error).__name__}: {error}",
        kept=None if image_record is None else image_record.n_kept,
        before=None if image_record is None else image_record.n_before,
        meta=sample.meta,
    )


# --- merging --------------------------------------------------------------------------


def summarize(out: Path, plan: Plan, subsets: dict[str, list[int]]) -> dict:
    """Merge every process's records into summary.json / summary.csv and the plots."""
    out = Path(out)
    wanted = {(t, m, _budget_id(b)): set(subsets[t]) for t in plan.tasks for m, b in plan.cells()}
    cells: dict[tuple, dict[int, dict]] = {cell: {} for cell in wanted}
    for r in read_records(out):
        cell = (r["task"], r["method"], _budget_id(r["budget"]))
        if cell in wanted and r["index"] in wanted[cell]:
            cells[cell][r["index"]] = r
    budgets = {_budget_id(b): b for b in plan.budgets}
    rows = []
    for (task_name, method, budget_id), by_index in cells.items():
        task, budget = plan.tasks[task_name], budgets.get(budget_id)
        good = [r for r in by_index.values() if r["error"] is None]
        counted = [r for r in good if r["kept"] is not None]
        metrics = task.metrics(good) if good else {}
        rows.append(dict(
            task=task_name, method=method, budget=budget, n=len(good), failed=len(by_index) - len(good),
            missing=len(wanted[(task_name, method, budget_id)]) - len(by_index), metric=task.headline,
            score=metrics.get(task.headline),
            kept_pct=100 * sum(r["kept"] for r in counted) / sum(r["before"] for r in counted) if counted else None,
            metrics=metrics,
        ))
    reference = {r["task"]: r["score"] for r in rows if r["method"] == REFERENCE}
    for row in rows:
        row["unpatched"] = reference[row["task"]]
        both = row["score"] is not None and row["unpatched"]
        row["pct_of_unpatched"] = 100 * row["score"] / row["unpatched"] if both else None
    summary = dict(run=json.loads((out / "run.json").read_text()), cells=rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _write_csv(out / "summary.csv", rows)
    plot(out / "plots", rows)
    return summary


COLUMNS = ("task", "method", "budget", "n", "failed", "missing", "metric", "score", "unpatched", "pct_of_unpatched",
           "kept_pct")


def _write_csv(path: Path, rows: list[dict]) -> None:
    metric_names = sorted({name for row in rows for name in row["metrics"]})
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(COLUMNS + tuple(metric_names))
        for row in rows:
            writer.writerow([_cell(row[c]) for c in COLUMNS] + [_cell(row["metrics"].get(m)) for m in metric_names])


def _cell(value) -> str:
    if value is None:
        return ""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def format_summary(summary: dict) -> str:
    """The summary as one plain-text table per task."""
    blocks = []
    header = ("method", "budget", "n", "failed", "missing", "score", "% unpatched", "tokens kept %")
    tasks = dict.fromkeys(r["task"] for r in summary["cells"])
    for task in tasks:
        rows = [r for r in summary["cells"] if r["task"] == task]
        lines = [header] + [(
            r["method"], "-" if r["budget"] is None else str(r["budget"]), str(r["n"]), str(r["failed"]),
            str(r["missing"]), _fmt(r["score"]), _fmt(r["pct_of_unpatched"], "{:.1f}"), _fmt(r["kept_pct"], "{:.1f}"),
        ) for r in rows]
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        table = "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines)
        blocks.append(f"{task} ({rows[0]['metric']})\n{table}")
    return "\n\n".join(blocks)


def _fmt(value, pattern="{:.2f}") -> str:
    return "-" if value is None else pattern.format(value)


def plot(folder: Path, rows: list[dict]) -> None:
    """One PNG per task: score against the share of visual tokens kept, a line per method,
    the unpatched model dashed. The x axis is measured, so fractions and token counts (and
    methods whose count adapts) share it."""
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone

    folder.mkdir(exist_ok=True)
    for task in dict.fromkeys(r["task"] for r in rows):
        cells = [r for r in rows if r["task"] == task]
        figure = Figure(figsize=(6, 4), layout="constrained")
        axes = figure.add_subplot()
        for method in dict.fromkeys(r["method"] for r in cells if r["method"] != REFERENCE):
            points = sorted((r["kept_pct"], r["score"]) for r in cells
                            if r["method"] == method and r["score"] is not None and r["kept_pct"] is not None)
            if points:
                axes.plot(*zip(*points), marker="o", label=method)
        unpatched = cells[0]["unpatched"]
        if unpatched is not None:
            axes.axhline(unpatched, linestyle="--", color="gray", label="unpatched")
        axes.set(title=task, xlabel="visual tokens kept (% of the unpatched model's)", ylabel=cells[0]["metric"])
        axes.grid(alpha=0.3)
        axes.legend()
        figure.savefig(folder / f"{task}.png", dpi=120)


# --- command line ---------------------------------------------------------------------


def add_sweep_parser(subparsers) -> argparse.ArgumentParser:
    """Register `sweep` on an argparse subparsers object."""
    help = "evaluate methods x budgets x tasks on a model: records, summary table and plots"
    parser = subparsers.add_parser("sweep", help=help, description=help)
    parser.add_argument("--model", required=True,
                        help=f"a Hugging Face id or local path of a LlavaNext checkpoint, or a preset "
                             f"({', '.join(PRESETS.names())}; testbed is trained for --tasks testbed)")
    parser.add_argument("--tasks", nargs="+", required=True, choices=TASKS.names())
    parser.add_argument("--out", required=True, type=Path, help="output directory; rerun into it to resume")
    parser.add_argument("--methods", nargs="+", choices=METHODS.names() + TASK_METHODS,
                        help="default: every registered method; oracle (testbed only, evaluation only) keeps the "
                             "queried object's tokens first")
    parser.add_argument("--budgets", nargs="+", type=budget, default=list(DEFAULT_BUDGETS),
                        help="fractions in (0, 1], or token counts per image (integers without a dot)")
    parser.add_argument("--option", dest="options", action="append", type=method_option, default=[],
                        metavar="METHOD.OPTION=VALUE", help="a method option, e.g. hired.alpha=0.3; repeatable")
    parser.add_argument("--data", action="append", type=key_value, default=[], metavar="TASK=PATH",
                        help="a local copy (parquet, save_to_disk, JSONL) or hub id for a task; repeatable")
    parser.add_argument("--limit", type=positive_int, help="samples per task, drawn with --seed (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=positive_int, default=1)
    parser.add_argument("--max-new-tokens", type=positive_int, help="default: per task (16; custom 32)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="auto")
    parser.add_argument("--device-map", help='passed to from_pretrained, e.g. auto, cpu, cuda:0 (default: auto with a GPU)')
    quantize = parser.add_mutually_exclusive_group()
    quantize.add_argument("--load-in-4bit", action="store_true")
    quantize.add_argument("--load-in-8bit", action="store_true")
    parser.add_argument("--retry-failed", action="store_true", help="run failed samples again instead of keeping their error")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(run=run_command)
    return parser


def run_command(args) -> None:
    options = grouped(args.options)
    summary = sweep(
        args.model, args.tasks, args.out, methods=args.methods, budgets=args.budgets, options=options,
        data=dict(args.data), limit=args.limit, seed=args.seed, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, dtype=args.dtype, device_map=args.device_map,
        load_in_4bit=args.load_in_4bit, load_in_8bit=args.load_in_8bit, retry_failed=args.retry_failed,
        progress=not args.no_progress,
    )
    if summary is not None:  # the process that merged
        print(format_summary(summary))
        print(f"\nrecords, summary.json, summary.csv and plots/ in {args.out}")


def main(argv: list[str] | None = None) -> int:
    """`python -m tokendrop.eval.sweep ...`, the same as `tokendrop sweep ...`."""
    parser = argparse.ArgumentParser(prog="tokendrop")
    add_sweep_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["sweep", *(sys.argv[1:] if argv is None else argv)])
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`tokendrop sweep`: how much accuracy each method keeps at each budget, on your tasks.

    tokendrop sweep --model llava-hf/llava-v1.6-vicuna-7b-hf --tasks textvqa pope \\
        --budgets 0.2 0.4 --out runs/llava-7b
    accelerate launch -m tokendrop sweep ...      # data-parallel: one shard per process

Cells are (task, method, budget), plus one unpatched reference cell per task (method
"none"). The output directory holds:

    run.json                  the run's identity (model revision or weights, data, methods,
                              tokendrop version; hashed, the run id) and provenance (the
                              configuration as given, git revision, versions, device)
    records.rank<R>.jsonl     one record per (task, method, budget, sample): prompt id,
                              prediction, reference, score (or error), tokens kept;
                              appended and flushed one by one by process R
    records.rank<R>.lock      locked while process R writes: a second sweep into the
                              same directory fails at once
    summary.json, summary.csv one row per cell: score, unpatched score, % of it, failures
    plots/<task>.png          score against the share of visual tokens kept, per method

Running the same command again continues where a run stopped: samples with a record are
skipped, a half-written last line is dropped and redone. Another configuration in the same
directory is refused, and so are changed data files, changed images of answered samples, a
replaced router file, a passed-in model whose weights changed and another tokendrop version. A sample
that fails (unreadable image, out of memory) gets a record with its error, and the sweep
goes on.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

import tokendrop

from ..adapters import adapter_for
from ..checks import UsageError, UsageTypeError, is_int
from ..family import ModelFacts
from ..files import image_digest, locked
from ..harness import REFERENCE, differences, jsonable, method_options, provenance, text_table
from ..loading import LoadOptions, check_model_name, load_model, load_processor, model_facts
from ..method import METHODS, build as build_method
from ..method.base import check_fits
from ..patch import handle_of, resolve
from ..preset_specs import with_preset_defaults
from ..selection import check_budget
from .data import fingerprint, subset
from .generation import generate_answers
from .tasks import TASKS, Sample, Task, build_task, current_task_name

TASK_METHODS = sorted({name for _, task in TASKS.items() for name in task.methods})
DEFAULT_BUDGETS = (0.1, 0.2, 0.4)


@dataclass
class SweepConfig:
    """Everything a sweep is asked to do, checked when made (before any model or data loads);
    errors name the valid choices. The command line builds one from its arguments; run.json
    records it.

        sweep(SweepConfig("testbed", ["shapes"], "runs/x", methods=["hired"], budgets=[0.2], limit=200))

    `model`: an embedded preset, a Hugging Face id or a local path (for a loaded model, pass
    it to `sweep(config, model=..., processor=...)` and name it here). `methods`: default every
    registered method. `options`: {method: {option: value}}. `data`: {task: local path or hub
    id}. `limit`: that many samples per task, the same ones (drawn with `seed`) in every cell.
    `rank`/`world_size`: this process's shard; by default taken from `accelerate launch`.
    `vision_prune_layer`: every method selects inside the vision tower at that vision layer
    (`patch`'s option; checked against the model once it loads); None: after the tower."""

    model: str
    tasks: list[str]
    out: Path
    methods: list[str] | None = None
    budgets: list[float | int] = field(default_factory=lambda: list(DEFAULT_BUDGETS))
    options: dict[str, dict] = field(default_factory=dict)
    vision_prune_layer: int | None = None
    data: dict[str, str] = field(default_factory=dict)
    limit: int | None = None
    seed: int = 0
    batch_size: int = 1
    max_new_tokens: int | None = None
    dtype: str = "auto"
    device_map: str | dict | None = None
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    attn_implementation: str | None = None
    rank: int | None = None
    world_size: int | None = None
    retry_failed: bool = False
    progress: bool = True

    def __post_init__(self):
        if not isinstance(self.model, str):
            raise UsageTypeError(
                f"model must be a preset name or a Hugging Face id/path (pass a loaded model to "
                f"sweep(config, model=...)), got {type(self.model).__name__}"
            )
        if isinstance(self.tasks, str) or not isinstance(self.tasks, (list, tuple)) or not self.tasks:
            raise UsageTypeError(
                f"tasks must be a non-empty list of task names ({', '.join(TASKS.names())}), got {self.tasks!r}"
            )
        self.tasks = [current_task_name(name) for name in self.tasks]  # an old name runs as the task it now is
        for name in self.tasks:
            TASKS.get(name)
        if self.methods is not None and not isinstance(self.methods, (list, tuple)):
            raise UsageTypeError(
                f"methods must be a list of method names ({', '.join(METHODS.names())}), got {self.methods!r}"
            )
        self.methods = list(METHODS.names() if self.methods is None else self.methods)
        if REFERENCE in self.methods:
            raise UsageError(
                f"{REFERENCE!r} is the unpatched reference, evaluated in every sweep: leave it out of methods"
            )
        for name in self.methods:
            owners = [t for t, task in TASKS.items() if name in task.methods]
            if not owners:
                METHODS.get(name)
            elif any(t not in owners for t in self.tasks):
                raise UsageError(
                    f"method {name!r} is evaluation-only, offered by the {', '.join(owners)} task; "
                    f"this sweep also runs {', '.join(t for t in self.tasks if t not in owners)}: "
                    "sweep it separately"
                )
        if not isinstance(self.budgets, (list, tuple)):
            raise UsageTypeError(
                f"budgets must be a list of fractions in (0, 1] and/or token counts, e.g. [0.1, 64]; "
                f"got {self.budgets!r}"
            )
        self.budgets = [check_budget(b) for b in self.budgets]
        if not self.budgets or len(set(map(repr, self.budgets))) != len(self.budgets):
            raise UsageError(f"budgets must be a non-empty list without repeats, got {self.budgets!r}")
        self.options = method_options(self.options, self.methods, "this sweep", "swept")
        for name, opts in self.options.items():
            try:
                json.dumps(opts)
            except TypeError:
                raise UsageTypeError(
                    f"options for {name!r} must be plain values (numbers, strings, lists): they are "
                    f"recorded in run.json; got {opts!r}"
                ) from None
        self.data = {current_task_name(name): source for name, source in dict(self.data or {}).items()}
        for name in self.data:
            if name not in self.tasks:
                raise UsageError(f"--data names task {name!r}, which this sweep does not run ({', '.join(self.tasks)})")
        for value, what in ((self.limit, "limit"), (self.max_new_tokens, "max_new_tokens")):
            if value is not None and (not is_int(value) or value < 1):
                raise UsageError(f"{what} must be an int >= 1 (or None), got {value!r}")
        if not is_int(self.seed):
            raise UsageTypeError(f"seed must be an int, got {self.seed!r}")
        if self.vision_prune_layer is not None and not is_int(self.vision_prune_layer):
            raise UsageTypeError(
                f"vision_prune_layer must be an int (a vision layer index) or None, got {self.vision_prune_layer!r}"
            )
        if not is_int(self.batch_size) or self.batch_size < 1:
            raise UsageError(f"batch_size must be an int >= 1, got {self.batch_size!r}")
        self.load_options()  # raises where they are wrong, before any model loads
        if (self.rank is None) != (self.world_size is None) or (
            self.rank is not None and not 0 <= self.rank < self.world_size
        ):
            raise UsageError(
                f"give both rank and world_size, with 0 <= rank < world_size; got {self.rank!r}, {self.world_size!r}"
            )
        self.out = Path(self.out)

    def load_options(self) -> LoadOptions:
        return LoadOptions(self.dtype, self.device_map, self.load_in_4bit, self.load_in_8bit, self.attn_implementation)

    @property
    def quantization(self) -> str | None:
        return self.load_options().quantization


@dataclass(frozen=True)
class Plan:
    """A validated sweep: everything that decides which records exist and what they hold."""

    config: SweepConfig
    model: dict  # model_identity: the name and the revision or weights fingerprint
    tasks: dict[str, Task]
    data: dict[str, str | None]
    data_files: dict[str, str | None]  # data.fingerprint of each local source
    options: dict[str, dict]  # the config's, with the preset's defaults
    max_new_tokens: dict[str, int]
    method_files: dict[str, dict[str, str]]  # {method: {option: digest}} of the files options name

    @property
    def methods(self) -> list[str]:
        return self.config.methods

    @property
    def budgets(self) -> list[float | int]:
        return self.config.budgets

    def cells(self) -> list[tuple[str, float | int | None]]:
        return [(REFERENCE, None)] + [(m, b) for m in self.methods for b in self.budgets]

    def identity(self) -> dict:
        """What decides the records: its hash is the run id. A change here (another model
        revision or weights, other data files, another router file, another tokendrop)
        never resumes into the same records (each record holds its image's digest: see
        `stale_images`). Method-file digests are there only where a run has them, so that a
        run without keeps its id."""
        c = self.config
        identity = dict(
            model=self.model,
            dtype=c.dtype,
            quantization=c.quantization,
            tasks={
                t: {
                    "data": self.data[t] or task.hub[0],
                    "data_files": self.data_files[t],
                    "max_new_tokens": self.max_new_tokens[t],
                }
                for t, task in self.tasks.items()
            },
            methods=c.methods,
            budgets=c.budgets,
            options=self.options,
            # where methods select; absent after the tower, so that earlier runs keep their id
            **({} if c.vision_prune_layer is None else {"vision_prune_layer": c.vision_prune_layer}),
            limit=c.limit,
            seed=c.seed,
            generation="greedy",
            tokendrop=tokendrop.__version__,
        )
        return identity | ({"method_files": self.method_files} if self.method_files else {})


def plan_sweep(config: SweepConfig, processor, model: nn.Module | None = None) -> Plan:
    """Check what needs the processor and the model's configuration (every method built at
    every budget, and checked against the model as `patch` checks it) and fix what the run's
    identity holds: the model's revision or weights, the data files, the files method options
    name. `model`: a loaded model, when the sweep was given one."""
    options = with_preset_defaults(config.model, config.methods, config.options)  # a preset's, for a preset name
    built = {name: build_task(name) for name in config.tasks}
    methods = check_methods(config, built, processor, options, model_facts(config.model) if model is None else model)
    method_files = {name: files for name, files in methods.items() if files}
    sources = {t: _source(config.data.get(t)) for t in built}
    return Plan(
        config=config,
        model=model_identity(config.model, model),
        tasks=built,
        options=options,
        data=sources,
        data_files={t: fingerprint(source) for t, source in sources.items()},
        max_new_tokens={t: config.max_new_tokens or task.max_new_tokens for t, task in built.items()},
        method_files=method_files,
    )


def check_methods(config: SweepConfig, tasks, processor, options: dict, model) -> dict[str, dict[str, str]]:
    """Build every method at every budget and check it against `model` (a loaded model, or
    the `ModelFacts` of its configuration before it loads): a bad option (a layer the tower
    lacks, a router trained for another model) fails before any cell runs. Returns each
    method's `files()`."""
    adapter = model if isinstance(model, ModelFacts) else adapter_for(model)
    files = {}
    for name in config.methods:
        for budget in config.budgets:
            method = cell_method(tasks.values(), name, budget, processor, options.get(name, {}))
            check_fits(method, adapter)
        files[name] = method.files()
    return files


def model_identity(name: str, model: nn.Module | None = None) -> dict:
    """What tells one model's weights from another's: a loaded model's weights themselves (a
    hash of every tensor: it may have changed since it loaded), else cheaply, a preset's
    committed weights file or its seed, a local checkpoint's files (names, sizes,
    modification times), a hub checkpoint's commit. Part of the run id: new weights never
    resume into old records."""
    from ..preset_specs import PRESETS

    if model is not None:
        return {"name": name, "weights": weights_digest(model)}
    if name in PRESETS.names():
        if PRESETS.get(name).get("task"):
            from ..testbed import WEIGHTS

            return {"name": name, "weights": hashlib.sha256(WEIGHTS.read_bytes()).hexdigest()[:16]}
        return {"name": name, "weights": "random, seed 0"}
    path = Path(name).expanduser()
    if path.is_dir():
        return {"name": str(path.resolve()), "weights": fingerprint(str(path))}
    from transformers import AutoConfig

    return {"name": name, "revision": getattr(AutoConfig.from_pretrained(name), "_commit_hash", None)}


def weights_digest(model: nn.Module) -> str:
    """A hash of every tensor of `model` (name, dtype, shape and bytes), read one at a time:
    a model changed in memory is another model. Tensors that live nowhere (meta, offloaded)
    count by name and shape alone."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}\x00{tensor.dtype}\x00{tuple(tensor.shape)}\x00".encode())
        if tensor.device.type != "meta":
            digest.update(tensor.detach().reshape(-1).view(torch.uint8).cpu().numpy())
    return digest.hexdigest()[:16]


def cell_method(tasks, name: str, budget, processor, options: dict):
    """The method of a cell, built: a registered one, or a task's own (the shapes task's oracle)."""
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
    """Create run.json, or check that the one there describes the same sweep; the run id.
    run.json: {run_id, identity (what the id hashes), provenance (the config as given, date,
    git revision, versions, device)}."""
    identity = jsonable(plan.identity())
    run_id = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    try:
        out.mkdir(parents=True, exist_ok=True)
        scratch = out / f".run.json.{os.getpid()}"
        run = dict(run_id=run_id, identity=identity, provenance=provenance(plan.config))
        scratch.write_text(json.dumps(run, indent=2) + "\n")
    except OSError as error:
        raise UsageError(f"cannot write to {out}: {error.strerror or error}; pick a folder you can write") from None
    path = out / "run.json"
    try:
        os.link(scratch, path)  # atomic create-if-absent: the first process of a launch wins
    except FileExistsError:
        pass
    finally:
        scratch.unlink()
    try:
        existing = json.loads(path.read_text())
        existing_id, existing_config = existing["run_id"], existing["identity"]
    except (ValueError, TypeError, KeyError):
        raise UsageError(
            f"{path} is not a sweep's run file (it is empty or cut short): delete {out} to start "
            "the sweep over, or give it another output directory"
        ) from None
    if existing_id != run_id:
        changed = ", ".join(
            f"{k}{next((WHY_CHANGED[p] for p in reversed(k.split('.')) if p in WHY_CHANGED), '')}"
            for k in differences(identity, existing_config)
        )
        raise UsageError(
            f"{out} holds run {existing_id}, whose configuration differs in: {changed}. "
            "Resume it with the same arguments, or give this sweep another output directory"
        )
    return run_id


WHY_CHANGED = {  # what a changed key means, where its name does not say
    "data_files": " (the data changed since the run began: its records would be stale)",
    "method_files": " (a file a method option names changed since the run began: its records would be stale)",
    "tokendrop": " (another tokendrop version: its records may differ)",
    "revision": " (another revision of the model: its records would be stale)",
    "weights": " (the model's weights changed: its records would be stale)",
}


def read_records(out: Path) -> list[dict]:
    """Every complete record of every process."""
    return [
        r for path in sorted(out.glob("records.rank*.jsonl")) for r in _parse(path, path.read_text(encoding="utf-8"))
    ]


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
            raise UsageError(
                f"{path}, line {number}: not a record. To redo only its sample, delete that line; "
                "to start the sweep over, delete the directory"
            )
        records.append(record)
    return records


def _locked(out: Path, rank: int):
    """Hold this rank's lock for the block: two sweeps writing one records file would
    duplicate samples. Ranks of one launch lock their own files."""
    return locked(
        out / f"records.rank{rank}.lock",
        f"another sweep is writing {out / f'records.rank{rank}.jsonl'} now: wait for it to end, "
        "or give this sweep another output directory",
    )


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

    def __enter__(self) -> RecordLog:
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


def sweep(config: SweepConfig, model: nn.Module | None = None, processor=None) -> dict | None:
    """Evaluate `config.methods` x `config.budgets` x `config.tasks` (plus the unpatched model)
    and write records, summary and plots to `config.out`. Returns the summary on the process
    that writes it (rank 0), None on the others. `model`/`processor`: a model already loaded
    (`config.model` then only names it); by default `config.model` is loaded."""
    if not isinstance(config, SweepConfig):
        raise UsageTypeError(
            f"sweep takes a SweepConfig, e.g. sweep(SweepConfig('testbed', ['shapes'], 'runs/x')); "
            f"got {type(config).__name__}"
        )
    if model is not None:
        if not isinstance(model, nn.Module):
            raise UsageTypeError(
                f"model must be a loaded model (or None to load config.model), got {type(model).__name__}"
            )
        if processor is None:
            raise UsageTypeError("a loaded model needs its processor: sweep(config, model=model, processor=processor)")
        handle = handle_of(model)
        if handle is not None:  # its reference cell would not be the unpatched model
            raise UsageError(
                f"the model is patched ({handle!r}): a sweep patches it itself, cell by cell, and "
                "runs it unpatched for the reference. Call tokendrop.unpatch(model) first"
            )
    else:
        check_model_name(config.model)
        processor = load_processor(config.model)  # small, and some methods need it to validate their options
    plan = plan_sweep(config, processor, model)
    if model is not None:
        check_cells(model, processor, plan)  # the patch's checks against the model, before anything is written
    rank, world_size, state = _shard(config.rank, config.world_size)
    subsets, samples = {}, {}
    for task_name, task in plan.tasks.items():  # data problems surface before the model loads
        source = plan.data[task_name] or task.hub[0]
        rows, image_of = task.load(plan.data[task_name])
        if len(rows) == 0:
            raise UsageError(f"{task_name}: {source} holds no rows: point --data {task_name}=... at the data")
        subsets[task_name] = subset(len(rows), config.limit, config.seed)
        mine = subsets[task_name][rank::world_size]
        samples[task_name] = [_sample(task, source, rows[i], i, image_of) for i in mine]
    out = config.out
    claim_run(out, plan)
    show = config.progress and rank == 0
    with _locked(out, rank), RecordLog(out, rank, config.retry_failed) as log:
        records = read_records(out)
        stale = stale_images(samples, records)
        if stale:
            raise UsageError(
                f"{out} holds answers about images whose files changed since ({len(stale)}, first {stale[0]}): "
                "their records would be stale. Give this sweep another output directory, or delete "
                f"{out} to start over"
            )
        done = {key(r["task"], r["method"], r["budget"], r["index"]) for r in records}
        total = sum(len(samples[t]) for t in plan.tasks) * len(plan.cells())
        finished = sum(
            1 for t in plan.tasks for m, b in plan.cells() for s in samples[t] if key(t, m, b, s.index) in done
        )
        if finished and show:
            print(f"resuming: {finished} of {total} records done", flush=True)
        if model is None:
            options = config.load_options()
            if state is not None and options.device_map is None:
                options = replace(options, device_map={"": state.device})  # data-parallel: a whole model per process
            model = load_model(config.model, options)
            check_cells(model, processor, plan)  # what needs the weights, and the vision layer
        overall = tqdm(total=total, initial=finished, desc="sweep", unit="sample", disable=not show, position=0)
        for task_name, task in plan.tasks.items():
            for method, budget in plan.cells():
                pending = [s for s in samples[task_name] if key(task_name, method, budget, s.index) not in done]
                _run_cell(model, processor, task, plan, method, budget, pending, log, show, overall)
        overall.close()
    if state is not None:
        state.wait_for_everyone()
    if rank != 0:
        return None
    return summarize(out, plan, subsets)


def image_identity(sample: Sample) -> str | None:
    """The digest of the image file a sample's row names, None where the row holds its image
    (the data files' fingerprint covers those)."""
    path = getattr(sample.image, "path", None)
    return None if path is None else image_digest([path])


def stale_images(samples: dict[str, list[Sample]], records: list[dict]) -> list[str]:
    """The image files of this shard's answered samples whose content changed since their
    records were written. Failed records are left out: fixing a broken image and running
    again with --retry-failed is how they are redone."""
    written = {(r["task"], r["index"]): r["image"] for r in records if r["error"] is None and r.get("image")}
    return [
        str(sample.image.path)
        for task, shard in samples.items()
        for sample in shard
        if (task, sample.index) in written and written[(task, sample.index)] != image_identity(sample)
    ]


def check_cells(model, processor, plan: Plan) -> None:
    """Every cell's method resolved against the model as its patch will resolve it, with the
    vision layer it selects at: a method or layer the model cannot take fails here, not after
    the first cells ran."""
    adapter = adapter_for(model)
    for method, budget in plan.cells()[1:]:
        built = cell_method(plan.tasks.values(), method, budget, processor, plan.options.get(method, {}))
        resolve(built, adapter, plan.config.vision_prune_layer)


def _sample(task: Task, source: str, row: dict, index: int, image_of) -> Sample:
    try:
        return task.sample(row, index, image_of(row, index))
    except KeyError as error:
        raise UsageError(f"{source}: {task.name} row {index}: no field {error}") from None
    except ValueError as error:
        raise UsageError(f"{source}: {error}") from None


def _shard(rank, world_size):
    """(rank, world_size, accelerate state or None): explicit (checked by SweepConfig), or from
    `accelerate launch`."""
    if rank is None and world_size is None:
        from accelerate import PartialState

        # without a GPU, processes started by `torchrun` (or `accelerate launch --cpu`) join over gloo
        cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
        state = PartialState(cpu=cpu)
        return state.process_index, state.num_processes, state if state.num_processes > 1 else None
    return rank, world_size, None


def _run_cell(
    model,
    processor,
    task: Task,
    plan: Plan,
    method: str,
    budget,
    pending: list[Sample],
    log: RecordLog,
    show: bool,
    overall,
) -> None:
    label = f"{task.name} {method}" + ("" if budget is None else f" budget {budget}")
    if not pending:
        return
    overall.set_description(f"sweep: {label}")
    bar = tqdm(total=len(pending), desc=label, disable=not show, leave=False, position=1)
    patching = (
        nullcontext()
        if method == REFERENCE
        else tokendrop.patched(
            model,
            cell_method([task], method, budget, processor, plan.options.get(method, {})),
            vision_prune_layer=plan.config.vision_prune_layer,
        )
    )
    batch_size = plan.config.batch_size
    with patching as handle:
        for start in range(0, len(pending), batch_size):
            for record in run_batch(
                model, processor, task, pending[start : start + batch_size], handle, plan.max_new_tokens[task.name]
            ):
                log.write(dict(record, task=task.name, method=method, budget=budget))
                if record["error"] is not None:
                    bar.write(f"{label}: sample {record['id']} failed: {record['error']}")
                bar.update(1)
                overall.update(1)
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
        answers = generate_answers(
            model, processor, [[image] for image in images], [s.question for s in ready], max_new_tokens
        )
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
        index=sample.index,
        image=None if error is not None else image_identity(sample),
        id=sample.id,
        question=sample.question,
        prediction=prediction,
        reference=sample.reference,
        score=score,
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
        rows.append(
            dict(
                task=task_name,
                method=method,
                budget=budget,
                n=len(good),
                failed=len(by_index) - len(good),
                missing=len(wanted[(task_name, method, budget_id)]) - len(by_index),
                metric=task.headline,
                score=metrics.get(task.headline),
                kept_pct=100 * sum(r["kept"] for r in counted) / sum(r["before"] for r in counted) if counted else None,
                metrics=metrics,
            )
        )
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


COLUMNS = (
    "task",
    "method",
    "budget",
    "n",
    "failed",
    "missing",
    "metric",
    "score",
    "unpatched",
    "pct_of_unpatched",
    "kept_pct",
)


def _write_csv(path: Path, rows: list[dict]) -> None:
    metric_names = sorted({name for row in rows for name in row["metrics"]})
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(COLUMNS + tuple(metric_names))
        for row in rows:
            cells = [_cell(row[c], exact=c == "budget") for c in COLUMNS]
            writer.writerow(cells + [_cell(row["metrics"].get(m)) for m in metric_names])


def _cell(value, exact: bool = False) -> str:
    """A value as the CSV holds it: figures to 4 decimals, budgets exactly, as the records
    hold them (0.00001 and 0.00004 are two budgets; 1 and 1.0 too)."""
    if value is None:
        return ""
    return f"{value:.4f}" if isinstance(value, float) and not exact else str(value)


def format_summary(summary: dict) -> str:
    """The summary as one plain-text table per task."""
    blocks = []
    header = ("method", "budget", "n", "failed", "missing", "score", "% unpatched", "tokens kept %")
    for task in dict.fromkeys(r["task"] for r in summary["cells"]):
        rows = [r for r in summary["cells"] if r["task"] == task]
        lines = [
            (
                r["method"],
                r["budget"],
                r["n"],
                r["failed"],
                r["missing"],
                _fmt(r["score"]),
                _fmt(r["pct_of_unpatched"], "{:.1f}"),
                _fmt(r["kept_pct"], "{:.1f}"),
            )
            for r in rows
        ]
        blocks.append(text_table(header, lines, title=f"{task} ({rows[0]['metric']})"))
    return "\n\n".join(blocks)


def _fmt(value, pattern="{:.2f}") -> str | None:
    return None if value is None else pattern.format(value)


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
            points = sorted(
                (r["kept_pct"], r["score"])
                for r in cells
                if r["method"] == method and r["score"] is not None and r["kept_pct"] is not None
            )
            if points:
                axes.plot(*zip(*points), marker="o", label=method)
        unpatched = cells[0]["unpatched"]
        if unpatched is not None:
            axes.axhline(unpatched, linestyle="--", color="gray", label="unpatched")
        axes.set(title=task, xlabel="visual tokens kept (% of the unpatched model's)", ylabel=cells[0]["metric"])
        axes.grid(alpha=0.3)
        axes.legend()
        figure.savefig(folder / f"{task}.png", dpi=120)

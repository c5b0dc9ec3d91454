"""`tokendrop.profile` and `tokendrop.throughput`: what each budget buys on your hardware.

`profile`: a grid of methods x budgets x batch sizes, plus the unpatched model (method "none")
per batch size. Each cell: warm-up runs, then `repeats` measured generate calls (see
`measure`), each figure reported as median with min and max, and flagged where the spread
exceeds 20% of the median. A cell that runs out of memory is recorded as "oom", any other
failure as "error" with its message, and the grid goes on. Besides measured times the table
gives the *ideal* LLM prefill speedup, the FLOP ratio of the unpatched prompt to the pruned
one, next to the measured prefill speedup.

`throughput`: for each method x budget, and the unpatched model, the largest batch that fits
in memory (under a cap, to answer "what fits on a 24 GB card" from a bigger one), found by
doubling and then bisecting, and the requests/s and generated tokens/s at that batch.
"""

from __future__ import annotations

import csv
import json
import numbers
import textwrap
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from .adapters import adapter_for
from .checks import UsageError, UsageTypeError, check_int, is_int
from .family import Adapter
from .files import writable_folder
from .harness import (
    REFERENCE,
    SPREAD_TOLERANCE,
    chat_prompt,
    method_options,
    provenance,
    spread,
    spread_exceeds,
    text_table,
)
from .measure import (
    check_cpu_limit,
    cpu_peak_available,
    measure_generate,
    model_device,
    parse_memory_size,
    release_memory,
)
from .method import METHODS, build as build_method
from .patch import handle_of, patched, resolve, unpatch
from .selection import check_budget

TIMED = (  # measured every repeat: reported as median, min and max
    "ttft_s",
    "generate_s",
    "decode_tok_per_s",
    "vision_s",
    "select_s",
    "llm_prefill_s",
    "peak_memory_bytes",
    "added_memory_bytes",
    "requests_per_s",
    "tokens_per_s",
)


@dataclass
class _Measurement:
    """What `profile` and `throughput` share: the methods x budgets, how each run is made and
    measured, and where the results go. Checked when made, so that a bad value fails before
    any model runs; `check(processor)` also builds every method once."""

    methods: list[str] = field(default_factory=lambda: ["hired"])
    budgets: list[float | int] = field(default_factory=lambda: [1.0, 0.4, 0.2, 0.1])
    _: KW_ONLY
    options: dict[str, dict] = field(default_factory=dict)  # {method: {option: value}}
    prompt: str = "Describe the image."
    max_new_tokens: int = 8
    repeats: int = 3
    warmup: int = 1
    # a run past it is out of memory: 24 (GiB), "24GB", "512MB"; on CPU, the process's peak RSS
    memory_limit: float | str | None = None
    # select inside the vision tower at this vision layer (`patch`'s vision_prune_layer); None: after it
    vision_prune_layer: int | None = None
    out: Path | None = None
    progress: bool = True

    def __post_init__(self):
        self.methods = as_list(self.methods, "methods", "['hired']")
        for name in self.methods:
            METHODS.get(name)
        self.budgets = [check_budget(b) for b in as_list(self.budgets, "budgets", "[1.0, 0.2]")]
        if not self.methods or not self.budgets:
            raise UsageError("methods and budgets must each name at least one")
        for name, least in (("repeats", 1), ("max_new_tokens", 1), ("warmup", 0)):
            value = getattr(self, name)
            if not is_int(value) or value < least:
                raise UsageError(f"{name} must be an int >= {least}, got {value!r}")
        if not isinstance(self.prompt, str):
            raise UsageTypeError(f"prompt must be a str, got {type(self.prompt).__name__}")
        self.options = method_options(self.options, self.methods, "this profile", "profiled")
        if self.memory_limit is not None:
            parse_memory_size(self.memory_limit)
        if self.vision_prune_layer is not None:
            check_int("vision_prune_layer", self.vision_prune_layer)  # against the model: in `check`
        if self.out is not None:
            self.out = Path(self.out)

    @property
    def memory_limit_bytes(self) -> int | None:
        return None if self.memory_limit is None else parse_memory_size(self.memory_limit)

    def check(self, processor, adapter=None) -> None:
        """Build every method x budget once (and, given the model's `adapter` or the
        `ModelFacts` of its configuration, check it against the model; a loaded model's with
        the vision layer it selects at), and the prompt: a bad option fails here, not in every
        cell. Needs no weights, so the command line calls it before the model loads."""
        chat_prompt(processor, self.prompt)
        for name in self.methods:
            for budget in self.budgets:
                method = build_method(name, budget=budget, processor=processor, **self.options.get(name, {}))
                if adapter is not None:
                    resolve(method, adapter, self.vision_prune_layer if isinstance(adapter, Adapter) else None)

    def check_device(self, device: torch.device | str) -> None:
        """A memory limit caps CUDA's allocator, or on the CPU Linux's peak RSS: refuse it
        elsewhere before a model runs."""
        kind = torch.device(device).type
        if self.memory_limit is None or kind == "cuda":
            return
        if kind != "cpu":
            raise UsageError(f"a memory limit caps CUDA's allocator or the CPU's RSS, not {kind}'s: drop the limit")
        if not cpu_peak_available():
            raise UsageError(
                "a CPU memory limit is enforced on the peak RSS that Linux reports in /proc/self, which this "
                "system lacks: drop the memory limit"
            )
        check_cpu_limit(self.memory_limit_bytes)


@dataclass
class ProfileConfig(_Measurement):
    """What `profile` measures: methods x budgets x batch sizes (plus the unpatched model per
    batch size), how, and where the results go (profile.json, profile.csv, profile.png)."""

    batch_sizes: list[int] = field(default_factory=lambda: [1])

    def __post_init__(self):
        super().__post_init__()
        self.batch_sizes = as_list(self.batch_sizes, "batch_sizes", "[1, 4]")
        if any(not is_int(b) or b < 1 for b in self.batch_sizes):
            raise UsageError(f"batch sizes must be ints >= 1, got {self.batch_sizes}")


@dataclass
class ThroughputConfig(_Measurement):
    """What `throughput` measures: for each method x budget (and the unpatched model), the
    largest batch up to `max_batch_size` that runs within `memory_limit` (required on CPU:
    there the tool enforces it; on a GPU the card's own memory is the default), then
    `repeats` runs at that batch. The search's runs warm the model up, hence `warmup=0`.
    Results: throughput.json, throughput.csv, throughput.png."""

    _: KW_ONLY
    max_batch_size: int = 64
    warmup: int = 0

    def __post_init__(self):
        super().__post_init__()
        value = self.max_batch_size
        if not is_int(value) or value < 1:
            raise UsageError(f"max_batch_size must be an int >= 1, got {value!r}")

    def check_device(self, device: torch.device | str) -> None:
        super().check_device(device)
        if torch.device(device).type == "cpu" and self.memory_limit is None:
            raise UsageError(
                "the throughput search on a CPU needs a memory limit (--memory-limit, e.g. 8GB): without one, a "
                "batch too big for the machine is ended by the operating system, not caught"
            )


@dataclass
class Cell:
    method: str
    budget: float | int | None
    batch_size: int
    status: str = "ok"  # "ok", "oom" or "error"
    error: str | None = None
    figures: dict = field(default_factory=dict)  # TIMED key -> {median, min, max}
    tokens: dict = field(default_factory=dict)  # counts, identical in every repeat
    tried: list = field(default_factory=list)  # throughput: [batch, fits] in search order

    def row(self) -> dict:
        """A flat, JSON- and CSV-ready record."""
        flat = {
            "method": self.method,
            "budget": self.budget,
            "batch_size": self.batch_size,
            "status": self.status,
            "error": self.error,
            **self.tokens,
        }
        if self.tried:
            flat["batches_tried"] = " ".join(f"{b}" if fits else f"{b}x" for b, fits in self.tried)
        for key, stats in self.figures.items():
            flat.update({key: stats["median"], f"{key}_min": stats["min"], f"{key}_max": stats["max"]})
        flat["wide_spread"] = [key for key, stats in self.figures.items() if spread_exceeds(stats)]
        return flat


def profile(model, processor, images, config: ProfileConfig | None = None) -> list[dict]:
    """Profile `model` (with `processor`) over `config`'s methods x budgets x batch sizes;
    returns one record per cell (see `Cell.row`), and writes profile.json, profile.csv and
    profile.png to `config.out` when set. `images`: PIL images, used round-robin to fill each
    batch. A patch already on `model` is lifted for the grid (the reference cells run
    unpatched) and put back afterwards.

        rows = tokendrop.profile(model, processor, [image], tokendrop.ProfileConfig(budgets=[0.2, 0.1]))
    """
    config = ProfileConfig() if config is None else config
    if not isinstance(config, ProfileConfig):
        raise UsageTypeError(f"config must be a tokendrop.ProfileConfig, got {type(config).__name__}")
    adapter, images = _prepare(model, processor, images, config)
    grid = [Cell(REFERENCE, None, b) for b in config.batch_sizes]
    grid += [Cell(m, v, b) for b in config.batch_sizes for m in config.methods for v in config.budgets]

    def measure_cell(cell: Cell, bar) -> None:
        inputs = batch_inputs(processor, images, config.prompt, cell.batch_size, model)
        run_cell(model, processor, cell, inputs, config, config.options.get(cell.method, {}))

    _run_grid(model, grid, measure_cell, "profile", config.progress)
    rows = [cell.row() | _where(cell, config) for cell in grid]
    add_ratios(rows, model.config.get_text_config())
    if config.out is not None:
        seen = _images_seen(adapter, processor, images)
        write(config.out, "profile", rows, provenance(config, model, images=seen))
    return rows


def throughput(model, processor, images, config: ThroughputConfig | None = None) -> list[dict]:
    """For each of `config`'s methods x budgets, and the unpatched model, the largest batch
    that fits (see `largest_batch`), and at that batch the requests/s and generated tokens/s,
    time to first token and memory, over `config.repeats` runs. One record per method x
    budget (see `Cell.row`: `batch_size` is the largest that fits, 0 where batch 1 does not,
    `batches_tried` the search's path, an x marking a batch that ran out of memory); writes
    throughput.json, throughput.csv and throughput.png to `config.out` when set.

        rows = tokendrop.throughput(model, processor, [image], tokendrop.ThroughputConfig(memory_limit="24GB"))
    """
    config = ThroughputConfig() if config is None else config
    if not isinstance(config, ThroughputConfig):
        raise UsageTypeError(f"config must be a tokendrop.ThroughputConfig, got {type(config).__name__}")
    adapter, images = _prepare(model, processor, images, config)
    grid = [Cell(REFERENCE, None, 0)] + [Cell(m, v, 0) for m in config.methods for v in config.budgets]

    def measure_cell(cell: Cell, bar) -> None:
        search_cell(model, processor, images, cell, config, lambda step: bar.set_postfix_str(step))

    _run_grid(model, grid, measure_cell, "throughput", config.progress)
    rows = [cell.row() | _where(cell, config) for cell in grid]
    reference = rows[0]
    for row in rows:
        row["memory_limit"] = config.memory_limit
        both = row["status"] == "ok" and reference["status"] == "ok"
        row["throughput_speedup"] = row["tokens_per_s"] / reference["tokens_per_s"] if both else None
        row["batch_ratio"] = row["batch_size"] / reference["batch_size"] if reference["batch_size"] else None
    if config.out is not None:
        seen = _images_seen(adapter, processor, images)
        write(config.out, "throughput", rows, provenance(config, model, images=seen))
    return rows


def _where(cell: Cell, config: _Measurement) -> dict:
    """Where a row's method selected: the vision layer inside the tower, or None (after it; the
    unpatched rows select nothing)."""
    return {"vision_prune_layer": None if cell.method == REFERENCE else config.vision_prune_layer}


def _prepare(model, processor, images, config: _Measurement):
    adapter = adapter_for(model)
    config.check(processor, adapter)
    config.check_device(model_device(model))
    images = check_images(images)
    if config.out is not None:
        writable_folder(config.out)
    return adapter, images


def _run_grid(model, grid: list[Cell], measure_cell: Callable, name: str, progress: bool) -> None:
    """`measure_cell(cell, bar)` over the grid, on the unpatched model: a patch already on it
    is lifted, and put back afterwards."""
    users_patch = handle_of(model)
    unpatch(model)
    try:
        bar = tqdm(grid, desc=name, disable=not progress)
        for cell in bar:
            label = cell.method + ("" if cell.budget is None else f" {cell.budget}")
            bar.set_description(f"{name} {label}" + (f" batch {cell.batch_size}" if cell.batch_size else ""))
            measure_cell(cell, bar)
    finally:
        if users_patch is not None:
            users_patch.install()  # the user's own handle back in force, as `patched` restores one


def _images_seen(adapter, processor, images) -> list[dict]:
    """Each image's size, crop grid ((0, 0) without crops) and visual tokens, as the model sees it."""
    inputs = processor(
        images=images, text=[chat_prompt(processor, "")] * len(images), return_tensors="pt", padding=True
    )
    return [
        {"size": list(image.size), "grid": list(layout.grid), "tokens": layout.n_features}
        for image, layout in zip(images, adapter.input_layouts(inputs))
    ]


def as_list(value, name: str, example: str) -> list:
    """`value` as a list; a lone string or number, a common slip, is refused."""
    if isinstance(value, (str, numbers.Number)) or not isinstance(value, Iterable):
        raise UsageTypeError(f"{name} must be a list, e.g. {name}={example}; got {value!r}")
    return list(value)


def check_images(images) -> list:
    if not images:
        raise UsageError("profile needs at least one image")
    expected = "images must be a list of PIL images (open files with PIL.Image.open)"
    if not isinstance(images, (list, tuple)):
        raise UsageTypeError(f"{expected}, got {images!r}")
    for image in images:
        if not isinstance(image, Image.Image):
            raise UsageTypeError(f"{expected}, got a {type(image).__name__} in it")
    return list(images)


def batch_inputs(processor, images, prompt, batch_size, model) -> dict:
    text = chat_prompt(processor, prompt)
    chosen = [images[i % len(images)] for i in range(batch_size)]
    inputs = processor(images=chosen, text=[text] * batch_size, return_tensors="pt", padding=True)
    return inputs.to(model_device(model), model.dtype)  # casts the pixels only


def _settings(config: _Measurement) -> dict:
    return dict(
        max_new_tokens=config.max_new_tokens,
        min_new_tokens=config.max_new_tokens,
        do_sample=False,
        memory_limit_bytes=config.memory_limit_bytes,
    )


def _patched_for(model, processor, cell: Cell, options: dict, vision_prune_layer: int | None = None):
    """The patch a cell runs under (yielding its handle), or none for the unpatched model."""
    if cell.method == REFERENCE:
        return nullcontext(None)
    return patched(
        model, cell.method, budget=cell.budget, processor=processor, vision_prune_layer=vision_prune_layer, **options
    )


def run_cell(model, processor, cell: Cell, inputs, config: _Measurement, options: dict) -> None:
    settings = _settings(config)
    samples = []
    try:
        with _patched_for(model, processor, cell, options, config.vision_prune_layer) as handle:
            for _ in range(config.warmup):
                measure_generate(model, inputs, **settings)  # capped as the measured runs are
            samples = [measure_generate(model, inputs, **settings) for _ in range(config.repeats)]
    except torch.OutOfMemoryError as error:
        cell.status, cell.error = "oom", str(error).splitlines()[0]
    except Exception as error:  # one broken cell must not end the grid: it is recorded
        cell.status, cell.error = "error", f"{type(error).__name__}: {error}"
    finally:
        release_memory(model_device(model))
    if cell.status != "ok":
        return
    batch = inputs["input_ids"].shape[0]
    for sample in samples:
        sample["requests_per_s"] = batch / sample["generate_s"]
        sample["tokens_per_s"] = batch * sample["new_tokens"] / sample["generate_s"]
    cell.figures = {key: spread(s[key] for s in samples) for key in TIMED if samples[0][key] is not None}
    image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    first = samples[0]
    cell.tokens = {
        "visual_tokens_before": image_tokens,
        "visual_tokens_after": sum(r.n_kept + r.n_newlines for r in handle.last) if handle else image_tokens,
        "features_before": sum(r.n_before for r in handle.last) if handle else None,
        "features_kept": sum(r.n_kept for r in handle.last) if handle else None,
        "prompt_len": inputs["input_ids"].shape[1],
        "llm_prompt_len": first["llm_prompt_len"],
        "new_tokens": first["new_tokens"],
        "kv_cache_bytes": first["kv_cache_bytes"],
        "memory_kind": first["memory_kind"],
    }


# --- throughput: the largest batch that fits ------------------------------------------------


def largest_batch(fits_at: Callable[[int], object], max_batch: int) -> tuple[int, list[tuple[int, bool]]]:
    """The largest batch in [1, max_batch] at which `fits_at(batch)` runs without raising
    `torch.OutOfMemoryError` (0 when batch 1 does not), and the path taken: [(batch, fits)].

    Doubles from 1 until a batch fails or `max_batch` is passed, then bisects between the
    largest batch that fit and the smallest that failed: about 2 log2(answer) runs. Assumes
    memory grows with the batch, so that every batch below one that fits fits too."""
    tried: list[tuple[int, bool]] = []

    def fits(batch: int) -> bool:
        try:
            fits_at(batch)
        except torch.OutOfMemoryError:
            tried.append((batch, False))
            return False
        tried.append((batch, True))
        return True

    fitting, batch = 0, 1
    while batch <= max_batch and fits(batch):
        fitting, batch = batch, batch * 2
    failing = min(batch, max_batch + 1)  # the smallest batch known not to fit, or past the range
    while failing - fitting > 1:
        middle = (fitting + failing) // 2
        if fits(middle):
            fitting = middle
        else:
            failing = middle
    return fitting, tried


def search_cell(model, processor, images, cell: Cell, config: ThroughputConfig, progress=lambda step: None) -> None:
    """Find the cell's largest batch (one run per batch tried, under the memory limit), then
    measure `config.repeats` runs at it, one batch lower while a repeat runs out of memory."""
    options = config.options.get(cell.method, {})
    device = model_device(model)

    def fits_at(batch: int) -> None:
        progress(f"trying batch {batch}")
        failure = None
        try:
            measure_generate(model, batch_inputs(processor, images, config.prompt, batch, model), **_settings(config))
        except torch.OutOfMemoryError as error:
            failure = str(error)
        release_memory(device)  # after the except block: until then the error's frames hold the run's tensors
        if failure is not None:
            raise torch.OutOfMemoryError(failure)

    try:
        with _patched_for(model, processor, cell, options, config.vision_prune_layer):
            cell.batch_size, cell.tried = largest_batch(fits_at, config.max_batch_size)
    except Exception as error:  # one broken cell must not end the search: it is recorded
        cell.status, cell.error = "error", f"{type(error).__name__}: {error}"
        return
    if cell.batch_size == 0:
        limit = "" if config.memory_limit is None else f" under the memory limit {config.memory_limit}"
        cell.status, cell.error = "oom", f"batch 1 does not fit{limit}"
        return
    # the repeats at the batch found: a run near the limit can fit once and not the next time
    # (allocator and RSS vary by a few MB), so step down until every repeat fits
    stepped_down = False
    while True:
        progress(f"{config.repeats} runs at batch {cell.batch_size}")
        inputs = batch_inputs(processor, images, config.prompt, cell.batch_size, model)
        run_cell(model, processor, cell, inputs, config, options)
        if cell.status == "ok" and stepped_down:
            cell.tried.append((cell.batch_size, True))
        if cell.status != "oom" or cell.batch_size == 1:
            break
        cell.tried.append((cell.batch_size, False))
        cell.batch_size -= 1
        cell.status, cell.error, stepped_down = "ok", None, True
    if cell.status == "oom":
        cell.error = f"batch 1 fitted in the search but not in every repeat: {cell.error}"


# --- ratios --------------------------------------------------------------------------------


def prefill_flops(length: int, batch: int, text_config) -> float:
    """Forward FLOPs of the LLM over a prompt of `length` tokens per row (padding included,
    as it is computed): 2 per weight per token for the projections and MLP, plus causal
    attention's QK^T and AV. Embeddings and the one-token head are left out."""
    d, layers = text_config.hidden_size, text_config.num_hidden_layers
    heads = text_config.num_attention_heads
    kv = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or d // heads
    per_layer = d * heads * head_dim * 2 + d * kv * head_dim * 2 + 3 * d * text_config.intermediate_size
    linear = 2 * per_layer * layers * length
    attention = 2 * layers * heads * head_dim * length * (length + 1)
    return batch * (linear + attention)


def add_ratios(rows: list[dict], text_config) -> None:
    """Ideal (FLOP ratio) and measured LLM prefill and TTFT speedups against the unpatched
    model at the same batch size."""
    reference = {r["batch_size"]: r for r in rows if r["method"] == REFERENCE and r["status"] == "ok"}
    for row in rows:
        ref = reference.get(row["batch_size"])
        ok = ref is not None and row["status"] == "ok"
        row["prefill_speedup_ideal"] = (
            prefill_flops(ref["llm_prompt_len"], 1, text_config) / prefill_flops(row["llm_prompt_len"], 1, text_config)
            if ok
            else None
        )
        row["prefill_speedup_measured"] = ref["llm_prefill_s"] / row["llm_prefill_s"] if ok else None
        row["ttft_speedup"] = ref["ttft_s"] / row["ttft_s"] if ok else None


# --- text tables ---------------------------------------------------------------------------

MB = 2**20
PROFILE_COLUMNS = [  # (header, key, format); a key in TIMED shows median (min-max)
    ("method", "method", "{}"),
    ("budget", "budget", "{}"),
    ("batch", "batch_size", "{}"),
    ("visual tokens", None, None),
    ("LLM prompt", "llm_prompt_len", "{}"),
    ("vision s", "vision_s", "{:.3f}"),
    ("select s", "select_s", "{:.4f}"),
    ("prefill s", "llm_prefill_s", "{:.3f}"),
    ("TTFT s", "ttft_s", "{:.3f}"),
    ("decode tok/s", "decode_tok_per_s", "{:.2f}"),
    ("e2e s", "generate_s", "{:.3f}"),
    ("added MB", "added_memory_bytes", "{:.0f}"),
    ("KV MB", "kv_cache_bytes", "{:.1f}"),
    ("prefill x ideal", "prefill_speedup_ideal", "{:.2f}"),
    ("prefill x measured", "prefill_speedup_measured", "{:.2f}"),
    ("TTFT x", "ttft_speedup", "{:.2f}"),
]
THROUGHPUT_COLUMNS = [
    ("method", "method", "{}"),
    ("budget", "budget", "{}"),
    ("max batch", "batch_size", "{}"),
    ("batches tried", "batches_tried", "{}"),
    ("requests/s", "requests_per_s", "{:.3f}"),
    ("tokens/s", "tokens_per_s", "{:.2f}"),
    ("TTFT s", "ttft_s", "{:.2f}"),
    ("peak MB", "peak_memory_bytes", "{:.0f}"),
    ("added MB", "added_memory_bytes", "{:.0f}"),
    ("KV MB", "kv_cache_bytes", "{:.1f}"),
    ("batch x", "batch_ratio", "{:.2f}"),
    ("tokens/s x", "throughput_speedup", "{:.2f}"),
]


# the narrow tables (the default), which fit 120 columns: the main figures, medians only
NARROW_PROFILE_COLUMNS = [
    ("method", "method", "{}"),
    ("budget", "budget", "{}"),
    ("batch", "batch_size", "{}"),
    ("tokens", None, None),
    ("prompt", "llm_prompt_len", "{}"),
    ("vision s", "vision_s", "{:.3f}"),
    ("prefill s", "llm_prefill_s", "{:.3f}"),
    ("TTFT s", "ttft_s", "{:.3f}"),
    ("tok/s", "decode_tok_per_s", "{:.2f}"),
    ("KV MB", "kv_cache_bytes", "{:.0f}"),
    ("TTFT x", "ttft_speedup", "{:.2f}"),
]
NARROW_THROUGHPUT_KEYS = (
    "method", "budget", "batch_size", "requests_per_s", "tokens_per_s", "ttft_s", "peak_memory_bytes",
    "kv_cache_bytes", "batch_ratio", "throughput_speedup",
)  # fmt: skip
WIDTH = 120  # what a narrow table and the text around it fit in


def _cell_text(row: dict, key: str, fmt: str, ranges: bool = True) -> str:
    """A figure as the tables show it: MB for bytes; median (min-max) for repeated
    measurements (the median alone without `ranges`), marked ! where the spread exceeds the
    tolerance."""
    if row.get(key) is None:
        return "-"
    scaled = (lambda value: value / MB) if key.endswith("_bytes") else (lambda value: value)
    text = fmt.format(scaled(row[key]))
    if key in TIMED and f"{key}_min" in row:
        low, high = (fmt.format(scaled(row[f"{key}_{end}"])) for end in ("min", "max"))
        if low != high and ranges:
            text += f" ({low}-{high})"
        if key in row.get("wide_spread", ()):
            text += " !"
    return text


def _cell_name(row: dict) -> str:
    return row["method"] + ("" if row["budget"] is None else f" {row['budget']}") + f" batch {row['batch_size']}"


def _table(rows: list[dict], columns, failed_from: int, wide: bool) -> list[list[str]]:
    """The rows' cells; a failed cell shows its status and, in the wide table, its message
    (the narrow one lists the messages below, `_failures`)."""
    lines = []
    for row in rows:
        if row["status"] != "ok":
            lead = [_cell_text(row, key, fmt) for _, key, fmt in columns[:failed_from]]
            message = f"{row['status'].upper()}: {row['error']}" if wide else row["status"].upper()
            lines.append(lead + [message] + [""] * (len(columns) - failed_from - 1))
            continue
        cells = []
        for _, key, fmt in columns:
            if key is None:
                cells.append(f"{row['visual_tokens_before']}->{row['visual_tokens_after']}")
            else:
                cells.append(_cell_text(row, key, fmt, ranges=wide))
        lines.append(cells)
    return lines


def _failures(rows: list[dict]) -> list[str]:
    return [f"{_cell_name(row)}: {row['status'].upper()}: {row['error']}" for row in rows if row["status"] != "ok"]


def _text(table: str, caption: str, notes: list[str], wide: bool) -> str:
    """A table with its caption and notes; the narrow form wraps them to `WIDTH` columns."""
    if wide:
        return "\n".join([table, caption, *notes])
    return "\n".join([table, *(textwrap.fill(line, WIDTH, subsequent_indent="  ") for line in [caption, *notes])])


def spread_warnings(rows: list[dict], columns) -> list[str]:
    """One line per cell whose spread (max - min) exceeds 20% of the median for a figure of
    the table's `columns` (the others are in the JSON and CSV, with their min and max)."""
    headers = {key: header for header, key, _ in columns if key}
    lines = []
    for row in rows:
        wide = [key for key in row.get("wide_spread", ()) if key in headers and row.get(key)]
        if not wide:
            continue
        name = _cell_name(row)
        figures = ", ".join(
            f"{headers[key]} {(row[f'{key}_max'] - row[f'{key}_min']) / abs(row[key]):.0%}" for key in wide
        )
        lines.append(f"warning: {name}: spread (max - min) over {SPREAD_TOLERANCE:.0%} of the median: {figures}")
    if lines:
        lines.append("Figures marked ! vary too much to compare: rerun with more --repeats, on an idle machine.")
    return lines


def format_table(rows: list[dict], wide: bool = False) -> str:
    """The profile as a text table that fits 120 columns: the main figures, medians of the
    repeats; `wide`: every figure, each as median (min-max). Then warnings for cells whose
    spread is wide."""
    memory = next((r["memory_kind"] for r in rows if r["status"] == "ok"), "-")
    layer = next((r["vision_prune_layer"] for r in rows if r.get("vision_prune_layer") is not None), None)
    where = (
        ""
        if layer is None
        else f" Methods select inside the vision tower at layer {layer}; vision s covers the whole tower."
    )
    if wide:
        caption = (
            "Medians of the repeats (min-max in brackets; ! marks a spread over 20% of the median). TTFT includes the "
            f"vision pass and selection; decode tok/s excludes prefill; added MB: peak memory ({memory}) over what "
            "was in use before the run (the loaded model). prefill x: LLM prefill speedup over the unpatched model, "
            f"ideal (FLOP ratio) and measured.{where}"
        )
    else:
        caption = (
            "Medians of the repeats (! marks a spread over 20% of the median). tokens: visual tokens before and "
            "after pruning; prompt: the LLM's prompt length; TTFT includes the vision pass and selection; tok/s: "
            f"decoding, prefill excluded; TTFT x: speedup over the unpatched model.{where} --wide shows every "
            "figure (selection time, memory, prefill speedups) with its min-max."
        )
    columns = PROFILE_COLUMNS if wide else NARROW_PROFILE_COLUMNS
    table = text_table([h for h, _, _ in columns], _table(rows, columns, failed_from=3, wide=wide))
    notes = ([] if wide else _failures(rows)) + spread_warnings(rows, columns)
    return _text(table, caption, notes, wide)


def format_throughput_table(rows: list[dict], wide: bool = False) -> str:
    """The throughput search's results as a text table that fits 120 columns (`wide`: every
    figure, each as median (min-max)), with warnings for wide spreads."""
    memory = next((r["memory_kind"] for r in rows if r["status"] == "ok"), "-")
    limit = rows[0]["memory_limit"] if rows else None
    cap = "no memory limit (the device's own)" if limit is None else f"memory limit {limit}"
    caption = (
        f"The largest batch that fits ({cap}; memory: {memory}), found by doubling then bisecting"
        f"{' (an x in batches tried: out of memory)' if wide else ''}, and at that batch: medians of the repeats "
        f"({'min-max; ' if wide else ''}! marks a spread over 20% of the median). tokens/s: generated tokens of "
        "the whole batch per second of generate; x: against the unpatched model."
        + ("" if wide else " --wide shows every figure with its min-max.")
    )
    columns = THROUGHPUT_COLUMNS if wide else [c for c in THROUGHPUT_COLUMNS if c[1] in NARROW_THROUGHPUT_KEYS]
    table = text_table([h for h, _, _ in columns], _table(rows, columns, failed_from=4 if wide else 3, wide=wide))
    notes = ([] if wide else _failures(rows)) + spread_warnings(rows, columns)
    return _text(table, caption, notes, wide)


# --- files and plots -----------------------------------------------------------------------


def write(out: Path, name: str, rows: list[dict], meta: dict) -> None:
    """NAME.json (provenance and cells), NAME.csv and NAME.png in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"provenance": meta, "cells": rows}, indent=2) + "\n")
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with open(out / f"{name}.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    limit = meta["config"].get("memory_limit")
    title = f"tokendrop {name} on {meta['device']}" + ("" if limit is None else f", memory limit {limit}")
    draw = profile_figure if name == "profile" else throughput_figure
    draw(rows, title).savefig(out / f"{name}.png", dpi=100)


LINE_STYLES = ("-", "--", ":", "-.")


def _styles(rows: list[dict]) -> tuple[dict, dict]:
    """A colour per method (the unpatched model grey) and a line style per batch size."""
    from matplotlib import colormaps

    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != REFERENCE]
    palette = colormaps["tab10"].colors
    colours = {m: palette[i % len(palette)] for i, m in enumerate(methods)} | {REFERENCE: "grey"}
    batches = sorted({r["batch_size"] for r in rows})
    return colours, {b: LINE_STYLES[i % len(LINE_STYLES)] for i, b in enumerate(batches)}


def _kept(row: dict) -> float:
    return row["features_kept"] / row["features_before"]


def _draw(ax, rows: list[dict], key: str, scale: float, colour, style: str, label: str) -> None:
    """A method's line against the kept fraction, with min-max error bars where repeated."""
    points = sorted((_kept(r), r) for r in rows if r.get(key) is not None)
    if not points:
        return
    x = [p for p, _ in points]
    y = [r[key] / scale for _, r in points]
    if f"{key}_min" in points[0][1]:
        low = [v - r[f"{key}_min"] / scale for v, (_, r) in zip(y, points)]
        high = [r[f"{key}_max"] / scale - v for v, (_, r) in zip(y, points)]
        ax.errorbar(x, y, yerr=[low, high], color=colour, linestyle=style, marker="o", capsize=3, label=label)
    else:
        ax.plot(x, y, color=colour, linestyle=style, marker="o", label=label)


def _draw_reference(ax, row: dict, key: str, scale: float, style: str, label: str) -> None:
    """The unpatched model: a grey line across, its min-max as a band."""
    if row.get(key) is None:
        return
    ax.axhline(row[key] / scale, color="grey", linestyle=style, label=label)
    if f"{key}_min" in row:
        ax.axhspan(row[f"{key}_min"] / scale, row[f"{key}_max"] / scale, color="grey", alpha=0.15)


def profile_figure(rows: list[dict], title: str):
    """Time to first token, end-to-end latency, memory added over the loaded model and the
    KV cache against the kept fraction: a colour per method, a line style per batch size,
    min-max error bars, the unpatched model grey across."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend is left alone

    figure = Figure(figsize=(20, 4.8), layout="tight")
    axes = figure.subplots(1, 4)
    panels = (
        ("ttft_s", "time to first token (s)", 1),
        ("generate_s", "end-to-end latency (s)", 1),
        ("added_memory_bytes", "memory added over the loaded model (MB)", MB),
        ("kv_cache_bytes", "KV cache after prefill (MB)", MB),
    )
    ok = [r for r in rows if r["status"] == "ok"]
    colours, styles = _styles(ok)
    for ax, (key, label, scale) in zip(axes, panels):
        for batch, style in styles.items():
            for method, colour in colours.items():
                of = [r for r in ok if r["method"] == method and r["batch_size"] == batch]
                if method == REFERENCE:
                    for r in of:
                        _draw_reference(ax, r, key, scale, style, f"unpatched, batch {batch}")
                else:
                    _draw(ax, of, key, scale, colour, style, f"{method}, batch {batch}")
        _fraction_axes(ax, label)
    axes[0].legend(fontsize=8)
    figure.suptitle(f"{title} (medians, min-max bars)")
    return figure


def _fraction_axes(ax, label: str) -> None:
    """Kept fraction across (0 to 1, where the unpatched model is), the figure up from 0."""
    ax.set_xlim(0, 1.05)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("visual feature tokens kept (fraction)")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)


def throughput_figure(rows: list[dict], title: str):
    """Generated tokens/s at the largest batch that fits, and that batch, against the kept
    fraction: a colour per method, min-max error bars, the unpatched model grey across."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.8), layout="tight")
    axes = figure.subplots(1, 2)
    ok = [r for r in rows if r["status"] == "ok"]
    colours, _ = _styles([dict(r, batch_size=0) for r in ok])
    for ax, (key, label) in zip(axes, (("tokens_per_s", "generated tokens/s"), ("batch_size", "largest batch"))):
        for method, colour in colours.items():
            of = [r for r in ok if r["method"] == method]
            if method == REFERENCE:
                for r in of:
                    _draw_reference(ax, r, key, 1, "--", "unpatched")
            else:
                _draw(ax, of, key, 1, colour, "-", method)
        _fraction_axes(ax, label)
    axes[1].yaxis.get_major_locator().set_params(integer=True)
    axes[0].legend(fontsize=8)
    figure.suptitle(f"{title} (medians, min-max bars)")
    return figure

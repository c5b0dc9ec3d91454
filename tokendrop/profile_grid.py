"""`tokendrop profile`: what each budget buys on your hardware.

A grid of methods x budgets x batch sizes, plus the unpatched model (method "none") per batch
size. Each cell: warm-up runs, then `repeats` measured generate calls (see `profiling`), each
figure reported as median with min and max. A cell that runs out of GPU memory is recorded
as "oom", any other failure as "error" with its message, and the grid goes on.

Besides measured times the table gives the *ideal* LLM prefill speedup, the FLOP ratio of the
unpatched prompt to the pruned one, next to the measured prefill speedup.
"""

from __future__ import annotations

import csv
import gc
import json
import numbers
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from .adapters import adapter_for
from .harness import REFERENCE, chat_prompt, provenance, spread, text_table
from .method import METHODS, build as build_method
from .patch import ATTRIBUTE, patched, unpatch
from .profiling import measure_generate, model_device
from .registry import did_you_mean
from .selection import check_budget

TIMED = (
    "ttft_s",
    "generate_s",
    "decode_tok_per_s",
    "vision_s",
    "select_s",
    "llm_prefill_s",
    "peak_memory_bytes",
    "added_memory_bytes",
)


@dataclass
class ProfileConfig:
    """What `profile` measures: methods x budgets x batch sizes (plus the unpatched model per
    batch size), how, and where the results go. Checked when made, so that a bad value fails
    before any model runs; `check(processor)` also builds every method once."""

    methods: list[str] = field(default_factory=lambda: ["hired"])
    budgets: list[float | int] = field(default_factory=lambda: [1.0, 0.4, 0.2, 0.1])
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    options: dict[str, dict] = field(default_factory=dict)  # {method: {option: value}}
    prompt: str = "Describe the image."
    max_new_tokens: int = 8
    repeats: int = 3
    warmup: int = 1
    out: Path | None = None  # profile.json, profile.csv and profile.png go here
    progress: bool = True

    def __post_init__(self):
        self.methods = as_list(self.methods, "methods", "['hired']")
        for name in self.methods:
            METHODS.get(name)
        self.budgets = [check_budget(b) for b in as_list(self.budgets, "budgets", "[1.0, 0.2]")]
        if not self.methods or not self.budgets:
            raise ValueError("methods and budgets must each name at least one")
        self.batch_sizes = as_list(self.batch_sizes, "batch_sizes", "[1, 4]")
        if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in self.batch_sizes):
            raise ValueError(f"batch sizes must be ints >= 1, got {self.batch_sizes}")
        for name, least in (("repeats", 1), ("max_new_tokens", 1), ("warmup", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
        if not isinstance(self.prompt, str):
            raise TypeError(f"prompt must be a str, got {type(self.prompt).__name__}")
        self.options = {name: dict(opts) for name, opts in (self.options or {}).items()}
        for name, opts in self.options.items():
            if name not in self.methods:
                raise ValueError(
                    f"options given for method {name!r}, which this profile does not run "
                    f"({', '.join(self.methods)}).{did_you_mean(name, self.methods)}"
                )
            if "budget" in opts:
                raise ValueError(
                    f"options for {name!r}: the budget is profiled; set it with budgets (--budgets), not as an option"
                )
        if self.out is not None:
            self.out = Path(self.out)

    def check(self, processor, adapter=None) -> None:
        """Build every method x budget once (and, given the model's `adapter`, resolve it
        against the model): a bad option fails here, not in every cell. Needs only the
        processor, so the command line calls it before the model loads."""
        for name in self.methods:
            for budget in self.budgets:
                method = build_method(name, budget=budget, processor=processor, **self.options.get(name, {}))
                if adapter is not None:
                    method.resolve(adapter)


@dataclass
class Cell:
    method: str
    budget: float | int | None
    batch_size: int
    status: str = "ok"  # "ok", "oom" or "error"
    error: str | None = None
    figures: dict = field(default_factory=dict)  # TIMED key -> {median, min, max}
    tokens: dict = field(default_factory=dict)  # counts, identical in every repeat

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
        for key, stats in self.figures.items():
            flat.update({key: stats["median"], f"{key}_min": stats["min"], f"{key}_max": stats["max"]})
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
        raise TypeError(f"config must be a tokendrop.ProfileConfig, got {type(config).__name__}")
    adapter = adapter_for(model)
    config.check(processor, adapter)
    images = check_images(images)
    if config.out is not None:
        writable_folder(config.out)
    grid = [Cell(REFERENCE, None, b) for b in config.batch_sizes]
    grid += [Cell(m, v, b) for b in config.batch_sizes for m in config.methods for v in config.budgets]
    users_patch = model.__dict__.get(ATTRIBUTE)
    unpatch(model)
    try:
        bar = tqdm(grid, desc="profile", disable=not config.progress)
        for cell in bar:
            bar.set_description(
                f"profile {cell.method}"
                + ("" if cell.budget is None else f" {cell.budget}")
                + f" batch {cell.batch_size}"
            )
            inputs = batch_inputs(processor, images, config.prompt, cell.batch_size, model)
            run_cell(model, processor, cell, inputs, config, config.options.get(cell.method, {}))
    finally:
        if users_patch is not None:
            users_patch._install()  # the user's own handle back in force, as `patched` restores one
    rows = [cell.row() for cell in grid]
    add_ratios(rows, model.config.get_text_config())
    if config.out is not None:
        images_seen = [
            {"size": list(image.size), "grid": list(adapter.layout((image.height, image.width)).grid)}
            for image in images
        ]
        write(config.out, rows, provenance(config, model, images=images_seen))
    return rows


def as_list(value, name: str, example: str) -> list:
    """`value` as a list; a lone string or number, a common slip, is refused."""
    if isinstance(value, (str, numbers.Number)) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a list, e.g. {name}={example}; got {value!r}")
    return list(value)


def check_images(images) -> list:
    if not images:
        raise ValueError("profile needs at least one image")
    expected = "images must be a list of PIL images (open files with PIL.Image.open)"
    if not isinstance(images, (list, tuple)):
        raise TypeError(f"{expected}, got {images!r}")
    for image in images:
        if not isinstance(image, Image.Image):
            raise TypeError(f"{expected}, got a {type(image).__name__} in it")
    return list(images)


def writable_folder(out) -> Path:
    """`out`, created, once a file could be made in it: the measurements are written there
    only after the whole grid has run."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as error:
        raise ValueError(f"cannot write to {out}: {error.strerror or error}; pick a folder you can write") from None
    return out


def batch_inputs(processor, images, prompt, batch_size, model) -> dict:
    text = chat_prompt(processor, prompt)
    chosen = [images[i % len(images)] for i in range(batch_size)]
    inputs = processor(images=chosen, text=[text] * batch_size, return_tensors="pt", padding=True)
    return inputs.to(model_device(model), model.dtype)  # casts the pixels only


def run_cell(model, processor, cell: Cell, inputs, config: ProfileConfig, options: dict) -> None:
    settings = dict(max_new_tokens=config.max_new_tokens, min_new_tokens=config.max_new_tokens, do_sample=False)
    repeats, warmup = config.repeats, config.warmup
    samples = []
    try:
        if cell.method == REFERENCE:
            handle = None
            for _ in range(warmup):
                model.generate(**inputs, **settings)
            samples = [measure_generate(model, inputs, **settings) for _ in range(repeats)]
        else:
            with patched(model, cell.method, budget=cell.budget, processor=processor, **options) as handle:
                for _ in range(warmup):
                    model.generate(**inputs, **settings)
                samples = [measure_generate(model, inputs, **settings) for _ in range(repeats)]
    except torch.OutOfMemoryError as error:
        cell.status, cell.error = "oom", str(error).splitlines()[0]
    except Exception as error:  # one broken cell must not end the grid: it is recorded
        cell.status, cell.error = "error", f"{type(error).__name__}: {error}"
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if cell.status != "ok":
        return
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


COLUMNS = [  # (header, key, format)
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
    ("peak MB", "peak_memory_bytes", "{:.0f}"),
    ("KV MB", "kv_cache_bytes", "{:.1f}"),
    ("prefill x ideal", "prefill_speedup_ideal", "{:.2f}"),
    ("prefill x measured", "prefill_speedup_measured", "{:.2f}"),
    ("TTFT x", "ttft_speedup", "{:.2f}"),
]


def format_table(rows: list[dict]) -> str:
    lines = []
    for row in rows:
        if row["status"] != "ok":
            message = f"{row['status'].upper()}: {row['error']}"
            lines.append([row["method"], row["budget"], row["batch_size"], message] + [""] * (len(COLUMNS) - 4))
            continue
        cells = []
        for _, key, fmt in COLUMNS:
            if key is None:
                cells.append(f"{row['visual_tokens_before']}->{row['visual_tokens_after']}")
            elif row.get(key) is None:
                cells.append("-")
            elif key.endswith("_bytes"):
                cells.append(fmt.format(row[key] / 2**20))
            else:
                cells.append(fmt.format(row[key]))
        lines.append(cells)
    memory = next((r["memory_kind"] for r in rows if r["status"] == "ok"), "-")
    caption = (
        f"Medians of the repeats. TTFT includes the vision pass and selection; decode tok/s excludes "
        f"prefill; peak memory: {memory}. prefill x: LLM prefill speedup over the unpatched model, "
        "ideal (FLOP ratio) and measured."
    )
    return text_table([header for header, _, _ in COLUMNS], lines) + "\n" + caption


def write(out: Path, rows: list[dict], meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps({"provenance": meta, "cells": rows}, indent=2) + "\n")
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with open(out / "profile.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    plot(out / "profile.png", rows, meta["device"])


def plot(path: Path, rows: list[dict], device: str) -> None:
    """Latency and peak memory against budget, one line per method and batch size, the
    unpatched model dashed."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend is left alone

    figure = Figure(figsize=(16, 4.8), layout="tight")
    axes = figure.subplots(1, 3)
    panels = (
        ("ttft_s", "time to first token (s)"),
        ("generate_s", "end-to-end latency (s)"),
        ("peak_memory_bytes", "peak memory (MB)"),
    )
    ok = [r for r in rows if r["status"] == "ok"]
    for ax, (key, label) in zip(axes, panels):
        scale = 2**20 if key.endswith("_bytes") else 1
        for batch in sorted({r["batch_size"] for r in ok}):
            for method in dict.fromkeys(r["method"] for r in ok if r["method"] != REFERENCE):
                points = sorted(
                    (r["features_kept"] / r["features_before"], r[key] / scale)
                    for r in ok
                    if r["method"] == method and r["batch_size"] == batch
                )
                ax.plot(*zip(*points), marker="o", label=f"{method}, batch {batch}")
            for r in ok:
                if r["method"] == REFERENCE and r["batch_size"] == batch:
                    ax.axhline(r[key] / scale, linestyle="--", color="grey", label=f"unpatched, batch {batch}")
        ax.set_xlabel("visual feature tokens kept (fraction)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(f"tokendrop profile on {device}")
    figure.savefig(path, dpi=100)

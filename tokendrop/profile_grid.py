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
import datetime
import gc
import json
import numbers
import statistics
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from PIL import Image
from tqdm.auto import tqdm

from . import __version__
from .adapters import adapter_for
from .method import METHODS, build as build_method
from .patch import ATTRIBUTE, patched, unpatch
from .profiling import device_name, measure_generate, model_device
from .registry import did_you_mean
from .selection import check_budget

REFERENCE = "none"  # the unpatched model's cells
TIMED = ("ttft_s", "generate_s", "decode_tok_per_s", "vision_s", "select_s", "llm_prefill_s",
         "peak_memory_bytes", "added_memory_bytes")


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
        flat = {"method": self.method, "budget": self.budget, "batch_size": self.batch_size,
                "status": self.status, "error": self.error, **self.tokens}
        for key, stats in self.figures.items():
            flat.update({key: stats["median"], f"{key}_min": stats["min"], f"{key}_max": stats["max"]})
        return flat


def profile(model, processor, methods=("hired",), budgets=(1.0, 0.4, 0.2, 0.1), batch_sizes=(1,), images=None,
            prompt: str = "Describe the image.", max_new_tokens: int = 8, repeats: int = 3, warmup: int = 1,
            out=None, options: dict | None = None, progress: bool = True) -> list[dict]:
    """Profile `model` (with `processor`) over methods x budgets x batch sizes; returns one
    record per cell (see `Cell.row`), and writes profile.json, profile.csv and plots to `out`
    when given. `images`: PIL images, used round-robin to fill each batch. `options`: method
    options, {method: {option: value}}. A patch already on `model` is lifted for the grid (the
    reference cells run unpatched) and put back afterwards."""
    adapter = adapter_for(model)
    methods, budgets, options = plan_grid(methods, budgets, options, processor, adapter)
    images = check_images(images)
    for name, value in (("repeats", repeats), ("max_new_tokens", max_new_tokens)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    batch_sizes = as_list(batch_sizes, "batch_sizes", "[1, 4]")
    if any(not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise ValueError(f"batch sizes must be ints >= 1, got {batch_sizes}")
    if out is not None:
        out = writable_folder(out)
    grid = [Cell(REFERENCE, None, b) for b in batch_sizes]
    grid += [Cell(m, v, b) for b in batch_sizes for m in methods for v in budgets]
    users_patch = model.__dict__.get(ATTRIBUTE)
    unpatch(model)
    try:
        for cell in tqdm(grid, desc="profile", disable=not progress):
            inputs = batch_inputs(processor, images, prompt, cell.batch_size, model)
            run_cell(model, processor, cell, inputs, max_new_tokens, repeats, warmup, options.get(cell.method, {}))
    finally:
        if users_patch is not None:
            users_patch._install()  # the user's own handle back in force, as `patched` restores one
    rows = [cell.row() for cell in grid]
    add_ratios(rows, model.config.get_text_config())
    if out is not None:
        write(out, rows, provenance(model, adapter, images, prompt, max_new_tokens, repeats, warmup, options))
    return rows


def plan_grid(methods, budgets, options, processor, adapter=None) -> tuple[list, list, dict]:
    """Check the methods, budgets and options by building every method x budget once (and,
    given the model's `adapter`, resolving it against the model): a bad option fails here,
    not in every cell. Needs only the processor, so the CLI calls it before the model loads."""
    methods = as_list(methods, "methods", "['hired']")
    for name in methods:
        METHODS.get(name)
    budgets = [check_budget(b) for b in as_list(budgets, "budgets", "[1.0, 0.2]")]
    options = {name: dict(opts) for name, opts in (options or {}).items()}
    for name, opts in options.items():
        if name not in methods:
            raise ValueError(f"options given for method {name!r}, which this profile does not run "
                             f"({', '.join(methods)}).{did_you_mean(name, methods)}")
        if "budget" in opts:
            raise ValueError(f"options for {name!r}: the budget is profiled; set it with budgets (--budgets), "
                             "not as an option")
    for name in methods:
        for budget in budgets:
            method = build_method(name, budget=budget, processor=processor, **options.get(name, {}))
            if adapter is not None:
                method.resolve(adapter)
    return methods, budgets, options


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
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    chosen = [images[i % len(images)] for i in range(batch_size)]
    inputs = processor(images=chosen, text=[text] * batch_size, return_tensors="pt", padding=True)
    return inputs.to(model_device(model), model.dtype)  # casts the pixels only


def run_cell(model, processor, cell: Cell, inputs, max_new_tokens, repeats, warmup, options) -> None:
    settings = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False)
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
    cell.figures = {key: summary([s[key] for s in samples]) for key in TIMED if samples[0][key] is not None}
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


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


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
            if ok else None
        )
        row["prefill_speedup_measured"] = ref["llm_prefill_s"] / row["llm_prefill_s"] if ok else None
        row["ttft_speedup"] = ref["ttft_s"] / row["ttft_s"] if ok else None


def provenance(model, adapter, images, prompt, max_new_tokens, repeats, warmup, options) -> dict:
    device = model_device(model)
    quant = getattr(model.config, "quantization_config", None)
    try:
        import bitsandbytes

        bnb_version = bitsandbytes.__version__
    except ImportError:
        bnb_version = None
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device_name(device),
        "versions": {"tokendrop": __version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "bitsandbytes": bnb_version},
        "dtype": str(model.dtype).removeprefix("torch."),
        "quantization": quant.to_dict() if hasattr(quant, "to_dict") else quant,
        "attn_implementation": model.config.get_text_config()._attn_implementation,
        "images": [{"size": list(image.size), "grid": list(adapter.layout((image.height, image.width)).grid)}
                   for image in images],
        "prompt": prompt, "max_new_tokens": max_new_tokens, "repeats": repeats, "warmup": warmup,
        "options": {m: {k: v for k, v in o.items() if k != "processor"} for m, o in options.items()},
    }


COLUMNS = [  # (header, key, format)
    ("method", "method", "{}"), ("budget", "budget", "{}"), ("batch", "batch_size", "{}"),
    ("visual tokens", None, None), ("LLM prompt", "llm_prompt_len", "{}"),
    ("vision s", "vision_s", "{:.3f}"), ("select s", "select_s", "{:.4f}"), ("prefill s", "llm_prefill_s", "{:.3f}"),
    ("TTFT s", "ttft_s", "{:.3f}"), ("decode tok/s", "decode_tok_per_s", "{:.2f}"), ("e2e s", "generate_s", "{:.3f}"),
    ("peak MB", "peak_memory_bytes", "{:.0f}"), ("KV MB", "kv_cache_bytes", "{:.1f}"),
    ("prefill x ideal", "prefill_speedup_ideal", "{:.2f}"), ("prefill x measured", "prefill_speedup_measured", "{:.2f}"),
    ("TTFT x", "ttft_speedup", "{:.2f}"),
]


def format_table(rows: list[dict]) -> str:
    lines = [[header for header, _, _ in COLUMNS]]
    for row in rows:
        if row["status"] != "ok":
            lines.append([row["method"], str(row["budget"]), str(row["batch_size"]), f"{row['status'].upper()}: {row['error']}"])
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
    widths = [max(len(line[i]) for line in lines if i < len(line) and len(line) == len(COLUMNS)) for i in range(len(COLUMNS))]
    text = []
    for line in lines:
        if len(line) < len(COLUMNS):  # a failed cell: its message after the key columns
            text.append("  ".join(c.rjust(w) for c, w in zip(line[:3], widths)) + "  " + line[3])
        else:
            text.append("  ".join(c.rjust(w) for c, w in zip(line, widths)))
    memory = next((r["memory_kind"] for r in rows if r["status"] == "ok"), "-")
    return "\n".join(text) + (
        f"\nMedians of the repeats. TTFT includes the vision pass and selection; decode tok/s excludes "
        f"prefill; peak memory: {memory}. prefill x: LLM prefill speedup over the unpatched model, "
        "ideal (FLOP ratio) and measured."
    )


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    panels = (("ttft_s", "time to first token (s)"), ("generate_s", "end-to-end latency (s)"),
              ("peak_memory_bytes", "peak memory (MB)"))
    ok = [r for r in rows if r["status"] == "ok"]
    for ax, (key, label) in zip(axes, panels):
        scale = 2**20 if key.endswith("_bytes") else 1
        for batch in sorted({r["batch_size"] for r in ok}):
            for method in dict.fromkeys(r["method"] for r in ok if r["method"] != REFERENCE):
                points = sorted((r["features_kept"] / r["features_before"], r[key] / scale)
                                for r in ok if r["method"] == method and r["batch_size"] == batch)
                ax.plot(*zip(*points), marker="o", label=f"{method}, batch {batch}")
            for r in ok:
                if r["method"] == REFERENCE and r["batch_size"] == batch:
                    ax.axhline(r[key] / scale, linestyle="--", color="grey", label=f"unpatched, batch {batch}")
        ax.set_xlabel("visual feature tokens kept (fraction)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(f"tokendrop profile on {device}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)

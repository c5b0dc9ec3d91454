"""What selection costs, without running the LLM.

    python -m tokendrop.eval.bench_selection [--preset llava-next-shape] [--repeats 5]
        [--batches 1 8] [--baseline REV | --baseline-archive TAR] [--threads N]
        [--out bench_selection.json]

Images are 672x672 in the preset's geometry (base + 4 crops: N = 2,880 feature tokens on
llava-next-shape), each an `EncodedImage` of random projected features and random CLS scores
at every vision layer; methods that read the question (text, router, dpp) get a fixed one.
On CPU, and on CUDA where available, it times (median, min and max over the repeats, after
one warm-up):
- methods: every registered method at 10% and 25% selecting for one image (`select_images`:
  selection, merging, keep masks), each median next to hired's;
- batches: a whole call's selection and compaction, up to what the LLM receives (encoded
  images -> the shortened input_ids, attention_mask and inputs_embeds with each image's kept
  vectors in place; the unpatched model embeds its prompt too), for batches of `--batches`
  images, this tree's batched path next to revision `--baseline`'s own (loaded from git, or
  from a `git archive` tar of it: its methods, its batched `select_images` or, before there
  was one, its loop image by image, its records, its compaction and embedding), the two
  taking turns call by call, with the ratio of their medians; the baseline is skipped
  without either. The default baseline is the last per-image revision; pass the previous
  commit to check a change for a slowdown;
- vision: the model's vision pass (tower, projector, packing) of one image, so that each
  method's select time reads against it.
Freed memory stays in the process (`steady_allocator`), for both paths alike: otherwise a
call's timing depends on whether the C library hands its buffers fresh pages.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import importlib
import io
import json
import re
import subprocess
import sys
import tarfile
import tempfile
from functools import partial
from pathlib import Path

import torch

from tokendrop.adapters import adapter_for
from tokendrop.harness import device_name, positive_int, spread, text_table
from tokendrop.layout import EncodedImage
from tokendrop.measure import time_call
from tokendrop.method import METHODS, build as build_method
from tokendrop.preset_specs import PRESETS
from tokendrop.presets import build_preset
from tokendrop.pruning import select_images

IMAGE_SIZE = (672, 672)
QUESTION = "What is written on the sign next to the red car?"
BASELINE = "fcf1067"  # the last revision that selected image by image on CPU tensors
BATCH_METHODS = ("hired", "globalcom2", "cls", "text", "dpp")
ROOT = Path(__file__).resolve().parents[1]


def encoded_images(model, adapter, device: torch.device, n: int, layout_module=None) -> list[EncodedImage]:
    """`n` images of random features and scores; with `layout_module` (the baseline's
    `tokendrop.layout`), built from its classes, with the CPU scores it expected."""
    generator = torch.Generator().manual_seed(0)
    layout = adapter.layout(IMAGE_SIZE)
    hidden = model.get_input_embeddings().weight.shape[1]
    images = []
    for _ in range(n):
        packed = torch.randn(layout.packed_source.numel(), hidden, generator=generator).to(device)
        probs = torch.rand(adapter.n_vision_layers, layout.n_partitions, layout.tile, generator=generator)
        cls = {layer: probs[layer] / probs[layer].sum(-1, keepdim=True) for layer in range(adapter.n_vision_layers)}
        images.append((packed, cls))
    if layout_module is not None:
        layout = layout_module.ImageLayout(layout.side, layout.grid, layout.packed_source)
    classes = EncodedImage if layout_module is None else layout_module.EncodedImage
    embedding = model.get_input_embeddings()
    return [
        classes(
            layout=layout,
            packed=packed,
            cls=cls if layout_module is not None else {k: v.to(device) for k, v in cls.items()},
            n_layers=adapter.n_vision_layers,
            embed=embedding,
            question=QUESTION,
        )
        for packed, cls in images
    ]


def timed(run, repeats: int, device: torch.device) -> dict:
    return timed_alike({"run": run}, repeats, device)["run"]


def timed_alike(runs: dict, repeats: int, device: torch.device) -> dict:
    """Each run's median, min and max, the runs taking turns call by call, so that a change in
    the machine's speed during the measurement falls on all of them alike."""
    for run in runs.values():
        time_call(run, device)  # warm-up: caches (layouts on the device, fixed selections) fill here
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(time_call(run, device))
    stats = {name: spread(t) for name, t in times.items()}
    return {name: dict(median_s=s["median"], min_s=s["min"], max_s=s["max"]) for name, s in stats.items()}


def load_baseline(revision: str, archive: Path | None = None):
    """The baseline revision's `tokendrop` package with its `adapters` folder inside it, imported
    under another package name (its adapters' absolute imports rewritten to it, so that none
    of today's code runs in it), from `archive` (the tar that `git archive REV tokendrop
    adapters` writes, for a machine without the history: its revision is read from it) or
    else from git revision `revision`; None without either. A revision with a batched
    `select_images` (in `pruning` or `patch`) is timed through it, an older one image by image."""
    if archive is not None:
        data = archive.read_bytes()
    else:
        try:
            data = subprocess.run(
                ["git", "-C", str(ROOT), "archive", revision, "tokendrop", "adapters"], capture_output=True, check=True
            ).stdout
        except (OSError, subprocess.CalledProcessError):
            return None
    folder = Path(tempfile.mkdtemp(prefix="tokendrop_baseline_"))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        revision = tar.pax_headers.get("comment", revision)[:7]  # git archive records the commit there
        tar.extractall(folder, filter="data")
    package = f"tokendrop_{revision}"
    (folder / "tokendrop").rename(folder / package)
    if not (folder / package / "adapters").exists():
        (folder / "adapters").rename(folder / package / "adapters")
        for path in (folder / package / "adapters").glob("*.py"):
            path.write_text(re.sub(r"\btokendrop\.", f"{package}.", path.read_text()))
    sys.path.insert(0, str(folder))
    methods = importlib.import_module(f"{package}.method")
    batched = None
    for home in ("pruning", "patch"):
        try:
            batched = getattr(importlib.import_module(f"{package}.{home}"), "select_images", None)
        except ImportError:
            continue
        if batched is not None:
            break
    return dict(
        revision=revision,
        layout=importlib.import_module(f"{package}.layout"),
        selection=importlib.import_module(f"{package}.selection"),
        base=importlib.import_module(f"{package}.method.base"),
        build=methods.build,
        adapter=importlib.import_module(f"{package}.adapters.llava_next").LlavaNextAdapter,
        select_images=batched,
    )


def baseline_call(baseline, adapter, method, images, inputs) -> None:
    """The baseline's pruning step after the vision pass, as its `Handle.prune` ran it: its
    batched `select_images` where it has one, else its loop image by image."""
    if baseline["select_images"] is not None:
        return batched_call(adapter, method, images, inputs, baseline["select_images"])
    selection, merged_type = baseline["selection"], baseline["base"].Merged
    keep_masks, kept_features, records = [], [], []
    for image in images:
        kept = merged = method.select(image)
        packed = image.packed
        if isinstance(merged, merged_type):
            kept = merged.indices
            packed = selection.merge_groups(packed, image.layout, kept, merged.groups, merged.weights)
        mask = selection.packed_keep_mask(image.layout, kept, method.newlines)
        keep_masks.append(mask)
        kept_features.append(packed[mask.to(packed.device)])
        records.append(
            (
                int(mask[image.layout.newline_positions].sum()),
                kept.tolist(),
                torch.bincount(image.layout.partition[kept], minlength=image.layout.n_partitions).tolist(),
            )
        )
    adapter.feed(inputs["input_ids"], inputs["attention_mask"], None, keep_masks, kept_features, "left", 0)


def batched_call(adapter, method, images, inputs, select=select_images) -> None:
    """The batched pruning step after the vision pass, as `Handle.prune` runs it."""
    selected, packed = select(method, images)
    keep_masks = [s.keep_mask for s in selected]
    adapter.feed(inputs["input_ids"], inputs["attention_mask"], None, keep_masks, packed, "left", 0)


def prompt(adapter, processor, n_images: int, device: torch.device) -> dict:
    """One prompt row per image: its placeholders, then the question's tokens."""
    length = adapter.layout(IMAGE_SIZE).packed_source.numel()
    question = processor.tokenizer(QUESTION, add_special_tokens=False).input_ids
    row = [adapter.image_token_id] * length + question
    input_ids = torch.tensor([row] * n_images, device=device)
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))


def time_methods(model, processor, adapter, device, repeats: int, budgets) -> dict:
    image = encoded_images(model, adapter, device, 1)
    rows = {}
    for name in METHODS.names():
        for budget in budgets:
            method = build_method(name, budget=budget, processor=processor).resolve(adapter)
            rows[f"{name}@{budget}"] = timed(partial(select_images, method, image), repeats, device)
    for key, row in rows.items():
        row["ratio_to_hired"] = row["median_s"] / rows[f"hired@{key.split('@')[1]}"]["median_s"]
    return rows


def time_vision(model, adapter, device, repeats: int) -> dict:
    side = model.config.vision_config.image_size
    pixels = torch.randn(1, adapter.layout(IMAGE_SIZE).n_partitions, 3, side, side, device=device)
    sizes = torch.tensor([IMAGE_SIZE], device=device)
    return timed(partial(adapter.image_features, pixels, sizes), min(repeats, 3), device)


def time_batches(model, processor, adapter, device, repeats: int, batches, budget, before) -> dict:
    rows = {}
    old_adapter = before["adapter"](model) if before else None
    for n in batches:
        images = encoded_images(model, adapter, device, n)
        inputs = prompt(adapter, processor, n, device)
        old_images = encoded_images(model, adapter, device, n, before["layout"]) if before else None
        for name in BATCH_METHODS:
            method = build_method(name, budget=budget, processor=processor).resolve(adapter)
            runs = dict(batched=partial(batched_call, adapter, method, images, inputs))
            if before:
                old = before["build"](name, budget=budget, processor=processor).resolve(adapter)
                runs["baseline"] = partial(baseline_call, before, old_adapter, old, old_images, inputs)
            row = timed_alike(runs, repeats, device)
            if before:
                row["speedup"] = row["baseline"]["median_s"] / row["batched"]["median_s"]
            rows[f"{name}@{budget} x{n}"] = row
    return rows


def benchmark(
    preset: str, repeats: int, devices: list[torch.device], batches=(1, 8), before=None, budgets=(0.1, 0.25)
) -> dict:
    """`before`: the loaded baseline (`load_baseline`), or None to time the batched path alone."""
    model, processor = build_preset(preset)
    model.eval()
    adapter = adapter_for(model)
    results = {}
    for device in devices:
        model.to(device)
        with torch.no_grad():
            results[str(device)] = dict(
                device_name=device_name(device),
                methods=time_methods(model, processor, adapter, device, repeats, budgets),
                vision=time_vision(model, adapter, device, repeats),
                batches=time_batches(model, processor, adapter, device, repeats, batches, budgets[0], before),
            )
    layout = adapter.layout(IMAGE_SIZE)
    return dict(
        preset=preset,
        image_size=list(IMAGE_SIZE),
        n_features=layout.n_features,
        repeats=repeats,
        budgets=list(budgets),
        batch_sizes=list(batches),
        baseline=before["revision"] if before else None,
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        devices=results,
    )


def ms(row: dict) -> list[str]:
    return [f"{row[key] * 1e3:.2f}" for key in ("median_s", "min_s", "max_s")]


def report(result: dict) -> str:
    lines = [
        f"selection, {result['preset']} {result['image_size']}, N = {result['n_features']}, "
        f"{result['repeats']} repeats, baseline {result['baseline'] or 'not loaded (no git history)'}, "
        f"freed memory {'kept' if result.get('steady_allocator') else 'left to the C library'}"
    ]
    for device, block in result["devices"].items():
        vision = block["vision"]["median_s"]
        rows = [
            [key, *ms(row), f"{row['ratio_to_hired']:.2f}", f"{row['median_s'] / vision:.3f}"]
            for key, row in block["methods"].items()
        ]
        lines.append(
            "\n"
            + text_table(
                ["method@budget", "median ms", "min ms", "max ms", "x hired", "x vision"],
                rows,
                title=f"one image: select, {device} ({block['device_name']}); vision pass {vision * 1e3:.1f} ms",
            )
        )
        rows = [
            [
                key,
                *ms(row["batched"]),
                *(ms(row["baseline"]) if "baseline" in row else [None] * 3),
                f"{row['speedup']:.2f}" if "speedup" in row else None,
            ]
            for key, row in block["batches"].items()
        ]
        lines.append(
            "\n"
            + text_table(
                ["method x batch", "new median ms", "min", "max", "baseline median ms", "min", "max", "speedup"],
                rows,
                title=f"one call: select + compact, to the LLM's inputs_embeds, {device}",
            )
        )
    return "\n".join(lines)


def steady_allocator() -> bool:
    """Keep freed memory in the process (glibc: no mmap for blocks up to 32 MB, no trimming),
    so that a call's fresh buffers cost their work, not the kernel's zeroing of new pages:
    left to glibc's adaptive threshold, the same call measured 3 or 5 ms on this benchmark's
    history. Both paths run under it. False where the C library has no mallopt."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tokendrop.eval.bench_selection", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--preset", choices=PRESETS.names(), default="llava-next-shape")
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--batches", type=positive_int, nargs="+", default=[1, 8])
    parser.add_argument("--baseline", default=BASELINE, help="git revision to time beside this tree ('' to skip)")
    parser.add_argument(
        "--baseline-archive",
        type=Path,
        help="the baseline as `git archive REV tokendrop adapters` wrote it, where there is no git",
    )
    parser.add_argument("--threads", type=positive_int, help="torch's CPU threads (default: torch's own)")
    parser.add_argument("--out", type=Path, default=Path("bench_selection.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    steady = steady_allocator()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    before = load_baseline(args.baseline, args.baseline_archive) if args.baseline or args.baseline_archive else None
    result = benchmark(args.preset, args.repeats, devices, tuple(args.batches), before)
    result["steady_allocator"] = steady
    print(report(result))
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

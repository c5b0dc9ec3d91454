"""Vision time before and after the early stop: the whole tower, as tokendrop ran it before,
next to the pass that stops at the deepest layer read.

    python -m tokendrop.eval.bench_vision [--preset llava-next-shape] [--repeats 5] [--images 1]
        [--out bench_vision.json]

For synthetic 672x672 images (base + 4 crops = 5 tiles each on llava-next-shape) and each of
`none` (no scores: the pass of the unpatched model and of methods that score nothing),
`hired` and `globalcom2`, two passes (tower, projector, packing, with that method's score
hooks) are timed:

    before  the model's own `get_image_features`: every layer, the last one included
    after   `adapter.vision_pass`: layers up to the deepest whose output is read; a deeper
            scored layer (GlobalCom2's last) computes only its q/k projections

All six run in one process, interleaved in a rotating order after a warm-up, so that drift of
the machine hits them alike; median, min and max over the repeats, and after/before ratios
of the medians and of the fastest runs. Before timing, one pass of each checks that features
and scores are bit-identical and counts the layers the short pass runs.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from tokendrop.adapters import adapter_for
from tokendrop.harness import REFERENCE, device_name, positive_int, provenance, spread, text_table
from tokendrop.measure import time_call
from tokendrop.method import build as build_method
from tokendrop.preset_specs import PRESETS, family
from tokendrop.presets import build_preset, synthetic_image

IMAGE_SIZE = (672, 672)
METHODS = (REFERENCE, "hired", "globalcom2")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def passes(adapter, pixel_values, image_sizes, signals: dict[int, str]) -> dict:
    """{"before", "after"}: each a function running one vision pass with the score hooks of
    `signals`, returning (packed features, {layer: scores})."""

    def before():
        with adapter.capture_scores(signals) as captured:
            packed = adapter.image_features(pixel_values, image_sizes)
        return packed, captured

    def after():
        with adapter.capture_scores(signals) as captured:
            packed = adapter.vision_pass(pixel_values, image_sizes, signals)
        return packed, captured

    return {"before": before, "after": after}


def identical(first, second) -> bool:
    (packed_a, scores_a), (packed_b, scores_b) = first, second
    same_features = len(packed_a) == len(packed_b) and all(torch.equal(a, b) for a, b in zip(packed_a, packed_b))
    same_scores = set(scores_a) == set(scores_b) and all(
        torch.equal(torch.cat(scores_a[layer]), torch.cat(scores_b[layer])) for layer in scores_a
    )
    return same_features and same_scores


def layers_run(adapter, run) -> int:
    """How many encoder layers one call of `run` runs (forward hooks on each)."""
    ran = set()
    hooks = [
        layer.register_forward_hook(lambda module, args, output, i=i: ran.add(i))
        for i, layer in enumerate(adapter.vision_layers)
    ]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return len(ran)


def benchmark(preset: str, repeats: int, device: torch.device, dtype: torch.dtype, n_images: int = 1) -> dict:
    load_before = os.getloadavg()[0]  # other processes' load skews CPU timings: keep it on record
    model, processor = build_preset(preset, dtype=dtype)
    model.to(device)
    adapter = adapter_for(model)
    pixels = processor.image_processor(
        [synthetic_image(*IMAGE_SIZE, seed=i) for i in range(n_images)], return_tensors="pt"
    )
    pixel_values, image_sizes = pixels["pixel_values"].to(device, dtype), pixels["image_sizes"].to(device)
    signals = {
        method: {} if method == REFERENCE else build_method(method, processor=processor).resolve(adapter).signals()
        for method in METHODS
    }
    runs = {
        f"{method}:{when}": run
        for method in METHODS
        for when, run in passes(adapter, pixel_values, image_sizes, signals[method]).items()
    }
    samples = {name: [] for name in runs}
    with torch.inference_mode():
        # one pass of each before timing: the check, and the warm-up
        checks = {method: identical(runs[f"{method}:before"](), runs[f"{method}:after"]()) for method in METHODS}
        depth = {method: layers_run(adapter, runs[f"{method}:after"]) for method in METHODS}
        names = list(runs)
        for repeat in range(repeats):
            shift = repeat % len(names)
            for name in names[shift:] + names[:shift]:
                samples[name].append(time_call(runs[name], device))
    variants = {name: {"time_s": spread(times) | {"samples": times}} for name, times in samples.items()}
    ratios = {}
    for method in METHODS:
        before, after = variants[f"{method}:before"]["time_s"], variants[f"{method}:after"]["time_s"]
        ratios[method] = {"median": after["median"] / before["median"], "min": after["min"] / before["min"]}
    config = {"preset": preset, "repeats": repeats, "images": n_images, "image_size": list(IMAGE_SIZE)}
    return provenance(config, model) | {
        "benchmark": "vision_pass",
        "device_name": device_name(device),
        "attn_implementation": adapter.vision_tower.config._attn_implementation,
        "tiles": int(pixel_values.shape[0] * pixel_values.shape[1]),
        "load_average_1m": [load_before, os.getloadavg()[0]],
        "signals": {method: {str(layer): kind for layer, kind in s.items()} for method, s in signals.items()},
        "layers_total": adapter.n_vision_layers,
        "layers_run": depth,
        "identical": checks,
        "variants": variants,
        "ratios": ratios,
    }


def report(result: dict) -> str:
    config = result["config"]
    lines = [
        f"{config['preset']} ({result['model']['dtype']}, {result['device_name']}, "
        f"{result['attn_implementation']}), {config['images']} image(s) of {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} = "
        f"{result['tiles']} tiles, {config['repeats']} repeats, load average "
        f"{result['load_average_1m'][0]:.2f} before, {result['load_average_1m'][1]:.2f} after"
    ]
    rows = []
    for method in METHODS:
        before, after = (result["variants"][f"{method}:{when}"]["time_s"] for when in ("before", "after"))
        rows.append(
            [
                method,
                str(result["signals"][method] or "-"),
                f"{result['layers_run'][method]}/{result['layers_total']}",
                f"{before['median']:.4f} ({before['min']:.4f}-{before['max']:.4f})",
                f"{after['median']:.4f} ({after['min']:.4f}-{after['max']:.4f})",
                "yes" if result["identical"][method] else "NO",
            ]
        )
    columns = ["method", "signals", "layers run", "before s (min-max)", "after s (min-max)", "identical"]
    lines.append(text_table(columns, rows))
    for method, ratio in result["ratios"].items():
        lines.append(f"{method}: after/before x{ratio['median']:.3f} (fastest runs x{ratio['min']:.3f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tokendrop.eval.bench_vision", description=__doc__.split("\n")[0])
    # hired's and globalcom2's scores are CLIP's CLS attention: LLaVA-NeXT presets only
    clip_presets = [name for name in PRESETS.names() if family(name) == "llava_next"]
    parser.add_argument("--preset", choices=clip_presets, default="llava-next-shape")
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--images", type=positive_int, default=1, help="images per pass (5 tiles each)")
    parser.add_argument("--out", type=Path, default=Path("bench_vision.json"))
    parser.add_argument("--device", type=torch.device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    args = parser.parse_args(argv)
    result = benchmark(args.preset, args.repeats, args.device, DTYPES[args.dtype], args.images)
    print(report(result))
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

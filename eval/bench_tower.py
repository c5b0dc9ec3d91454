"""Pruning inside the vision tower against pruning after it: the vision pass and the time to
first token, side by side.

    python -m tokendrop.eval.bench_tower [--preset llava-next-shape] [--method hired]
        [--budgets 0.2 0.1] [--layers K ...] [--repeats 3] [--images 1] [--out bench_tower.json]

For synthetic 672x672 images (llava-next-shape: base + 4 crops, 2,928 visual tokens each), one
prompt per image in one batch, every variant runs `generate` for one new token, timed as
`tokendrop.profile` times it (`measure.measure_generate`):

    none        the unpatched model
    after B     `method` at budget B, selecting after the tower (`patch(..., budget=B)`)
    K=k B       the same, selecting inside the tower at vision layer k (`vision_prune_layer=k`);
                default layers: a quarter, half and three quarters of the way to the feature layer

All run in one process, interleaved: after one warm-up run of each, every repeat runs each
variant once, in an order rotated by one per repeat, so that drift of the machine hits them
alike. Reported per variant: time to first token (vision pass, selection, LLM prefill), the
vision pass (`vision_s`: tower, projector and packing; inside the tower both of its parts),
the LLM prefill and the LLM's prompt length; each as median, min and max, and the speedups
over the unpatched model (ratio of the medians, and of the fastest runs).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

import tokendrop
from tokendrop.adapters import adapter_for
from tokendrop.harness import REFERENCE, chat_prompt, device_name, positive_int, provenance, spread, text_table
from tokendrop.measure import measure_generate
from tokendrop.preset_specs import PRESETS, family
from tokendrop.presets import build_preset, synthetic_image
from tokendrop.selection import check_budget

IMAGE_SIZE = (672, 672)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FIGURES = ("ttft_s", "vision_s", "select_s", "llm_prefill_s")


def default_layers(adapter) -> list[int]:
    """A quarter, half and three quarters of the way from the first layer to the feature layer."""
    feature = adapter.feature_layer % adapter.n_vision_layers
    return sorted({min(feature - 1, max(0, round(feature * share))) for share in (0.25, 0.5, 0.75)})


def variants(method: str, budgets: list, layers: list[int]) -> dict[str, dict | None]:
    """{name: patch arguments (None: unpatched)}, in the order they are reported."""
    found = {REFERENCE: None}
    for budget in budgets:
        found[f"after {budget}"] = dict(method=method, budget=budget)
        for layer in layers:
            found[f"K={layer} {budget}"] = dict(method=method, budget=budget, vision_prune_layer=layer)
    return found


def run_once(model, inputs, patch: dict | None) -> dict:
    """One timed generate of one new token under `patch` (None: unpatched), and the tokens kept."""
    if patch is None:
        figures = measure_generate(model, inputs, max_new_tokens=1, do_sample=False)
        return figures | {"kept": None}
    with tokendrop.patched(model, **patch) as handle:
        figures = measure_generate(model, inputs, max_new_tokens=1, do_sample=False)
        return figures | {"kept": sum(record.n_kept for record in handle.last)}


def benchmark(
    preset: str,
    method: str,
    budgets: list,
    layers: list[int] | None,
    repeats: int,
    device: torch.device,
    dtype: torch.dtype,
    n_images: int = 1,
) -> dict:
    load_before = os.getloadavg()[0]  # other processes' load skews CPU timings: keep it on record
    model, processor = build_preset(preset, dtype=dtype)
    model.to(device)
    adapter = adapter_for(model)
    layers = default_layers(adapter) if layers is None else layers
    runs = variants(method, budgets, layers)
    for patch in runs.values():  # every variant checked before anything is timed
        if patch is not None:
            tokendrop.patch(model, **patch)
            tokendrop.unpatch(model)
    images = [synthetic_image(*IMAGE_SIZE, seed=i) for i in range(n_images)]
    text = chat_prompt(processor, "Describe the image.")
    inputs = processor(images=images, text=[text] * n_images, return_tensors="pt", padding=True)
    inputs = inputs.to(device, dtype)  # casts the pixels only
    samples = {name: [] for name in runs}
    names = list(runs)
    with torch.inference_mode():
        for name in names:  # warm-up, unmeasured
            run_once(model, inputs, runs[name])
        for repeat in range(repeats):
            shift = repeat % len(names)
            for name in names[shift:] + names[:shift]:
                samples[name].append(run_once(model, inputs, runs[name]))
    results = {}
    for name, runs_of in samples.items():
        results[name] = {
            key: spread(r[key] for r in runs_of) | {"samples": [r[key] for r in runs_of]} for key in FIGURES
        }
        results[name] |= {"llm_prompt_len": runs_of[0]["llm_prompt_len"], "kept": runs_of[0]["kept"]}
        results[name] |= {"patch": runs[name]}
    reference = results[REFERENCE]
    for figures in results.values():
        figures["speedup"] = {
            key: {
                "median": reference[key]["median"] / figures[key]["median"],
                "fastest": reference[key]["min"] / figures[key]["min"],
            }
            for key in ("ttft_s", "vision_s")
        }
    config = {
        "preset": preset,
        "method": method,
        "budgets": budgets,
        "layers": layers,
        "repeats": repeats,
        "images": n_images,
        "image_size": list(IMAGE_SIZE),
    }
    return provenance(config, model) | {
        "benchmark": "vision_prune_layer",
        "device_name": device_name(device),
        "attn_implementation": adapter.vision_tower.config._attn_implementation,
        "vision_layers": adapter.n_vision_layers,
        "feature_layer": adapter.feature_layer % adapter.n_vision_layers,
        "load_average_1m": [load_before, os.getloadavg()[0]],
        "variants": results,
    }


def report(result: dict) -> str:
    config = result["config"]
    lines = [
        f"{config['preset']} ({result['model']['dtype']}, {result['device_name']}, {result['attn_implementation']}), "
        f"{config['images']} image(s) of {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}, {config['method']}, feature layer "
        f"{result['feature_layer']} of {result['vision_layers']}, {config['repeats']} repeats interleaved, load "
        f"average {result['load_average_1m'][0]:.2f} before, {result['load_average_1m'][1]:.2f} after"
    ]

    def timed(figures: dict) -> str:
        return f"{figures['median']:.3f} ({figures['min']:.3f}-{figures['max']:.3f})"

    rows = []
    for name, figures in result["variants"].items():
        speedup = figures["speedup"]
        rows.append(
            [
                name,
                figures["kept"] if figures["kept"] is not None else "all",
                figures["llm_prompt_len"],
                timed(figures["vision_s"]),
                timed(figures["llm_prefill_s"]),
                timed(figures["ttft_s"]),
                f"{speedup['vision_s']['median']:.2f} ({speedup['vision_s']['fastest']:.2f})",
                f"{speedup['ttft_s']['median']:.2f} ({speedup['ttft_s']['fastest']:.2f})",
            ]
        )
    columns = [
        "variant",
        "kept",
        "LLM prompt",
        "vision s",
        "prefill s",
        "TTFT s",
        "vision x",
        "TTFT x",
    ]
    lines.append(text_table(columns, rows))
    lines.append(
        "Medians (min-max) of the repeats; x: the unpatched model's median over the variant's (in brackets: of "
        "the fastest runs). K=k: selection inside the vision tower at layer k; after: after the tower."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tokendrop.eval.bench_tower", description=__doc__.split("\n")[0])
    towers = [name for name in PRESETS.names() if family(name) in ("llava_next", "llava_onevision")]
    parser.add_argument("--preset", choices=towers, default="llava-next-shape")
    parser.add_argument("--method", default="hired")
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.2, 0.1])
    parser.add_argument("--layers", nargs="+", type=int, help="default: 1/4, 1/2, 3/4 of the feature layer")
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--images", type=positive_int, default=1, help="images (prompts) per call")
    parser.add_argument("--out", type=Path, default=Path("bench_tower.json"))
    parser.add_argument("--device", type=torch.device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    args = parser.parse_args(argv)
    budgets = [check_budget(b) for b in args.budgets]
    result = benchmark(
        args.preset, args.method, budgets, args.layers, args.repeats, args.device, DTYPES[args.dtype], args.images
    )
    print(report(result))
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

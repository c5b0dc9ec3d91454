"""What tokendrop's CLS-score hooks cost on the vision pass, next to the alternative.

    python -m tokendrop.eval.bench_scoring [--preset llava-next-shape] [--repeats 3] [--out bench_scoring.json]

For one synthetic 672x672 image (base + 4 crops = 5 tiles) three variants of the vision pass
(`get_image_features`: tower, projector, packing) are timed and metered:

    plain             the model's own pass, as in an unpatched model
    hooks:METHOD      the same inside `capture_cls_scores`, for the layers METHOD scores
    eager_attentions  eager attention with `output_attentions=True`, the usual way to get
                      CLS attention: it materialises every layer's L x L maps

Target: the hooks add <= 3% time and <= 100 MB peak memory to the plain pass. The variants
are interleaved (in a rotating order) after a warm-up so that drift of the machine hits all
alike; medians are reported with min and max. One more pass checks that the hooks' scores
equal eager attention's CLS row (summed over heads) at those layers.
"""

from __future__ import annotations

import argparse
import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch

from tokendrop.adapters import adapter_for
from tokendrop.harness import positive_int, provenance, spread, text_table
from tokendrop.measure import measure_call
from tokendrop.method import METHODS, Method, build as build_method
from tokendrop.preset_specs import PRESETS, family
from tokendrop.presets import build_preset, synthetic_image
from tokendrop.scoring import capture_cls_scores

IMAGE_SIZE = (672, 672)
TARGET = {"time_ratio": 1.03, "extra_memory_bytes": 100 * 2**20}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def method_layers(model, method: str) -> tuple[dict[int, torch.nn.Module], dict[int, str]]:
    """The attention modules and signal kinds `method` asks the vision pass for, by layer."""
    adapter = adapter_for(model)
    signals = build_method(method).resolve(adapter).signals()
    kinds = {layer % adapter.n_vision_layers: kind for layer, kind in signals.items()}
    return {layer: adapter.vision_layers[layer].self_attn for layer in kinds}, kinds


@contextmanager
def eager_vision(model):
    """Switch the vision tower to eager attention (the only one that returns maps) for a block."""
    tower = adapter_for(model).vision_tower
    previous = tower.config._attn_implementation
    tower.set_attn_implementation("eager")
    try:
        yield
    finally:
        tower.set_attn_implementation(previous)


def variants(model, pixel_values, image_sizes, scored: dict[str, tuple]) -> dict:
    """The plain pass, one hooked pass per method (`scored`: method -> (attention, kinds)),
    and the eager pass with attention maps."""
    adapter = adapter_for(model)

    def plain():
        return adapter.image_features(pixel_values, image_sizes)

    def hooked(attention, kinds):
        def run():
            with capture_cls_scores(attention, kinds):
                return adapter.image_features(pixel_values, image_sizes)

        return run

    def eager_attentions():
        with eager_vision(model):
            return adapter.vision_attentions(pixel_values, image_sizes)

    hooks = {f"hooks:{method}": hooked(*layers) for method, layers in scored.items()}
    return {"plain": plain, **hooks, "eager_attentions": eager_attentions}


def score_differences(model, pixel_values, image_sizes, attention, kinds) -> dict[int, float]:
    """Max |hook score - eager probability| per layer, from one pass that yields both. Only
    probabilities have an eager counterpart (logits are checked by the test suite)."""
    kinds = {layer: kind for layer, kind in kinds.items() if kind == "probs"}
    with capture_cls_scores(attention, kinds) as captured, eager_vision(model):
        maps = adapter_for(model).vision_attentions(pixel_values, image_sizes)
    differences = {}
    for layer in kinds:
        eager = maps[layer][:, :, 0, 1:].float().sum(1)  # CLS row, non-CLS keys, summed over heads
        differences[layer] = float((captured[layer][0] - eager).abs().max())
    return differences


def interleaved(runs: dict, repeats: int, device) -> dict[str, list[dict]]:
    """Every repeat runs each variant once, starting one variant later each time, so that
    drift of the machine (other processes, heat) hits all variants alike."""
    names = list(runs)
    samples = {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(measure_call(runs[name], device))
    return samples


def summarise(samples: list[float]) -> dict:
    return spread(samples) | {"samples": samples}


def benchmark(preset: str, repeats: int, device: torch.device, dtype: torch.dtype, methods=("hired",)) -> dict:
    load_before = os.getloadavg()[0]  # other processes' load skews CPU timings: keep it on record
    model, processor = build_preset(preset, dtype=dtype)
    model.to(device)
    pixels = processor.image_processor(synthetic_image(*IMAGE_SIZE), return_tensors="pt")
    pixel_values, image_sizes = pixels["pixel_values"].to(device, dtype), pixels["image_sizes"].to(device)
    scored = {method: method_layers(model, method) for method in methods}
    runs = variants(model, pixel_values, image_sizes, scored)
    with torch.inference_mode():
        differences = {
            method: score_differences(model, pixel_values, image_sizes, *layers) for method, layers in scored.items()
        }
        for run in runs.values():
            run()  # warm-up
        samples = interleaved(runs, repeats, device)
    stats = {
        name: {
            key: summarise([s[key] for s in runs_of]) for key in ("time_s", "peak_memory_bytes", "added_memory_bytes")
        }
        for name, runs_of in samples.items()
    }
    return {
        "benchmark": "scoring_overhead",
        # date, git revision, versions, device name, model dtype: the shape every output file has
        "provenance": provenance({"preset": preset, "methods": list(methods), "repeats": repeats}, model),
        "preset": preset,
        "dtype": str(dtype).removeprefix("torch."),
        "vision_attn_implementation": adapter_for(model).vision_tower.config._attn_implementation,
        "image_size": list(IMAGE_SIZE),
        "tiles": int(pixel_values.shape[1]),
        "scored_layers": {method: kinds for method, (_, kinds) in scored.items()},
        "repeats": repeats,
        "load_average_1m": [load_before, os.getloadavg()[0]],
        "memory_kind": samples["plain"][0]["memory_kind"],
        "variants": stats,
        "ratios": {f"{name}/plain": ratios(stats[name], stats["plain"]) for name in runs if name != "plain"},
        "hooks_extra_memory_bytes": {
            name: stats[name]["added_memory_bytes"]["median"] - stats["plain"]["added_memory_bytes"]["median"]
            for name in runs
            if name.startswith("hooks:")
        },
        "score_max_abs_diff": differences,
        "target": TARGET,
    }


def ratios(variant: dict, plain: dict) -> dict:
    """Medians over the plain pass's medians; also the fastest over the fastest, the figure
    least moved by other processes on a shared CPU."""
    return {
        "time_s": variant["time_s"]["median"] / plain["time_s"]["median"],
        "time_s_min": variant["time_s"]["min"] / plain["time_s"]["min"],
        "peak_memory_bytes": variant["peak_memory_bytes"]["median"] / plain["peak_memory_bytes"]["median"],
    }


def meets_target(result: dict, name: str) -> bool:
    return (
        result["ratios"][f"{name}/plain"]["time_s"] <= TARGET["time_ratio"]
        and result["hooks_extra_memory_bytes"][name] <= TARGET["extra_memory_bytes"]
    )


def report(result: dict) -> str:
    mb = 2**20
    lines = [
        f"{result['preset']} ({result['dtype']}, {result['provenance']['device']}), "
        f"one {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} image = {result['tiles']} tiles, "
        f"scored layers {result['scored_layers']}, "
        f"{result['repeats']} repeats, memory: {result['memory_kind']}, "
        f"load average {result['load_average_1m'][0]:.2f} before, {result['load_average_1m'][1]:.2f} after",
    ]
    rows = []
    for name, stats in result["variants"].items():
        time_s, peak, added = stats["time_s"], stats["peak_memory_bytes"], stats["added_memory_bytes"]
        rows.append(
            [
                name,
                f"{time_s['median']:.3f} ({time_s['min']:.3f}-{time_s['max']:.3f})",
                f"{peak['median'] / mb:.0f}",
                f"{added['median'] / mb:.0f}",
            ]
        )
    lines.append(text_table(["variant", "time s (min-max)", "peak MB", "added MB"], rows))
    for name, ratio in result["ratios"].items():
        lines.append(
            f"{name}: time x{ratio['time_s']:.3f} (fastest runs x{ratio['time_s_min']:.3f}), "
            f"peak memory x{ratio['peak_memory_bytes']:.3f}"
        )
    for name, extra in result["hooks_extra_memory_bytes"].items():
        lines.append(
            f"{name} adds {extra / mb:.1f} MB over the plain pass; target (<= x{TARGET['time_ratio']} time, "
            f"<= {TARGET['extra_memory_bytes'] // mb} MB): " + ("met" if meets_target(result, name) else "NOT met")
        )
    for method, diffs in result["score_max_abs_diff"].items():
        if diffs:
            shown = ", ".join(f"layer {layer}: {diff:.1e}" for layer, diff in diffs.items())
            lines.append(f"{method} hook probabilities vs eager attention, max abs diff: {shown}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tokendrop.eval.bench_scoring", description=__doc__.split("\n")[0])
    # the CLS hooks and eager CLS rows below are CLIP's: LLaVA-NeXT presets only
    clip_presets = [name for name in PRESETS.names() if family(name) == "llava_next"]
    parser.add_argument("--preset", choices=clip_presets, default="llava-next-shape")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["hired", "globalcom2"],
        choices=[m for m in METHODS.names() if METHODS.get(m).signals is not Method.signals],
        help="methods whose score hooks are measured (those that score with CLS attention)",
    )
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench_scoring.json"))
    parser.add_argument("--device", type=torch.device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    args = parser.parse_args(argv)
    result = benchmark(args.preset, args.repeats, args.device, DTYPES[args.dtype], args.methods)
    print(report(result))
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

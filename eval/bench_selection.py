"""What each method's selection costs, without running the model.

    python -m tokendrop.eval.bench_selection [--preset llava-next-shape] [--repeats 5] [--out bench_selection.json]

For one 672x672 image of the preset's geometry (base + 4 crops: N = 2,880 feature tokens on
llava-next-shape) an `EncodedImage` is built from random projected features, random CLS
scores at every vision layer and the preset's embedding table; then `method.select` plus
`packed_keep_mask` (what the patch runs per image) is timed for every registered method at
each budget, on CPU and on CUDA where available: median, min and max over the repeats after
one warm-up, and each method's median next to hired's. Methods that read the question
(text, router, dpp) get a fixed one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch

from tokendrop.adapters import adapter_for
from tokendrop.harness import positive_int, spread, text_table
from tokendrop.layout import EncodedImage
from tokendrop.measure import device_name, synchronize
from tokendrop.method import METHODS, build as build_method
from tokendrop.method.base import Merged
from tokendrop.presets import PRESETS, build_preset
from tokendrop.selection import merge_groups, packed_keep_mask

IMAGE_SIZE = (672, 672)
QUESTION = "What is written on the sign next to the red car?"


def encoded_image(model, adapter, device: torch.device, seed: int = 0) -> EncodedImage:
    generator = torch.Generator().manual_seed(seed)
    layout = adapter.layout(IMAGE_SIZE)
    hidden = model.get_input_embeddings().weight.shape[1]
    packed = torch.randn(layout.packed_source.numel(), hidden, generator=generator).to(device)
    probs = torch.rand(adapter.n_vision_layers, layout.n_partitions, layout.tile, generator=generator)
    cls = {layer: probs[layer] / probs[layer].sum(-1, keepdim=True) for layer in range(adapter.n_vision_layers)}
    embedding = model.get_input_embeddings()
    return EncodedImage(
        layout=layout, packed=packed, cls=cls, n_layers=adapter.n_vision_layers, embed=embedding, question=QUESTION
    )


def time_select(method, image: EncodedImage, repeats: int, device: torch.device) -> dict:
    @torch.no_grad()  # as in the patch: selection never builds a graph
    def run():
        synchronize(device)
        start = time.perf_counter()
        kept = method.select(image)
        if isinstance(kept, Merged):  # a merging method's cost includes forming its means
            merge_groups(image.packed, image.layout, kept.indices, kept.groups, kept.weights)
            kept = kept.indices
        packed_keep_mask(image.layout, kept, method.newlines)
        synchronize(device)
        return time.perf_counter() - start, kept.numel()

    run()  # warm-up
    samples, kept = zip(*(run() for _ in range(repeats)))
    stats = spread(samples)
    return dict(median_s=stats["median"], min_s=stats["min"], max_s=stats["max"], kept=kept[0])


def benchmark(preset: str, repeats: int, devices: list[torch.device], budgets=(0.1, 0.25)) -> dict:
    model, processor = build_preset(preset)
    adapter = adapter_for(model)
    results = {}
    for device in devices:
        model.get_input_embeddings().to(device)
        image = encoded_image(model, adapter, device)
        rows = {}
        for name in METHODS.names():
            for budget in budgets:
                method = build_method(name, budget=budget, processor=processor).resolve(adapter)
                rows[f"{name}@{budget}"] = time_select(method, image, repeats, device)
        for key, row in rows.items():
            row["ratio_to_hired"] = row["median_s"] / rows[f"hired@{key.split('@')[1]}"]["median_s"]
        results[str(device)] = dict(device_name=device_name(device), methods=rows)
    layout = adapter.layout(IMAGE_SIZE)
    return dict(
        preset=preset,
        image_size=list(IMAGE_SIZE),
        n_features=layout.n_features,
        repeats=repeats,
        budgets=list(budgets),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        devices=results,
    )


def report(result: dict) -> str:
    lines = [
        f"select + keep mask, {result['preset']} {result['image_size']}, N = {result['n_features']}, "
        f"{result['repeats']} repeats"
    ]
    for device, block in result["devices"].items():
        rows = [
            [
                key,
                row["kept"],
                f"{row['median_s'] * 1e3:.2f}",
                f"{row['min_s'] * 1e3:.2f}",
                f"{row['max_s'] * 1e3:.2f}",
                f"{row['ratio_to_hired']:.2f}",
            ]
            for key, row in block["methods"].items()
        ]
        lines.append(
            "\n"
            + text_table(
                ["method@budget", "kept", "median ms", "min ms", "max ms", "x hired"],
                rows,
                title=f"{device} ({block['device_name']})",
            )
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tokendrop.eval.bench_selection", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--preset", choices=PRESETS.names(), default="llava-next-shape")
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench_selection.json"))
    args = parser.parse_args(argv)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    result = benchmark(args.preset, args.repeats, devices)
    print(report(result))
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

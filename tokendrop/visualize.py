"""See what a method keeps: the image with kept patches bright and dropped ones dimmed, one
panel for the base view and one for the crop canvas, built on `handle.last`. For a merging
method, the patches merged into a kept token are half bright and every group is outlined."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .checks import UsageError, UsageTypeError
from .harness import chat_prompt
from .patch import patched

DIM = 0.25  # brightness of dropped patches
MERGED = 0.6  # brightness of patches merged into a kept token


def show(
    model,
    processor,
    image,
    method: str,
    budget: float | int = 0.2,
    question: str = "Describe the image.",
    out=None,
    vision_prune_layer: int | None = None,
    **options,
):
    """Patch `model` with `method` for one request on `image`, and draw what it kept.
    `vision_prune_layer`: select inside the vision tower at that layer (as `patch`).
    Returns the matplotlib figure (and saves it to `out` if given)."""
    if not isinstance(image, Image.Image):
        raise UsageTypeError(
            f"image must be a PIL image (open a file with PIL.Image.open(path)), got a {type(image).__name__}"
        )
    if out is not None:
        check_figure_path(out)
    from matplotlib.figure import Figure  # no pyplot: the caller's backend (a notebook's) is left alone

    image = image.convert("RGB")
    inputs = processor(images=[image], text=[chat_prompt(processor, question)], return_tensors="pt").to(model.device)
    with (
        patched(
            model, method, budget=budget, processor=processor, vision_prune_layer=vision_prune_layer, **options
        ) as handle,
        torch.no_grad(),
    ):
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
    record = handle.last[0]
    (layout,) = handle.adapter.input_layouts(inputs)
    base, canvas = kept_grids(layout, record.indices)
    labels = (None, None) if record.groups is None else group_labels(layout, record.groups)

    panels = [(base, labels[0], "base view"), (canvas, labels[1], "crop canvas")]
    if layout.n_partitions == 1:  # no crops: the image at its own resolution (Qwen-VL), or a base view alone
        panels = [(base, labels[0], "image" if layout.base_shape else "base view")]
    figure = Figure(figsize=(max(10, 6 * len(panels)), 5.5), layout="tight")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (grid, label, name) in zip(axes, panels):
        ax.imshow(dimmed(image, grid, None if label is None else label >= 0))
        kept = int(grid.sum())
        title = f"{name}: {kept}/{grid.size} patches kept ({grid.shape[0]}x{grid.shape[1]} grid)"
        if label is not None:
            title += f", {int(((label >= 0) & ~grid).sum())} merged into them"
            outline(ax, label, image.size)
        ax.set_title(title)
        ax.axis("off")
    where = "" if handle.prune_layer is None else f" at vision layer {handle.prune_layer}"
    figure.suptitle(
        f"{method}{where}, budget {budget}: {record.n_kept}/{record.n_before} visual tokens kept, "
        f"{record.n_newlines} newlines; per partition {record.partitions}"
    )
    if out is not None:
        figure.savefig(out, dpi=100)
    return figure


def check_figure_path(out) -> None:
    """Refuse, before the model runs, a path the figure could not be saved to."""
    from matplotlib.backend_bases import FigureCanvasBase

    out = Path(out)
    formats = FigureCanvasBase.get_supported_filetypes()
    if out.suffix and out.suffix[1:].lower() not in formats:
        raise UsageError(
            f"cannot write the figure as {out}: matplotlib writes {', '.join(sorted(formats))}; "
            f"name it e.g. {out.with_suffix('.png')}"
        )
    if out.is_dir():
        raise UsageError(f"the figure path {out} is a folder: name the PNG to write, e.g. {out / 'kept.png'}")
    if not out.parent.is_dir():
        raise UsageError(f"cannot write {out}: the folder {out.parent} does not exist; create it first")


def kept_grids(layout, indices) -> tuple[np.ndarray, np.ndarray]:
    """Boolean grids of kept patches: the base tile and the unpadded crop canvas."""
    kept = torch.zeros(layout.n_features, dtype=torch.bool)
    kept[torch.as_tensor(indices, dtype=torch.long)] = True
    in_base = layout.partition == 0
    base = np.zeros(layout.tile_shape, dtype=bool)
    base.flat[layout.local[in_base & kept].numpy()] = True
    y0, y1, x0, x1 = layout.valid_box
    canvas = np.zeros((y1 - y0, x1 - x0), dtype=bool)
    y, x = layout.canvas_yx
    crop_kept = ~in_base & kept
    canvas[(y[crop_kept] - y0).numpy(), (x[crop_kept] - x0).numpy()] = True
    return base, canvas


def group_labels(layout, groups) -> tuple[np.ndarray, np.ndarray]:
    """Integer grids (base tile, unpadded crop canvas): the number of the group each patch was
    merged into (groups numbered in `groups` order), -1 for patches in no group."""
    label = torch.full((layout.n_features,), -1, dtype=torch.long)
    for j, group in enumerate(groups):
        label[torch.as_tensor(group, dtype=torch.long)] = j
    in_base = layout.partition == 0
    base = np.full(layout.tile_shape, -1)
    base.flat[layout.local[in_base].numpy()] = label[in_base].numpy()
    y0, y1, x0, x1 = layout.valid_box
    canvas = np.full((y1 - y0, x1 - x0), -1)
    y, x = layout.canvas_yx
    canvas[(y[~in_base] - y0).numpy(), (x[~in_base] - x0).numpy()] = label[~in_base].numpy()
    return base, canvas


def outline(ax, labels: np.ndarray, size: tuple[int, int]) -> None:
    """Draw the borders between neighbouring patches of different groups (either one in a
    group) over an image of `size` (width, height) spanned by the grid `labels`."""
    from matplotlib.collections import LineCollection

    if labels.size == 0:
        return
    (height, width), (rows, cols) = (size[1], size[0]), labels.shape
    y = lambda r: r * height / rows - 0.5  # noqa: E731  (cell edge r in imshow's pixel coordinates)
    x = lambda c: c * width / cols - 0.5  # noqa: E731
    segments = []
    differs = (labels[:, 1:] != labels[:, :-1]) & ((labels[:, 1:] >= 0) | (labels[:, :-1] >= 0))
    segments += [[(x(c + 1), y(r)), (x(c + 1), y(r + 1))] for r, c in zip(*np.nonzero(differs))]
    differs = (labels[1:] != labels[:-1]) & ((labels[1:] >= 0) | (labels[:-1] >= 0))
    segments += [[(x(c), y(r + 1)), (x(c + 1), y(r + 1))] for r, c in zip(*np.nonzero(differs))]
    ax.add_collection(LineCollection(segments, colors="white", linewidths=0.6))


def dimmed(image, grid: np.ndarray, merged: np.ndarray | None = None) -> np.ndarray:
    """The image with the cells of `grid` that are False dimmed (to MERGED where `merged` is
    True: merged into a kept token); both views show the whole image (the base squashed, the
    canvas unpadded), so the grid spans the image."""
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    rows = np.arange(pixels.shape[0]) * grid.shape[0] // pixels.shape[0]
    cols = np.arange(pixels.shape[1]) * grid.shape[1] // pixels.shape[1]
    dropped = DIM if merged is None else np.where(merged[rows][:, cols], MERGED, DIM)
    brightness = np.where(grid[rows][:, cols], 1.0, dropped)
    return pixels * brightness[..., None]

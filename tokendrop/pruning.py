"""One request's selection, shared by `tokendrop.patch` and the vLLM integration: the images
an adapter encoded -> each image's kept tokens (exact budget, merged where the method merges,
plus the newlines its policy keeps) and the packed vectors they take their values from.

    images = adapter.read(...)                    (or a server's own vision pass)
    selected, packed = select_images(method, images)
    image i gives the LLM packed[i][selected[i].keep_mask]

`Selected.record()` reads one image's selection back as the `ImageRecord` users see in
`handle.last`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .layout import EncodedImage, ImageBatch, ImageLayout
from .method import Method
from .selection import Grouping, merge, packed_keep_mask


@dataclass(frozen=True)
class ImageRecord:
    """What happened to one image in the last call."""

    n_before: int  # feature tokens the unpatched model feeds the LLM (newlines excluded)
    n_kept: int  # feature tokens kept
    n_newlines: int  # newline tokens kept
    indices: list[int]  # kept feature indices: base first, then the unpadded canvas row by row
    partitions: list[int]  # kept count per partition, base first
    # merging methods only (None for a subset): for each kept index, the feature indices whose
    # mean the LLM received there (ascending; the kept index first; a token kept as it is, alone)
    groups: list[list[int]] | None = None
    weights: list[list[float]] | None = None  # the mean's weights per group, where not plain


@dataclass(frozen=True, eq=False)
class Selected:
    """One image's selection as the call left it on the device; `record()` reads it back."""

    layout: ImageLayout
    kept: torch.Tensor  # (N,) bool over the features
    keep_mask: torch.Tensor  # (L,) bool over the packed sequence: what the LLM receives
    grouping: Grouping | None  # merging methods: each feature's owner (and weight)

    def record(self) -> ImageRecord:
        layout = self.layout
        indices = torch.nonzero(self.kept.cpu()).flatten()
        groups = weights = None
        if self.grouping is not None:
            owner = self.grouping.owner.cpu()
            members = torch.sort(owner, stable=True).indices[int((owner < 0).sum()) :]  # by owner, ascending
            sizes = torch.bincount(owner[members], minlength=layout.n_features)[indices]
            groups = [g.tolist() for g in members.split(sizes.tolist())]
            if self.grouping.weights is not None:
                w = self.grouping.weights.cpu()[members]
                weights = [x.tolist() for x in w.split(sizes.tolist())]
        return ImageRecord(
            n_before=layout.n_features,
            n_kept=indices.numel(),
            n_newlines=int(self.keep_mask.cpu()[layout.newline_positions].sum()),
            indices=indices.tolist(),
            partitions=torch.bincount(layout.partition[indices], minlength=layout.n_partitions).tolist(),
            groups=groups,
            weights=weights,
        )


def select_images(method: Method, images: list[EncodedImage]) -> tuple[list[Selected], list[torch.Tensor]]:
    """Each image's selection and the packed vectors it offers the LLM (merged where the method
    merges), in image order. Images of one layout are selected together, on their device."""
    by_layout: dict[int, list[int]] = {}
    for i, image in enumerate(images):
        by_layout.setdefault(id(image.layout), []).append(i)
    selected, packed = [None] * len(images), [None] * len(images)
    for members in by_layout.values():
        batch = ImageBatch.of([images[i] for i in members])
        chosen = method.select_batch(batch)
        grouping = chosen if isinstance(chosen, Grouping) else None
        kept = chosen if grouping is None else grouping.kept
        vectors = (
            [image.packed for image in batch.images]
            if grouping is None
            else merge(batch.packed, batch.layout, grouping)
        )
        masks = packed_keep_mask(batch.layout, kept, method.newlines)
        for row, i in enumerate(members):
            own = None
            if grouping is not None:
                own = Grouping(grouping.owner[row], None if grouping.weights is None else grouping.weights[row])
            selected[i] = Selected(images[i].layout, kept[row], masks[row], own)
            packed[i] = vectors[row]
    return selected, packed

"""Where every visual token of one image comes from.

An AnyRes image (LLaVA-NeXT, OneVision) is P = 1 + n_h * n_w partitions: the base view (the
whole image squashed to one tile) and the crops of an n_h x n_w grid, each `side x side`
patches. The crops form a canvas of (n_h * side) x (n_w * side) patches; the model drops
canvas rows/columns that are pure padding and appends one newline token per remaining row.
The *packed* sequence the LLM sees is: base tokens, then the unpadded canvas row by row, each
row followed by its newline. A native-resolution image (Qwen-VL) is one partition, the whole
image, with no crops and no newlines: its "base" tile is its own grid (`base_shape`).

`ImageLayout` is built from `packed_source`, the model's own packing applied to an index
tensor (see the adapter), so it agrees with the model by construction. Terms used everywhere:
- feature positions: the packed positions that are not newlines; N of them. "Feature index i"
  means the i-th of these (the indexing of `handle.last[...].indices`).
- partition of a feature: 0 for the base, 1 + (row * n_w + col) for the crop at (row, col).
- local index: the patch's raster index inside its partition's side x side tile.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property

import torch

NEWLINE = -1


@dataclass(frozen=True, eq=False)
class ImageLayout:
    side: int  # patches per tile side (24 for CLIP-L/336)
    grid: tuple[int, int]  # (n_h, n_w) crops
    packed_source: torch.Tensor  # (L,) long: partition * side**2 + local, or NEWLINE
    # (y0, y1, x0, x1) of the unpadded canvas where the model resamples it (LLaVA-OneVision):
    # packed tokens then stand for their nearest patch, whose extent can fall short of the canvas
    unpadded_box: tuple[int, int, int, int] | None = None
    # (rows, columns) of the base tile where it is not side x side: an image without crops at
    # its native resolution (Qwen-VL), whose one partition is its whole token grid
    base_shape: tuple[int, int] | None = None

    def __post_init__(self):
        if self.base_shape is not None and self.grid != (0, 0):
            raise ValueError(f"a layout with a base_shape has no crops, got grid {self.grid}")

    def on(self, device: torch.device) -> ImageLayout:
        """This layout with its index tensors on `device`, made once per device: moving a tensor
        to an accelerator waits for it, so selection must find them there already. Host-side
        numbers (`n_features`, `sizes`, `valid_box`) are copied over, never read back."""
        device = torch.device(device)
        if self.packed_source.device == device:
            return self
        moved = self.__dict__.setdefault("_on_device", {})
        if device not in moved:
            layout = replace(self, packed_source=self.packed_source.to(device))
            layout.__dict__.update(host=self, n_features=self.n_features, sizes=self.sizes, valid_box=self.valid_box)
            moved[device] = layout
        return moved[device]

    @cached_property
    def host(self) -> ImageLayout:
        """The CPU layout this one was moved from (itself on the CPU)."""
        return self

    @property
    def tile_shape(self) -> tuple[int, int]:
        """(rows, columns) of a partition's tile: the crops' and, unless `base_shape` says
        otherwise, the base's."""
        return self.base_shape or (self.side, self.side)

    @property
    def tile(self) -> int:
        rows, columns = self.tile_shape
        return rows * columns

    @property
    def n_partitions(self) -> int:
        return 1 + self.grid[0] * self.grid[1]

    @cached_property
    def feature_positions(self) -> torch.Tensor:
        """(N,) packed position of each feature token."""
        return torch.nonzero(self.packed_source != NEWLINE).flatten()

    @cached_property
    def newline_positions(self) -> torch.Tensor:
        """(rows,) packed position of each newline; the r-th ends canvas row r."""
        return torch.nonzero(self.packed_source == NEWLINE).flatten()

    @cached_property
    def n_features(self) -> int:
        return self.feature_positions.numel()

    @cached_property
    def sizes(self) -> tuple[int, ...]:
        """`capacity` as Python ints, for the host-side arithmetic of budgets."""
        return tuple(self.host.capacity.tolist())

    @cached_property
    def partition(self) -> torch.Tensor:
        return self.packed_source[self.feature_positions] // self.tile

    @cached_property
    def local(self) -> torch.Tensor:
        return self.packed_source[self.feature_positions] % self.tile

    @cached_property
    def row(self) -> torch.Tensor:
        """(N,) unpadded canvas row of each feature (the newline it shares), -1 for base tokens."""
        is_newline = (self.packed_source == NEWLINE).long()
        rows_before = torch.cumsum(is_newline, 0) - is_newline
        rows = rows_before[self.feature_positions]
        return torch.where(self.partition == 0, torch.full_like(rows, -1), rows)

    @cached_property
    def capacity(self) -> torch.Tensor:
        """(P,) number of feature tokens in each partition (crops lose their padding)."""
        return torch.zeros(self.n_partitions, dtype=torch.long, device=self.partition.device).index_add_(
            0, self.partition, torch.ones_like(self.partition)
        )

    @cached_property
    def partition_members(self) -> torch.Tensor:
        """(P, M) long: each partition's feature indices, ascending, padded with -1 to the
        largest partition's size M."""
        return members_of(self.partition, self.sizes)

    @cached_property
    def cell(self) -> torch.Tensor:
        """(N,) each feature's cell in the flattened (P * side**2) partition tiles."""
        return self.partition * self.tile + self.local

    @cached_property
    def features_in_tile_order(self) -> bool:
        """Whether each partition's features are distinct cells of its tile, in the tile's
        raster order (every LLaVA-NeXT and OneVision layout, resampled canvases included):
        then a tile's cells rank its features as their feature indices do. A packing that put
        two tokens on one patch, or out of raster order, would not."""
        cells = self.host.cell[self.host.partition_members.clamp(min=0)]
        later = self.host.partition_members[:, 1:] >= 0
        return bool((cells[:, 1:] > cells[:, :-1])[later].all())

    @cached_property
    def empty_cells(self) -> torch.Tensor:
        """(P, side**2) bool: the tile cells that hold no feature (a crop's padding)."""
        empty = torch.ones(self.n_partitions * self.tile, dtype=torch.bool, device=self.packed_source.device)
        return empty.index_fill_(0, self.cell, False).view(self.n_partitions, self.tile)

    @cached_property
    def canvas_features(self) -> torch.Tensor:
        """(n,) feature indices of the crop tokens (those on the unpadded canvas), ascending."""
        return torch.nonzero(self.partition > 0).flatten()

    @cached_property
    def row_has_features(self) -> torch.Tensor:
        """(rows,) bool: whether canvas row r holds any feature (a very thin image's may not)."""
        has = torch.zeros(self.newline_positions.numel(), dtype=torch.bool, device=self.packed_source.device)
        return has.index_fill_(0, self.row[self.canvas_features], True)

    @cached_property
    def canvas_yx(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Canvas (y, x) patch coordinates of every feature; base tokens get their tile (y, x)."""
        crop = (self.partition - 1).clamp(min=0)
        in_crop = self.partition > 0
        n_w = max(self.grid[1], 1)  # an image without crops (grid (0, 0)) has only base tokens
        columns = self.tile_shape[1]
        y = self.local // columns + in_crop * (crop // n_w) * self.side
        x = self.local % columns + in_crop * (crop % n_w) * self.side
        return y, x

    @cached_property
    def valid_box(self) -> tuple[int, int, int, int]:
        """(y0, y1, x0, x1): the unpadded part of the crop canvas, in patches, end-exclusive;
        (0, 0, 0, 0) when unpadding leaves no crop token (a very thin image)."""
        if self.unpadded_box is not None:
            return self.unpadded_box
        y, x = self.canvas_yx
        y, x = y[self.partition > 0], x[self.partition > 0]
        if y.numel() == 0:
            return 0, 0, 0, 0
        return int(y.min()), int(y.max()) + 1, int(x.min()), int(x.max()) + 1

    @cached_property
    def region_weights(self) -> torch.Tensor:
        """(n_crops, side**2) float32: the share of each base patch's area that shows crop c's
        unpadded content. The base view and the unpadded canvas show the same whole image, so
        canvas coordinates map linearly onto the base tile; each base patch's weights sum to 1."""
        y0, y1, x0, x1 = self.valid_box
        n_h, n_w = self.grid
        s = self.side
        if self.host is not self:
            return self.host.region_weights.to(self.packed_source.device)
        if y1 == y0:  # no crop shows any content (or there are no crops)
            return torch.zeros(n_h * n_w, self.tile)

        def overlaps(lo: int, hi: int, start: int, end: int) -> torch.Tensor:
            # crop span [start, end) of the canvas axis, in base units, against base cells [a, a+1)
            scale = s / (hi - lo)
            a = torch.arange(s, dtype=torch.float64)
            b_lo = (max(start, lo) - lo) * scale
            b_hi = (min(end, hi) - lo) * scale
            return (torch.minimum(a + 1, torch.tensor(b_hi)) - torch.maximum(a, torch.tensor(b_lo))).clamp(min=0)

        weights = []
        for i in range(n_h):
            rows = overlaps(y0, y1, i * s, (i + 1) * s)
            for j in range(n_w):
                cols = overlaps(x0, x1, j * s, (j + 1) * s)
                weights.append(torch.outer(rows, cols).flatten())
        return torch.stack(weights).float()

    def per_feature(self, partition_scores: torch.Tensor) -> torch.Tensor:
        """(..., P, side**2) scores per partition tile -> (..., N) scores in feature order."""
        return partition_scores[..., self.partition, self.local]


@dataclass(eq=False)
class EncodedImage:
    """One image after the vision pass, as a method sees it.

    Pruned inside the vision tower (`vision_prune_layer=K`), the pass stops at layer K: the
    image is what a tower that ends at K gives, `n_layers` = K + 1, `packed` layer K's output
    through the projector, and `hidden` the tiles' hidden states there, from which the adapter
    runs the rest of the tower on the kept tokens (`Adapter.finish_tower`)."""

    layout: ImageLayout
    # (L, D) the projected features the LLM would see, newlines included (inside the tower: of layer K)
    packed: torch.Tensor
    cls: dict[int, torch.Tensor]  # absolute layer -> (P, side**2) fp32 CLS scores, on any device
    n_layers: int  # vision layers the pass read, to resolve negative layer indices
    embed: Callable[[torch.Tensor], torch.Tensor]  # token ids -> the LLM's input embeddings
    # other per-token vectors the LLM receives besides `packed`, each (L, D'), kept with the same
    # mask (Qwen3-VL's deepstack levels, added to early LLM layers at the token's position)
    extra: tuple[torch.Tensor, ...] = ()
    prompt_row: torch.Tensor | None = None  # the image's prompt row, as the batch pads it
    prompt_mask: torch.Tensor | None = None  # that row's attention mask (None: no padding)
    question: str | None = None  # the caller's explicit question for that row, if given
    # its place among the call's images: selection groups images by layout, out of call order
    index: int | None = None
    hidden: torch.Tensor | None = None  # inside the tower: (P, T, D_vision) each tile's tokens after layer K

    def cls_scores(self, layer: int) -> torch.Tensor:
        return self.cls[layer % self.n_layers]

    @property
    def features(self) -> torch.Tensor:
        """(N, D) projected feature tokens, newlines removed, in feature-index order."""
        return self.packed[self.layout.on(self.packed.device).feature_positions]


@dataclass(eq=False)
class ImageBatch:
    """Images of one layout (the same size), stacked so that a method selects for all of them
    at once; everything on the device of their features."""

    images: list[EncodedImage]
    layout: ImageLayout  # on the features' device
    stacked_cls: dict[int, torch.Tensor] = field(default_factory=dict, init=False, repr=False)  # by `cls_scores`

    @classmethod
    def of(cls, images: list[EncodedImage]) -> ImageBatch:
        first = images[0]
        if any(image.layout is not first.layout for image in images):
            raise ValueError("an ImageBatch holds images of one layout: group images by their layout first")
        return cls(images, first.layout.on(first.packed.device))

    @property
    def device(self) -> torch.device:
        return self.images[0].packed.device

    @cached_property
    def packed(self) -> torch.Tensor:
        """(B, L, D) the images' packed vectors, stacked (a copy) for the methods that read them."""
        if len(self.images) == 1:
            return self.images[0].packed[None]
        return torch.stack([image.packed for image in self.images])

    def __len__(self) -> int:
        return len(self.images)

    @property
    def n_layers(self) -> int:
        return self.images[0].n_layers

    @property
    def embed(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.images[0].embed

    def cls_scores(self, layer: int) -> torch.Tensor:
        """(B, P, side**2) fp32 CLS scores of vision layer `layer` (negative counts from the end),
        stacked on first use: the images may carry layers that the method never reads."""
        layer %= self.n_layers
        if layer not in self.stacked_cls:
            scores = torch.stack([image.cls[layer] for image in self.images])
            self.stacked_cls[layer] = scores.to(self.device, torch.float32)
        return self.stacked_cls[layer]

    @cached_property
    def features(self) -> torch.Tensor:
        """(B, N, D) projected feature tokens, newlines removed, in feature-index order."""
        first = self.images[0].packed
        positions = self.layout.feature_positions
        features = first.new_empty(len(self.images), positions.numel(), first.shape[-1])
        for image, rows in zip(self.images, features):  # one copy each, straight into the stack
            torch.index_select(image.packed, 0, positions, out=rows)
        return features


def members_of(partition: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """(P, M) long: each partition's indices into `partition` (N,), ascending, padded with -1
    to the largest partition's size M. `sizes`: each partition's count as host ints, so that
    the table's shape is known without reading the device back."""
    capacity = torch.zeros(len(sizes), dtype=torch.long, device=partition.device)
    capacity.index_add_(0, partition, torch.ones_like(partition))  # bincount would read the max back
    order = torch.sort(partition, stable=True).indices
    part = partition[order]
    rank = torch.arange(order.numel(), device=order.device) - (torch.cumsum(capacity, 0) - capacity)[part]
    members = torch.full((len(sizes), max(sizes)), -1, dtype=torch.long, device=order.device)
    return members.index_put_((part, rank), order)

"""LLaVA-NeXT (`transformers.LlavaNextForConditionalGeneration`, transformers 4.56 to 5.x).

The model packs each image as: base tile, then the unpadded crop canvas with one newline per
row, and fills the prompt's `<image>` placeholders with those vectors in (batch, position)
order. This adapter checks a call's images against its prompt and runs the vision pass itself,
only as deep as it is read, with the score hooks the method needs; the core then keeps a
subset of each packed sequence and feeds the LLM the shortened prompt as `inputs_embeds`
(`tokendrop.compaction`). `inputs_embeds` is an input of every supported release, unlike the
precomputed-features keywords, so the LLM only ever sees the short prompt on each of them,
and `generate` (given the short ids too) keeps its mask and position bookkeeping consistent.

Inside the tower (`vision_prune_layer=K`): `encode_at` runs the model's own pass with the
encoder stopped after layer K and its features taken at K, keeping every tile's hidden states
there; `finish_tower` runs layers K+1 up to the feature layer on each tile's CLS token and
kept patches (`TileRows`: tiles packed into rows, each attending within itself), projects
them, and puts them where the model's packing puts them.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import math
import threading
from collections.abc import Callable
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import ClassVar

import torch
import transformers
from packaging.version import Version
from torch import nn
from transformers.models.clip.modeling_clip import CLIPEncoderLayer
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

from tokendrop.checks import is_int
from tokendrop.family import Adapter, ModelFacts
from tokendrop.layout import NEWLINE, EncodedImage, ImageLayout
from tokendrop.scoring import SIGNAL_KINDS, capture_cls_scores

from ..checks import UsageError

# The one statement of the supported range; setup.cfg and the README say the same.
SUPPORTED_TRANSFORMERS = (Version("4.56"), Version("6.0"))


def installed_transformers() -> str:
    return transformers.__version__


def check_transformers() -> None:
    low, high = SUPPORTED_TRANSFORMERS
    found = Version(installed_transformers())
    if not low <= found < high:
        raise UsageError(
            f"tokendrop supports transformers >={low},<{high}; found {found}. "
            f"Install a supported release: pip install 'transformers>={low},<{high}'"
        )


class LlavaNextAdapter(Adapter):
    model_class = "LlavaNextForConditionalGeneration"
    image_inputs = ("pixel_values", "image_sizes")
    call_options = ("vision_feature_layer", "vision_feature_select_strategy")
    signal_kinds = SIGNAL_KINDS  # CLS attention of any CLIP layer
    model_type: ClassVar[str] = "llava_next"  # the config's model_type of the family
    layer_type: ClassVar[type[nn.Module]] = CLIPEncoderLayer  # the vision tower's encoder layers
    tower: ClassVar[str] = "by CLS attention of a CLIP vision tower"  # how it scores, for errors

    @classmethod
    def supports(cls, model) -> bool:
        return getattr(getattr(model, "config", None), "model_type", None) == cls.model_type and hasattr(model, "model")

    @staticmethod
    def check_config(config) -> None:
        """Raise ValueError for a configuration this adapter cannot serve."""
        if config.vision_feature_select_strategy != "default":
            raise UsageError(
                "tokendrop supports LLaVA-NeXT with vision_feature_select_strategy='default'; this model has "
                f"{config.vision_feature_select_strategy!r}"
            )

    @classmethod
    def facts(cls, config) -> ModelFacts:
        """What methods read of a model of this `config` when no model is loaded (vLLM)."""
        cls.check_config(config)
        n_layers = config.vision_config.num_hidden_layers
        return ModelFacts(
            cls.model_class,
            cls.signal_kinds,
            config.image_token_id,
            n_layers,
            feature_layer_of(config, n_layers),
            config,
        )

    def __init__(self, model):
        check_transformers()
        if type(model).__name__ != self.model_class:
            raise UsageError(
                f"patch the generating model ({self.model_class}), not its {type(model).__name__} submodule"
            )
        config = model.config
        self.check_config(config)
        self.model = model
        self.vlm = model.model
        self.vision_layers = [m for m in self.vlm.vision_tower.modules() if isinstance(m, self.layer_type)]
        if not self.vision_layers:
            raise UsageError(
                f"tokendrop's {self.model_class} adapter scores tokens {self.tower}; this model's tower is a "
                f"{type(self.vlm.vision_tower).__name__}"
            )
        self.n_vision_layers = len(self.vision_layers)
        self.feature_layer = feature_layer_of(config, self.n_vision_layers)
        self.side = config.vision_config.image_size // config.vision_config.patch_size
        self.image_token_id = config.image_token_id
        self._layouts: dict[tuple, ImageLayout] = {}

    # --- geometry ---------------------------------------------------------------------

    def layout(self, image_size) -> ImageLayout:
        """The layout of an image of (height, width), from the model's own packing of an
        index tensor, so that it agrees with the model by construction."""
        key = tuple(int(v) for v in image_size)
        if key not in self._layouts:
            config = self.model.config
            grid = get_anyres_image_grid_shape(list(key), config.image_grid_pinpoints, config.vision_config.image_size)

            def pack(tiles: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
                packed, _ = self.vlm.pack_image_features([tiles], torch.tensor([key]), "default", image_newline=newline)
                return packed[0]

            self._layouts[key] = packed_layout(self.side, tuple(grid), pack)
        return self._layouts[key]

    def layouts(self, image_sizes: torch.Tensor, **vision_kwargs) -> list[ImageLayout]:
        """The layout of every image of a call, in order."""
        return [self.layout(size) for size in image_sizes.tolist()]

    def check_images(self, pixel_values, image_sizes, **vision_kwargs) -> torch.Tensor:
        """`image_sizes` as an (n_images, 2) long tensor (from a tensor, an array or a list of
        pairs, as the model accepts), after checking that `pixel_values` hold every image's
        tiles as the processor lays them out, so bad input fails before the vision pass."""
        expected = "pass the pixel_values and image_sizes that the model's processor returns"
        try:
            sizes = torch.stack([torch.as_tensor(size) for size in image_sizes])
        except (TypeError, ValueError, RuntimeError):
            sizes = None
        if sizes is None or sizes.dim() != 2 or sizes.shape[1] != 2:
            raise UsageError(
                f"image_sizes must be (n_images, 2), each image's (height, width); got {image_sizes!r:.200}"
            )
        if not torch.equal(sizes.double(), sizes.double().round()) or (sizes < 1).any():
            raise UsageError(f"image_sizes must hold positive integers (height, width in pixels), got {sizes.tolist()}")
        sizes = sizes.long()
        vision = self.model.config.vision_config
        tile = (vision.num_channels, vision.image_size, vision.image_size)
        is_tiles = isinstance(pixel_values, torch.Tensor) and pixel_values.dim() in (4, 5)
        if not is_tiles or pixel_values.shape[-3:] != tile:
            found = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise UsageError(
                f"pixel_values must be (n_images, tiles, {tile[0]}, {tile[1]}, {tile[2]}), tiles of "
                f"{tile[0]}x{tile[1]}x{tile[2]}, or 4-D with all tiles stacked; got {found}: {expected}"
            )
        needs = [layout.n_partitions for layout in self.layouts(sizes, **vision_kwargs)]  # the base view plus the crops
        if pixel_values.dim() == 4 and pixel_values.shape[0] != sum(needs):
            raise UsageError(
                f"4-D pixel_values hold {pixel_values.shape[0]} tiles, but images of sizes "
                f"{sizes.tolist()} need {sum(needs)} ({needs}): {expected}"
            )
        if pixel_values.dim() == 5:
            if pixel_values.shape[0] != len(sizes):
                raise UsageError(
                    f"pixel_values has {pixel_values.shape[0]} images but {len(sizes)} image_sizes: {expected}"
                )
            for size, need in zip(sizes.tolist(), needs):
                if need > pixel_values.shape[1]:
                    raise UsageError(
                        f"an image of size {size} needs {need} tiles (the base view and its crops), but "
                        f"pixel_values hold {pixel_values.shape[1]} per image: {expected}"
                    )
        return sizes

    # --- the model's parts, for tools that time or inspect them ------------------------

    @property
    def vision_tower(self) -> nn.Module:
        return self.vlm.vision_tower

    @property
    def language_model(self) -> nn.Module:
        return self.vlm.language_model

    @property
    def vision_entry(self) -> tuple[nn.Module, str]:
        return self.vlm, "get_image_features"  # tower, projector and packing

    # --- vision pass ------------------------------------------------------------------

    # signal kinds read from a layer's output; the others come from its q/k projections, which
    # read the layer's input (CLIP's CLS scores: both kinds)
    output_signals: frozenset[str] = frozenset()

    @functools.cached_property
    def encoder_layers(self) -> nn.ModuleList:
        """The tower's list of encoder layers, the one its encoder iterates."""
        first = self.vision_layers[0]
        return next(m for m in self.vision_tower.modules() if isinstance(m, nn.ModuleList) and len(m) and m[0] is first)

    def image_features(self, pixel_values, image_sizes, **vision_kwargs) -> list[torch.Tensor]:
        """The model's own vision pass: one packed (L, D) tensor per image, newlines included."""
        output = self.vlm.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes, **vision_kwargs)
        return list(getattr(output, "pooler_output", output))  # 5.x wraps the list in a model output

    def vision_attentions(self, pixel_values, image_sizes) -> tuple[torch.Tensor, ...]:
        """Every vision layer's attention maps, (tiles, heads, L, L) each (CLIP's CLS token
        first): what the score hooks compute without; the tower must run eager attention."""
        needs = [self.layout(size).n_partitions for size in self.check_images(pixel_values, image_sizes).tolist()]
        tiles = pixel_values if pixel_values.dim() == 4 else torch.cat([t[:n] for t, n in zip(pixel_values, needs)])
        return self.vision_tower(tiles, output_attentions=True).attentions

    def encode(self, pixel_values, image_sizes, signals: dict[int, str], **vision_kwargs) -> list[EncodedImage]:
        """Run the vision pass once, only as deep as it is read (`vision_pass`), capturing the
        scores `signals` asks for. The scores stay where the tower computed them, in fp32."""
        with self.capture_scores(signals) as captured:
            packed = self.vision_pass(pixel_values, image_sizes, signals, **vision_kwargs)
        return self.encoded(self.layouts(image_sizes, **vision_kwargs), packed, captured, self.n_vision_layers)

    def encoded(self, layouts, packed, captured, n_layers: int, hidden=None) -> list[EncodedImage]:
        """The `EncodedImage`s of one pass: each image's packed vectors, its scores of every
        captured layer (the tower's tiles split per image) and, inside the tower, its tiles'
        hidden states `hidden` ((tiles, T, D) of the whole call)."""
        splits = [layout.n_partitions for layout in layouts]
        per_layer = {layer: torch.cat(scores).split(splits) for layer, scores in captured.items()}
        tiles = [None] * len(layouts) if hidden is None else hidden.split(splits)
        return [
            EncodedImage(
                layout=layout,
                packed=features,
                cls={layer: scores[i].view(-1, layout.tile) for layer, scores in per_layer.items()},
                n_layers=n_layers,
                embed=self.model.get_input_embeddings(),
                hidden=tiles[i],
            )
            for i, (layout, features) in enumerate(zip(layouts, packed))
        ]

    def vision_pass(self, pixel_values, image_sizes, signals: dict[int, str], **vision_kwargs) -> list[torch.Tensor]:
        """`image_features`, bit for bit, from a tower that stops at `vision_depth`. A layer
        deeper than that which `signals` score computes only its q/k projections of its input
        (normed as the layer norms it), not its attention output and MLP. Run it inside
        `capture_scores(signals)`: the score hooks see those projections as in a full pass."""
        chosen = vision_kwargs.get("vision_feature_layer")
        requested = self.model.config.vision_feature_layer if chosen is None else chosen
        hidden = hidden_state_indices(feature_layers(requested), self.n_vision_layers)
        depth = self.vision_depth(hidden, signals)
        projected_only = depth in {layer % self.n_vision_layers for layer in signals}
        # Indices from the embeddings up name the same hidden states however many layers run
        # (negative ones would count back from the last that ran). Always a list: 5.x takes an
        # int 0 for "no hidden states"; the model concatenates a list, of one state a copy.
        absolute = {**vision_kwargs, "vision_feature_layer": hidden}
        then = functools.partial(self.project_qk, depth) if projected_only else None
        with first_layers(self.encoder_layers, depth, then=then):
            return self.image_features(pixel_values, image_sizes, **absolute)

    def project_qk(self, layer_index: int, hidden: torch.Tensor) -> None:
        """Layer `layer_index`'s q and k projections of its input `hidden`, normed as the layer
        norms it: all that its scores read, for the score hooks on the projections to capture.
        The full GEMMs, as the layer's own (the hook keeps the CLS row of q)."""
        layer = self.vision_layers[layer_index]
        normed = layer.layer_norm1(hidden.to(layer.layer_norm1.weight.device))
        layer.self_attn.q_proj(normed)
        layer.self_attn.k_proj(normed)

    def vision_depth(self, hidden: list[int], signals: dict[int, str]) -> int:
        """How many encoder layers a pass must run in full: enough for the deepest of the
        feature hidden states `hidden` (0 = embeddings) and of the layers `signals` read the
        output of, and up to (not including) the deepest layer scored from its projections.
        At least one: some releases record the first hidden state as the first layer runs."""
        n = self.n_vision_layers
        reads = [layer % n + 1 if kind in self.output_signals else layer % n for layer, kind in signals.items()]
        return max(1, *hidden, *reads)

    def capture_scores(self, signals: dict[int, str]):
        """A context that captures `signals` ({layer: kind}) during the vision pass, keyed by
        absolute layer: CLS-query scores of the CLIP layers."""
        attention = {layer % self.n_vision_layers: self.vision_layers[layer].self_attn for layer in signals}
        kinds = {layer % self.n_vision_layers: kind for layer, kind in signals.items()}
        return capture_cls_scores(attention, kinds)

    # --- pruning inside the tower (vision_prune_layer) ----------------------------------

    in_tower_refusal = None
    # the tokens before each tile's patches in the tower that are no feature (CLIP's CLS, which
    # strategy "default" drops): they run on with the tile's kept patches
    lead_tokens: ClassVar[int] = 1

    def check_prune_layer(self, layer) -> int:
        layer = super().check_prune_layer(layer)
        if len(feature_layers(self.model.config.vision_feature_layer)) > 1:
            raise UsageError(
                f"vision_prune_layer needs features of one vision layer; this model concatenates hidden states "
                f"{self.model.config.vision_feature_layer}, some of which the kept tokens alone would not give"
            )
        attention = self.vision_tower.config._attn_implementation
        if attention not in ("sdpa", "eager"):
            raise UsageError(
                f"vision_prune_layer runs the tower's later layers on tiles packed into rows with a block mask, "
                f"which the vision tower's attention takes as 'sdpa' or 'eager'; it runs {attention!r}: load the "
                "model with attn_implementation='sdpa'"
            )
        return layer

    def call_feature_layer(self, layer: int, vision_kwargs: dict) -> int:
        """The absolute index of the layer whose output this call's features are, checked to be
        one layer, past `layer` (a call may choose its own `vision_feature_layer`)."""
        chosen = vision_kwargs.get("vision_feature_layer")
        requested = self.model.config.vision_feature_layer if chosen is None else chosen
        hidden = hidden_state_indices(feature_layers(requested), self.n_vision_layers)
        if len(hidden) > 1 or hidden[0] - 1 <= layer:
            raise UsageError(
                f"this call's vision_feature_layer {requested!r} is not one hidden state past vision layer {layer}, "
                "where the patch prunes inside the tower (vision_prune_layer): call without it, or patch again"
            )
        return hidden[0] - 1  # hidden state h is layer h - 1's output

    def encode_at(self, pixel_values, image_sizes, signals: dict[int, str], layer: int, **vision_kwargs):
        """The model's own pass with the encoder stopped after `layer` and the features taken
        there (hidden state `layer` + 1, projected and packed as the model packs its
        features), the scores `signals` asks for, and each tile's hidden states after `layer`."""
        self.call_feature_layer(layer, vision_kwargs)
        layouts = self.layouts(image_sizes, **vision_kwargs)
        resampled = [tuple(size) for size, layout in zip(image_sizes.tolist(), layouts) if layout.unpadded_box]
        if resampled:
            raise UsageError(
                f"the model resamples the crop canvas of images of size {resampled} (anyres_max): each of its "
                "packed tokens blends up to four patches, which pruning inside the tower would drop before the "
                "feature layer. Pass smaller images, or patch without vision_prune_layer"
            )
        signals = {at % (layer + 1): kind for at, kind in signals.items()}  # layer is -1, the tower's last
        reached: list[torch.Tensor] = []
        options = {**vision_kwargs, "vision_feature_layer": [layer + 1]}  # hidden state layer + 1: its output
        with self.capture_scores(signals) as captured, first_layers(self.encoder_layers, layer + 1, reached.append):
            packed = self.image_features(pixel_values, image_sizes, **options)
        return self.encoded(layouts, packed, captured, layer + 1, hidden=reached[0])

    def finish_tower(self, images: list[EncodedImage], kept: list[torch.Tensor], layer: int, **vision_kwargs):
        """Layers `layer` + 1 up to this call's feature layer on each tile's kept patches and
        CLS token (`TileRows`), then the projector, into each image's packed positions. A tile
        keeping all its features runs whole, padding too, as in the model's own pass: at a
        full budget this is the model's pass exactly."""
        feature = self.call_feature_layer(layer, vision_kwargs)
        hidden = torch.cat([image.hidden for image in images])
        rows = TileRows.plan([image.layout for image in images], kept, hidden.shape[1], self.lead_tokens)
        states = hidden.flatten(0, 1)[rows.source.to(hidden.device)].unflatten(0, rows.shape)
        mask = rows.attention_mask(hidden.dtype, hidden.device)
        for block in self.vision_layers[layer + 1 : feature + 1]:
            states = run_layer(block, states, mask)
        projected = self.vlm.multi_modal_projector(states[:, self.lead_tokens :])  # as the model projects
        return rows.packed(projected.flatten(0, 1), [image.layout for image in images], self.vlm.image_newline)


@functools.cache
def _takes(layer_class: type, name: str) -> bool:
    return name in inspect.signature(layer_class.forward).parameters


def run_layer(block: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """One encoder layer on `hidden` with the additive attention `mask`, as the tower's encoder
    calls it (4.x CLIP layers also take a causal mask, None for images, and return a tuple)."""
    extra = {"causal_attention_mask": None} if _takes(type(block), "causal_attention_mask") else {}
    output = block(hidden, mask, **extra)
    return output[0] if isinstance(output, tuple) else output


@dataclass(frozen=True)
class TileRows:
    """Where each tile's tokens go for the tower's layers after the pruning layer.

    A tile that keeps features is one segment: its lead tokens (CLS), then its kept patches
    in raster order; a tile that keeps every feature is whole (its padding patches too, as the
    model runs it). Segments are packed into rows about one tile long: rows = ceil(tokens /
    tile), each segment, longest first, into the shortest row (ties: the first), so that rows
    hold what they need and little padding, and tiles of one image with different kept
    counts share rows. Each segment attends only within itself (`attention_mask`); where
    every row is one segment, unpadded, no mask is needed: at a full budget the rows are the
    model's own tiles, in order.
    Worked out on the host, after one read-back of the kept masks."""

    shape: tuple[int, int]  # (rows, length)
    source: torch.Tensor  # (rows * length,) each slot's token in the call's flattened (tiles * T) states
    segment: torch.Tensor | None  # (rows, length): each slot's segment, -1 padding; None: one full segment a row
    kept: list[torch.Tensor]  # each image's kept feature indices, ascending
    slots: list[torch.Tensor]  # and where each is in the rows without their lead tokens, flattened

    @classmethod
    def plan(cls, layouts, kept: list[torch.Tensor], tile_tokens: int, lead: int) -> TileRows:
        flags = torch.cat(kept).cpu().split([layout.n_features for layout in layouts])  # the one read-back
        segments, owners, first_tile = [], [], 0  # segment: (tokens, image, features, positions)
        indices = []
        for i, (layout, keep) in enumerate(zip(layouts, flags)):
            layout = layout.host
            idx = torch.nonzero(keep).flatten()
            indices.append(idx)
            part, local = layout.partition[idx], layout.local[idx]
            for p in range(layout.n_partitions):
                mine = torch.nonzero(part == p).flatten()
                if not mine.numel():
                    continue
                order = torch.sort(local[mine]).indices  # raster order in the tile
                features, patches = idx[mine[order]], local[mine[order]]
                if mine.numel() == layout.sizes[p]:  # whole: every token of the tile, in place
                    tokens, at = torch.arange(tile_tokens), lead + patches
                else:
                    tokens, at = torch.cat([torch.arange(lead), lead + patches]), lead + torch.arange(mine.numel())
                segments.append(((first_tile + p) * tile_tokens + tokens, at))
                owners.append((i, features))
            first_tile += layout.n_partitions
        lengths = [tokens.numel() for tokens, _ in segments]
        n_rows = min(len(segments), math.ceil(sum(lengths) / tile_tokens))
        loads, starts = [0] * n_rows, [None] * len(segments)
        for j in sorted(range(len(segments)), key=lambda j: -lengths[j]):  # stable: ties in tile order
            row = min(range(n_rows), key=loads.__getitem__)
            starts[j], loads[row] = (row, loads[row]), loads[row] + lengths[j]
        length = max(loads)
        source = torch.zeros(n_rows, length, dtype=torch.long)
        segment = torch.full((n_rows, length), -1, dtype=torch.long)
        slot_of = [torch.zeros(layout.n_features, dtype=torch.long) for layout in layouts]
        for j, ((tokens, at), (i, features), (row, start)) in enumerate(zip(segments, owners, starts)):
            source[row, start : start + tokens.numel()] = tokens
            segment[row, start : start + tokens.numel()] = j
            slot_of[i][features] = row * (length - lead) + start + at - lead
        unmasked = n_rows == len(segments) and bool((segment == segment[:, :1]).all())  # one full segment a row
        return cls(
            shape=(n_rows, length),
            source=source.flatten(),
            segment=None if unmasked else segment,
            kept=indices,
            slots=[slot_of[i][idx] for i, idx in enumerate(indices)],
        )

    def attention_mask(self, dtype: torch.dtype, device) -> torch.Tensor | None:
        """(rows, 1, length, length) additive: 0 within a segment (padding with padding), the
        dtype's minimum across; None where every row is one segment, unpadded."""
        if self.segment is None:
            return None
        segment = self.segment.to(device)
        same = segment[:, :, None] == segment[:, None, :]
        return torch.where(same, 0.0, torch.finfo(dtype).min).to(dtype)[:, None]

    def packed(self, projected: torch.Tensor, layouts, newline: torch.Tensor) -> list[torch.Tensor]:
        """Each image's (L, D) packed vectors from the projected rows (their lead tokens cut,
        flattened): kept features and newlines in place, zeros where dropped features were."""
        device = projected.device
        result = []
        for layout, idx, slots in zip(layouts, self.kept, self.slots):
            layout = layout.on(device)
            vectors = projected.new_zeros(layout.packed_source.numel(), projected.shape[-1])
            vectors[layout.feature_positions[idx.to(device)]] = projected[slots.to(device)]
            vectors[layout.newline_positions] = newline.to(device, projected.dtype)
            result.append(vectors)
        return result


def feature_layer_of(config, n_layers: int) -> int:
    """The vision layer whose output the LLM receives, as a layer index. `vision_feature_layer`
    indexes hidden states (0 = embeddings); as a layer index the same negative value names the
    same layer, a positive one is one less. Of a list (features concatenated from several
    layers), the deepest stands for the features."""
    requested = feature_layers(config.vision_feature_layer)
    absolute = hidden_state_indices(requested, n_layers)
    hidden = requested[absolute.index(max(absolute))]
    return hidden if hidden < 0 else hidden - 1


def packed_layout(side: int, grid: tuple[int, int], pack: Callable) -> ImageLayout:
    """The layout of an image whose (1 + n_h * n_w, side**2) tiles `pack(tiles, newline)` packs
    as the model packs features: applied to each patch's index (newlines NEWLINE), so that the
    layout agrees with the packing by construction."""
    n_partitions = 1 + grid[0] * grid[1]
    source = torch.arange(n_partitions * side * side, dtype=torch.float64).view(n_partitions, side * side, 1)
    packed = pack(source, torch.tensor([float(NEWLINE)], dtype=torch.float64))
    return ImageLayout(side, tuple(grid), packed[:, 0].round().long())


def feature_layers(vision_feature_layer) -> list[int]:
    """`vision_feature_layer` (an int or a list of them, as the model takes it) as a list."""
    layers = [vision_feature_layer] if isinstance(vision_feature_layer, int) else vision_feature_layer
    if not isinstance(layers, (list, tuple)) or not layers or not all(is_int(h) for h in layers):
        raise UsageError(
            f"vision_feature_layer must be a hidden-state index (an int) or a non-empty list of them, got "
            f"{vision_feature_layer!r}"
        )
    return list(layers)


def hidden_state_indices(layers: list[int], n_layers: int) -> list[int]:
    """Hidden-state indices (0 = embeddings, -1 = the last layer's output) from the embeddings
    up, so that they name the same states whether or not the tower runs all its layers."""
    n_hidden = n_layers + 1
    wrong = [h for h in layers if not -n_hidden <= h < n_hidden]
    if wrong:
        raise UsageError(
            f"vision_feature_layer {wrong} out of range: the vision tower has {n_hidden} hidden states (the "
            f"embeddings and {n_layers} layers), indexed {-n_hidden} to {n_layers}"
        )
    return [h % n_hidden for h in layers]


# Early stop of the tower without touching it outside the pass that asked: while a pass needs
# it, the encoder's layer list is a `_FirstLayers`, which iterates only the first `depth`
# layers in the context (thread, asyncio task) of that pass, all of them in any other. Passes
# in several threads count their claims on the list; the last one out restores its class.
_depths: ContextVar[dict | None] = ContextVar("tokendrop_vision_depth", default=None)
_claims_lock = threading.Lock()
_claims: dict[nn.ModuleList, int] = {}


class _FirstLayers(nn.ModuleList):
    def __iter__(self):
        depth = (_depths.get() or {}).get(self)
        layers = super().__iter__()
        return layers if depth is None else itertools.islice(layers, depth)


@contextmanager
def first_layers(layers: nn.ModuleList, depth: int, then=None):
    """While active, an encoder iterating `layers` in this context runs only the first `depth`,
    and calls `then(output of the last)`, still inside the tower's forward, where one is given.
    A list of another class than `nn.ModuleList` runs in full (and `then` is not called)."""
    if depth >= len(layers) or type(layers) not in (nn.ModuleList, _FirstLayers):
        yield
        return
    depths = {**(_depths.get() or {}), layers: depth}
    token = _depths.set(depths)

    def last_ran(module, args, output):
        if _depths.get() is depths:  # not another context's pass over the same layer
            then(output[0] if isinstance(output, tuple) else output)  # a tuple in 4.x

    hook = layers[depth - 1].register_forward_hook(last_ran) if then is not None else None
    with _claims_lock:
        _claims[layers] = _claims.get(layers, 0) + 1
        layers.__class__ = _FirstLayers
    try:
        yield
    finally:
        with _claims_lock:
            _claims[layers] -= 1
            if not _claims[layers]:
                del _claims[layers]
                layers.__class__ = nn.ModuleList
        if hook is not None:
            hook.remove()
        _depths.reset(token)

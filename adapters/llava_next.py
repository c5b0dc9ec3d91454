"""LLaVA-NeXT (`transformers.LlavaNextForConditionalGeneration`, transformers 4.56 to 5.x).

The model packs each image as: base tile, then the unpadded crop canvas with one newline per
row, and fills the prompt's `<image>` placeholders with those vectors in (batch, position)
order. tokendrop runs the vision pass itself, keeps a subset of each packed sequence, removes
the matching placeholders from `input_ids`, and feeds the LLM `inputs_embeds` made as the
model makes them (its input embedding of the ids, the image vectors scattered into the
placeholders). `inputs_embeds` is an input of every supported release, unlike the
precomputed-features keywords, so the LLM only ever sees the short prompt on each of them,
and `generate` (given the short ids too) keeps its mask and position bookkeeping consistent.
"""

from __future__ import annotations

import functools
import itertools
import threading
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import transformers
from packaging.version import Version
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.clip.modeling_clip import CLIPEncoderLayer
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

from tokendrop.layout import NEWLINE, EncodedImage, ImageLayout
from tokendrop.scoring import SIGNAL_KINDS, capture_cls_scores

# The one statement of the supported range; setup.cfg and the README say the same.
SUPPORTED_TRANSFORMERS = (Version("4.56"), Version("6.0"))
IGNORE_INDEX = -100  # labels of padding added by compaction


def installed_transformers() -> str:
    return transformers.__version__


def check_transformers() -> None:
    low, high = SUPPORTED_TRANSFORMERS
    found = Version(installed_transformers())
    if not low <= found < high:
        raise ValueError(
            f"tokendrop supports transformers >={low},<{high}; found {found}. "
            f"Install a supported release: pip install 'transformers>={low},<{high}'"
        )


class LlavaNextAdapter:
    model_class = "LlavaNextForConditionalGeneration"
    signal_kinds = SIGNAL_KINDS  # the signals `encode` can capture: CLS attention of any CLIP layer

    @classmethod
    def supports(cls, model) -> bool:
        return getattr(getattr(model, "config", None), "model_type", None) == "llava_next" and hasattr(model, "model")

    def __init__(self, model):
        check_transformers()
        config = model.config
        if type(model).__name__ != self.model_class:
            raise ValueError(
                f"patch the generating model ({self.model_class}), not its {type(model).__name__} submodule"
            )
        if config.vision_feature_select_strategy != "default":
            raise ValueError(
                "tokendrop supports LLaVA-NeXT with vision_feature_select_strategy='default'; this model has "
                f"{config.vision_feature_select_strategy!r}"
            )
        self.model = model
        self.vlm = model.model
        self.vision_layers = [m for m in self.vlm.vision_tower.modules() if isinstance(m, CLIPEncoderLayer)]
        if not self.vision_layers:
            raise ValueError(
                f"tokendrop scores tokens by CLS attention of a CLIP vision tower; this model's tower is a "
                f"{type(self.vlm.vision_tower).__name__}"
            )
        self.n_vision_layers = len(self.vision_layers)
        # vision_feature_layer indexes hidden states (0 = embeddings); as a layer index the same
        # negative value names the same layer, a positive one is one less. Of a list (features
        # concatenated from several layers), the deepest stands for the features.
        requested = feature_layers(config.vision_feature_layer)
        absolute = hidden_state_indices(requested, self.n_vision_layers)
        hidden = requested[absolute.index(max(absolute))]
        self.feature_layer = hidden if hidden < 0 else hidden - 1
        self.side = config.vision_config.image_size // config.vision_config.patch_size
        self.image_token_id = config.image_token_id
        self._layouts: dict[tuple[int, int], ImageLayout] = {}

    # --- geometry ---------------------------------------------------------------------

    def layout(self, image_size) -> ImageLayout:
        """The layout of an image of (height, width), from the model's own packing of an
        index tensor, so that it agrees with the model by construction."""
        key = tuple(int(v) for v in image_size)
        if key not in self._layouts:
            config = self.model.config
            grid = get_anyres_image_grid_shape(list(key), config.image_grid_pinpoints, config.vision_config.image_size)
            tile = self.side * self.side
            n_partitions = 1 + grid[0] * grid[1]
            source = torch.arange(n_partitions * tile, dtype=torch.float64).view(n_partitions, tile, 1)
            packed, _ = self.vlm.pack_image_features(
                [source],
                torch.tensor([key]),
                "default",
                image_newline=torch.tensor([float(NEWLINE)], dtype=torch.float64),
            )
            self._layouts[key] = ImageLayout(self.side, tuple(grid), packed[0][:, 0].round().long())
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
            raise ValueError(
                f"image_sizes must be (n_images, 2), each image's (height, width); got {image_sizes!r:.200}"
            )
        if not torch.equal(sizes.double(), sizes.double().round()) or (sizes < 1).any():
            raise ValueError(f"image_sizes must hold positive integers (height, width in pixels), got {sizes.tolist()}")
        sizes = sizes.long()
        vision = self.model.config.vision_config
        tile = (vision.num_channels, vision.image_size, vision.image_size)
        is_tiles = isinstance(pixel_values, torch.Tensor) and pixel_values.dim() in (4, 5)
        if not is_tiles or pixel_values.shape[-3:] != tile:
            found = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise ValueError(
                f"pixel_values must be (n_images, tiles, {tile[0]}, {tile[1]}, {tile[2]}), tiles of "
                f"{tile[0]}x{tile[1]}x{tile[2]}, or 4-D with all tiles stacked; got {found}: {expected}"
            )
        needs = [layout.n_partitions for layout in self.layouts(sizes, **vision_kwargs)]  # the base view plus the crops
        if pixel_values.dim() == 4 and pixel_values.shape[0] != sum(needs):
            raise ValueError(
                f"4-D pixel_values hold {pixel_values.shape[0]} tiles, but images of sizes "
                f"{sizes.tolist()} need {sum(needs)} ({needs}): {expected}"
            )
        if pixel_values.dim() == 5:
            if pixel_values.shape[0] != len(sizes):
                raise ValueError(
                    f"pixel_values has {pixel_values.shape[0]} images but {len(sizes)} image_sizes: {expected}"
                )
            for size, need in zip(sizes.tolist(), needs):
                if need > pixel_values.shape[1]:
                    raise ValueError(
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
        """The decoder the prompt's embeddings go through (its first call is the prefill)."""
        return self.vlm.language_model

    @property
    def vision_entry(self) -> tuple[nn.Module, str]:
        """(module, method name) through which the model runs its whole vision pass (tower,
        projector, packing), patched or not: the place to time it."""
        return self.vlm, "get_image_features"

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

    def read(
        self,
        input_ids,
        attention_mask,
        pixel_values,
        image_sizes,
        questions,
        signals: dict[int, str],
        vision_kwargs: dict,
    ) -> list[EncodedImage]:
        """Every image of a call, checked against its prompt and encoded, with its prompt row
        (and its attention mask) and the caller's question for that row, in placeholder order."""
        sizes = self.check_images(pixel_values, image_sizes, **vision_kwargs)
        rows = self.image_rows(input_ids, sizes, **vision_kwargs)
        images = self.encode(pixel_values, sizes, signals, **vision_kwargs)
        for image, row in zip(images, rows):
            image.prompt_row = input_ids[row]
            image.prompt_mask = None if attention_mask is None else attention_mask[row]
            image.question = None if questions is None else questions[row]
        return images

    def encode(self, pixel_values, image_sizes, signals: dict[int, str], **vision_kwargs) -> list[EncodedImage]:
        """Run the vision pass once, only as deep as it is read (`vision_pass`), capturing the
        scores `signals` asks for. The scores stay where the tower computed them, in fp32."""
        with self.capture_scores(signals) as captured:
            packed = self.vision_pass(pixel_values, image_sizes, signals, **vision_kwargs)
        layouts = self.layouts(image_sizes, **vision_kwargs)
        splits = [layout.n_partitions for layout in layouts]
        per_layer = {layer: torch.cat(scores).split(splits) for layer, scores in captured.items()}
        return [
            EncodedImage(
                layout=layout,
                packed=features,
                cls={layer: scores[i].view(-1, layout.tile) for layer, scores in per_layer.items()},
                n_layers=self.n_vision_layers,
                embed=self.model.get_input_embeddings(),
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

    # --- the LLM's side ---------------------------------------------------------------

    def feed(
        self,
        input_ids,
        attention_mask,
        labels,
        keep_masks: list[torch.Tensor],
        packed: list[torch.Tensor],
        pad_side: str,
        pad_token_id: int,
    ) -> tuple[torch.Tensor, dict, list[torch.Tensor]]:
        """(shortened input_ids, the LLM's keyword inputs, the vectors each image feeds the LLM):
        the prompt rows without the placeholders of dropped tokens, re-padded, and
        `inputs_embeds`: the text's embeddings with image i's kept vectors
        (`packed[i][keep_masks[i]]`) in its remaining placeholders; plus the matching
        attention_mask (and labels, when given).

        Images are numbered in (row, position) order, as the model fills placeholders
        (`image_rows` has checked that the rows hold exactly those placeholders). Existing
        padding stays where it is; rows that became shorter get extra padding on `pad_side`
        (masked out, label -100). Reads one thing back from the device, once: the new row
        lengths and where each image's kept placeholders land, which the shapes depend on."""
        n_rows, n_images = len(input_ids), len(keep_masks)
        is_image = input_ids == self.image_token_id
        numbered = is_image.flatten().cumsum(0)  # placeholders up to each position of the flat prompt
        all_kept = torch.cat([input_ids.new_zeros(0, dtype=torch.bool), *keep_masks]).to(input_ids.device)
        keep = kept_columns(is_image, numbered, all_kept)
        kept_upto = keep.cumsum(1)
        sizes = [mask.numel() for mask in keep_masks]
        runs = image_runs(numbered, keep, kept_upto, sizes)
        read = torch.cat([kept_upto[:, -1], runs.flatten()]).tolist()  # the one sync
        rows = read[:n_rows]
        counts, first, last, before = (read[n_rows + n_images * i : n_rows + n_images * (i + 1)] for i in range(4))
        compact = repad(input_ids, attention_mask, labels, keep, kept_upto, rows, pad_side, pad_token_id)
        ids = compact.pop("input_ids")
        new_len, old_len = ids.shape[1], input_ids.shape[1]
        spans = []
        for size, count, start, end, ahead in zip(sizes, counts, first, last, before):
            if end - start + 1 != size:  # the image's placeholders are not one run
                spans.append(None)
                continue
            row = start // old_len
            at = row * new_len + ahead + (new_len - rows[row] if pad_side == "left" else 0)
            spans.append(slice(at, at + count))
        compact["inputs_embeds"], kept = self.embed_kept(ids, packed, keep_masks, counts, spans)
        return ids, compact, kept

    def embed_kept(self, ids, packed, keep_masks, counts: list[int], spans: list[slice | None]):
        """(inputs_embeds for the shortened `ids`, each image's vectors in it): the text's
        embeddings, and image i's kept vectors gathered straight into its placeholders,
        `spans[i]` of the flattened prompt (None where other tokens split them: placed by
        position). Where a gradient must flow back, or the dtype or device differ, the vectors
        are gathered first and copied in (a gather into given memory carries no gradient)."""
        placeholders = (ids == self.image_token_id).flatten()
        text_at = torch.nonzero_static(~placeholders, size=ids.numel() - sum(counts))[:, 0]
        text = self.model.get_input_embeddings()(ids.flatten()[text_at])
        flat = text.new_empty(ids.numel(), text.shape[-1]).index_copy_(0, text_at.to(text.device), text)
        if None in spans:
            placeholders = placeholders.to(flat.device)
            positions = torch.nonzero_static(placeholders, size=sum(counts))[:, 0].split(counts)
            spans = [positions[i] if span is None else span for i, span in enumerate(spans)]
        tracked = torch.is_grad_enabled() and (flat.requires_grad or any(source.requires_grad for source in packed))
        kept = []
        for source, mask, count, where in zip(packed, keep_masks, counts, spans):
            rows = torch.nonzero_static(mask.to(source.device), size=count)[:, 0]
            if isinstance(where, slice) and not tracked and (source.dtype, source.device) == (flat.dtype, flat.device):
                kept.append(torch.index_select(source, 0, rows, out=flat[where]))
            else:
                kept.append(source.index_select(0, rows))
                flat[where] = kept[-1].to(flat.device, flat.dtype)
        return flat.view(*ids.shape, -1), kept

    @staticmethod
    def with_image_features(output, kept_features: list[torch.Tensor]):
        """A forward's output carrying the vectors the LLM received, where the release's output
        has a field for them (the unpatched model fills it with every vector)."""
        if "image_outputs" in getattr(output, "__dataclass_fields__", {}):  # 5.x
            output["image_outputs"] = BaseModelOutputWithPooling(pooler_output=kept_features)
        elif "image_hidden_states" in getattr(output, "__dataclass_fields__", {}):  # 4.x: one tensor
            output["image_hidden_states"] = torch.cat(kept_features)
        return output

    def image_rows(self, input_ids, image_sizes: torch.Tensor, **vision_kwargs) -> list[int]:
        """The prompt row of every image. Each row's `<image>` placeholders must be exactly
        the packed lengths of whole images, in order: the model itself checks only the batch
        total, which can silently move features between rows."""
        per_row = (input_ids == self.image_token_id).sum(1).tolist()
        return assign_rows(
            per_row, [layout.packed_source.numel() for layout in self.layouts(image_sizes, **vision_kwargs)]
        )


def kept_columns(is_image: torch.Tensor, numbered: torch.Tensor, all_kept: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: which prompt positions stay. `is_image`: the (B, T) placeholders;
    `numbered`: the flattened prompt's running count of them; `all_kept`: the images' packed
    keep masks one after another."""
    if not all_kept.numel():
        return torch.ones_like(is_image)
    ordinal = (numbered - 1).clamp(0, all_kept.numel() - 1).view_as(is_image)  # the placeholder's number
    return all_kept[ordinal] | ~is_image


def image_runs(numbered: torch.Tensor, keep: torch.Tensor, kept_upto: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """(4, n_images) long, on the device: each image's kept count, the flat positions of its
    first and last placeholder in the prompt, and the positions its row keeps before the first
    (where its kept placeholders start in the shortened row, before re-padding). `numbered`:
    the flattened prompt's running count of placeholders; `keep` (B, T) and `kept_upto`, each
    row's running count of it; `sizes`: each image's placeholders."""
    bounds = torch.tensor(list(itertools.accumulate(sizes, initial=0)))
    bounds = bounds.to(numbered.device, non_blocking=True)  # from pageable memory: staged at once, no wait
    first = torch.searchsorted(numbered, bounds[:-1] + 1)
    last = torch.searchsorted(numbered, bounds[1:])
    keep, kept_upto = keep.flatten(), kept_upto.flatten()
    ahead = kept_upto[first] - keep[first].long()
    # an image lies in one row: what its row keeps from its first to its last placeholder,
    # less the text between them (all kept), where other tokens split its placeholders
    counts = kept_upto[last] - ahead - (last - first + 1 - bounds.diff())
    return torch.stack([counts, first, last, ahead])


def repad(input_ids, attention_mask, labels, keep, kept_upto, lengths: list[int], pad_side: str, pad_token_id: int):
    """Keep the `keep` (B, T) positions of every row and re-pad the batch, given each row's
    running count of them (`kept_upto`) and its total (`lengths`, read back once by `feed`).
    Existing padding stays where it is; rows that became shorter get extra padding on
    `pad_side` (masked out, label -100)."""
    new_len = max(lengths)
    needs_mask = attention_mask is not None or min(lengths) != new_len
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    # each kept position's column in the new row; dropped ones go to a spare column, cut off
    column = kept_upto - 1 + ((new_len - kept_upto[:, -1:]) if pad_side == "left" else 0)
    column.masked_fill_(~keep, new_len)
    columns = {"input_ids": (input_ids, pad_token_id), "attention_mask": (attention_mask, 0)}
    if labels is not None:
        columns["labels"] = (labels, IGNORE_INDEX)
    out = {
        name: tensor.new_full((tensor.shape[0], new_len + 1), fill).scatter_(1, column, tensor)[:, :new_len]
        for name, (tensor, fill) in columns.items()
    }
    if not needs_mask:
        out["attention_mask"] = None
    return out


def assign_rows(per_row: list[int], image_lengths: list[int]) -> list[int]:
    rows = []
    images = iter(image_lengths)
    for row, count in enumerate(per_row):
        need = 0
        while need < count:
            length = next(images, None)
            if length is None:
                break
            need += length
            rows.append(row)
        if need != count:
            raise ValueError(
                f"row {row} of input_ids has {count} image placeholder tokens, which does not match its "
                f"images' feature counts (images need {image_lengths} in order). Build the inputs with the "
                "model's own processor (the one loaded with it, e.g. AutoProcessor.from_pretrained) and one image "
                "per <image> in the text"
            )
    if next(images, None) is not None:
        raise ValueError(
            f"more images ({len(image_lengths)}) than <image> placeholders in the prompts; pass one image per <image>"
        )
    return rows


def feature_layers(vision_feature_layer) -> list[int]:
    """`vision_feature_layer` (an int or a list of them, as the model takes it) as a list."""
    layers = [vision_feature_layer] if isinstance(vision_feature_layer, int) else vision_feature_layer
    if (
        not isinstance(layers, (list, tuple))
        or not layers
        or not all(isinstance(h, int) and not isinstance(h, bool) for h in layers)
    ):
        raise ValueError(
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
        raise ValueError(
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

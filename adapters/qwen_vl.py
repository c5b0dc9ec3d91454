"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL (`...ForConditionalGeneration`): images at their native
resolution.

Geometry. The tower sees an image of (1, h, w) patches (`image_grid_thw`) and its patch
merger turns each 2x2 group into one LLM token: (h/2) x (w/2) tokens in raster order, one
`<|image_pad|>` placeholder each, no newlines. There is no base view and no crop: an image is
one partition, the whole image (`ImageLayout.base_shape` = (h/2, w/2)). HiRED's and
GlobalCom2's budget split over crops therefore has nothing to split, and both rank the one
partition by their token score.

Signals (no CLS token; every kind summed over the 4 patches of each merged token):
- "probs": the attention each patch receives, averaged over its image's queries and the heads,
  from the block's own q/k with its rotary positions, the image attended as a whole
  (`scoring.capture_packed_scores`). The default scored layer is the last block, which feeds
  the merger and attends over the whole image in every Qwen-VL (Qwen2.5-VL's windowed blocks
  are the others).
- "logits": -cos(patch, its image's mean patch) of the block's output, GlobalCom2's CLS-free
  score, as for SigLIP.
Qwen2.5-VL orders patches by attention window inside the tower; scores are put back in raster
order as the model puts its features back.

Positions. The LLM uses 3-D rotary positions (t, h, w) that `get_rope_index` computes from the
whole prompt, plus per-row `rope_deltas` for decoding. A shortened prompt keeps, for every
kept token (text and image), the position it has in the unpruned prompt: positions are
computed once on the unpruned prompt and carried to the kept columns, and `rope_deltas` make
decoding continue where the unpruned prompt's would. A `forward` gets them as `position_ids`;
`generate`, whose position bookkeeping differs between releases, finds them where each release
looks: its own call of `get_rope_index` returns them while the patched call runs.

Deepstack (Qwen3-VL). Features of chosen tower blocks are added to the first LLM layers at the
image tokens; each image's are kept with the same mask as its main vectors (a merging
method's kept token keeps its own), and injected at the kept placeholders.

Videos pass through unpruned: a call with videos only runs as stock; a call with both images
and videos is refused.
"""

from __future__ import annotations

import inspect
import threading
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from typing import ClassVar

import torch
import transformers
from packaging.version import Version
from torch import nn

from tokendrop.compaction import Compacted
from tokendrop.family import Adapter, ModelFacts, Request
from tokendrop.layout import EncodedImage, ImageLayout
from tokendrop.scoring import SIGNAL_KINDS, capture_packed_scores

from ..checks import UsageError
from .llava_next import check_transformers

VIDEO_INPUTS = ("pixel_values_videos", "video_grid_thw")


class QwenVLAdapter(Adapter):
    image_inputs = ("pixel_values", "image_grid_thw")
    # 5.x processors mark each prompt position's modality, which positions are computed from;
    # videos are taken too, to refuse a call that mixes them with images
    call_options = ("mm_token_type_ids", *VIDEO_INPUTS)
    signal_kinds = SIGNAL_KINDS
    model_type: ClassVar[str]
    in_tower_refusal = (
        "its tower runs each image as one packed sequence with 2-D rotary positions (Qwen2.5-VL: windowed "
        "attention in most blocks) and merges each 2x2 patch group into one LLM token after its last block, so "
        "pruning inside it must drop whole 2x2 groups with their positions and windows, which its adapter does "
        "not do yet"
    )

    @classmethod
    def supports(cls, model) -> bool:
        return getattr(getattr(model, "config", None), "model_type", None) == cls.model_type and hasattr(model, "model")

    @classmethod
    def facts(cls, config) -> ModelFacts:
        # the merger reads the last block's output
        return ModelFacts(
            cls.model_class, cls.signal_kinds, config.image_token_id, config.vision_config.depth, -1, config
        )

    def __init__(self, model):
        check_transformers()
        if Version(transformers.__version__) < Version(self.first_release):
            raise UsageError(
                f"tokendrop patches {self.model_class} from transformers {self.first_release}; found "
                f"{transformers.__version__}: pip install 'transformers>={self.first_release},<6'"
            )
        if type(model).__name__ != self.model_class:
            raise UsageError(
                f"patch the generating model ({self.model_class}), not its {type(model).__name__} submodule"
            )
        self.model = model
        self.vlm = model.model
        visual = self.vlm.visual
        self.blocks = visual.blocks
        self.n_vision_layers = len(self.blocks)
        self.feature_layer = -1
        self.merge = visual.spatial_merge_size
        self.image_token_id = model.config.image_token_id
        self._layouts: dict[tuple[int, int], ImageLayout] = {}

    # --- geometry ---------------------------------------------------------------------

    def layout(self, grid) -> ImageLayout:
        """The layout of an image of (t, h, w) patches: its (h/m) x (w/m) merged tokens, raster order."""
        key = (int(grid[1]) // self.merge, int(grid[2]) // self.merge)
        if key not in self._layouts:
            self._layouts[key] = ImageLayout(0, (0, 0), torch.arange(key[0] * key[1]), base_shape=key)
        return self._layouts[key]

    def layouts(self, image_grid_thw: torch.Tensor, **options) -> list[ImageLayout]:
        return [self.layout(grid) for grid in image_grid_thw.tolist()]

    def check_images(self, pixel_values, image_grid_thw, **options) -> torch.Tensor:
        expected = "pass the pixel_values and image_grid_thw that the model's processor returns"
        if any(options.get(name) is not None for name in VIDEO_INPUTS):
            raise UsageError(
                "tokendrop prunes the images of a Qwen-VL call and passes videos through, but not both in one call: "
                "send the videos in a call of their own (it runs unpatched), or the images without them"
            )
        grid = torch.as_tensor(image_grid_thw) if not isinstance(image_grid_thw, torch.Tensor) else image_grid_thw
        if grid.dim() != 2 or grid.shape[1] != 3 or grid.is_floating_point() or (grid < 1).any():
            raise UsageError(
                f"image_grid_thw must be (n_images, 3) positive ints (t, h, w); got {image_grid_thw!r:.200}"
            )
        grid = grid.long()
        if (grid[:, 0] != 1).any() or (grid[:, 1:] % self.merge).any():
            raise UsageError(
                f"image_grid_thw {grid.tolist()} is not an image's: t must be 1 and h, w multiples of the merge "
                f"size {self.merge}: {expected}"
            )
        patches = int(grid.prod(-1).sum())
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 2 or len(pixel_values) != patches:
            found = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise UsageError(
                f"pixel_values must be 2-D, one row per patch: images of grids {grid.tolist()} have {patches}; "
                f"got {found}: {expected}"
            )
        return grid

    # --- the model's parts, for tools that time or inspect them ------------------------

    @property
    def vision_tower(self) -> nn.Module:
        return self.vlm.visual

    @property
    def language_model(self) -> nn.Module:
        return self.vlm.language_model

    @property
    def vision_entry(self) -> tuple[nn.Module, str]:
        return self.vlm, "get_image_features"

    # --- vision pass ------------------------------------------------------------------

    def image_features(self, pixel_values, image_grid_thw, **options) -> list[torch.Tensor]:
        """The model's own vision pass: one (tokens, D) tensor per image, the merger's output."""
        return self.vision_pass(pixel_values, image_grid_thw)[0]

    def vision_pass(self, pixel_values, image_grid_thw) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, ...]]]:
        """(each image's merged tokens, each image's deepstack levels: () but for Qwen3-VL)."""
        output = self.vlm.get_image_features(pixel_values, image_grid_thw)
        sizes = (image_grid_thw.prod(-1) // self.merge**2).tolist()
        pooled = getattr(output, "pooler_output", output)
        features = list(pooled.split(sizes) if isinstance(pooled, torch.Tensor) else pooled)
        levels = [
            level.split(sizes) if isinstance(level, torch.Tensor) else level
            for level in getattr(output, "deepstack_features", None) or []
        ]
        return features, [tuple(level[i] for level in levels) for i in range(len(features))]

    def encode(self, pixel_values, image_grid_thw, signals: dict[int, str], **options) -> list[EncodedImage]:
        """One pass of the tower, capturing `signals` in the tower's token order; the scores of
        each merged token (its 4 patches summed), in raster order, per image."""
        kinds = {layer % self.n_vision_layers: kind for layer, kind in signals.items()}
        lengths = image_grid_thw.prod(-1).tolist()
        blocks = {layer: self.blocks[layer] for layer in kinds}
        with capture_packed_scores(blocks, kinds, lengths) as captured:
            features, extras = self.vision_pass(pixel_values, image_grid_thw)
        layouts = self.layouts(image_grid_thw)
        sizes = [layout.n_features for layout in layouts]
        units = self.merge**2
        per_layer = {}
        if captured:
            raster = self.raster_order(image_grid_thw).to(features[0].device)
            for layer, scores in captured.items():
                merged = torch.cat(scores).view(-1, units).sum(-1)  # the tower's order of merged tokens
                per_layer[layer] = merged.to(raster.device)[raster].split(sizes)
        return [
            EncodedImage(
                layout=layout,
                packed=packed,
                cls={layer: scores[i].view(1, -1) for layer, scores in per_layer.items()},
                n_layers=self.n_vision_layers,
                embed=self.model.get_input_embeddings(),
                extra=extra,
            )
            for i, (layout, packed, extra) in enumerate(zip(layouts, features, extras))
        ]

    def raster_order(self, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """For each merged token in raster order, its place in the tower's order: the same
        (Qwen2-VL, Qwen3-VL)."""
        return torch.arange(int(image_grid_thw.prod(-1).sum()) // self.merge**2)

    # --- the LLM's side ---------------------------------------------------------------

    def llm_inputs(self, compacted: Compacted, request: Request) -> dict:
        """The compacted prompt, the 3-D positions its kept tokens have in the unpruned prompt
        (`position_ids`) and the `rope_deltas` that continue them, with what the model needs to
        ask for positions itself (`image_grid_thw`, the short `mm_token_type_ids`)."""
        inputs = compacted.llm_inputs()
        types = request.inputs.get("mm_token_type_ids")
        asked = {"input_ids": request.input_ids, "image_grid_thw": request.inputs["image_grid_thw"]}
        asked["attention_mask"] = request.attention_mask
        if "mm_token_type_ids" in inspect.signature(self.vlm.get_rope_index).parameters:
            if types is None:
                raise UsageError(
                    f"{self.model_class} computes its positions from mm_token_type_ids: pass the "
                    "mm_token_type_ids that the model's processor returns with the prompt"
                )
            asked["mm_token_type_ids"] = types
            inputs["mm_token_type_ids"] = compacted.carry(types, 0)
        positions, deltas = self.vlm.get_rope_index(**asked)
        inputs["position_ids"] = compacted.carry(positions, 1)
        # a decode step's position is the row's count of tokens plus its delta, in every
        # release: each row's delta grows by the tokens it lost
        inputs["rope_deltas"] = (
            deltas
            + (
                tokens(request.attention_mask, request.input_ids)
                - tokens(compacted.attention_mask, compacted.input_ids)
            ).to(deltas.device)[:, None]
        )
        inputs["image_grid_thw"] = request.inputs["image_grid_thw"]
        return inputs

    @contextmanager
    def llm_call(self, call: dict, generating: bool):
        """`forward` takes the positions as `position_ids` (and `rope_deltas` are set, as the
        model sets them, for a decode step the caller runs next). `generate` recomputes them
        from the prompt in its own way in each release, so it gets none: its `get_rope_index`
        returns these while the call runs."""
        deltas = call.pop("rope_deltas")
        with ExitStack() as stack:
            if generating:
                stack.enter_context(_given_rope_index(self.vlm, call.pop("position_ids"), deltas))
            else:
                del call["image_grid_thw"]  # positions are given: the model reads no grid
                call.pop("mm_token_type_ids", None)
                self.vlm.rope_deltas = deltas
            yield


def tokens(attention_mask: torch.Tensor | None, input_ids: torch.Tensor) -> torch.Tensor:
    """(B,) each prompt row's tokens, padding left out."""
    if attention_mask is None:
        return torch.full((len(input_ids),), input_ids.shape[1], device=input_ids.device)
    return attention_mask.sum(-1)


class Qwen2VLAdapter(QwenVLAdapter):
    model_class = "Qwen2VLForConditionalGeneration"
    model_type = "qwen2_vl"


class Qwen2_5_VLAdapter(QwenVLAdapter):
    model_class = "Qwen2_5_VLForConditionalGeneration"
    model_type = "qwen2_5_vl"

    def raster_order(self, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """The tower takes merged tokens in attention-window order (`window_index`) and puts its
        output back in raster order with the inverse permutation, as here."""
        visual = self.vlm.visual
        if hasattr(visual, "get_window_index"):  # before 5.2x
            window_index = visual.get_window_index(image_grid_thw)[0]
        else:
            from transformers.vision_utils import get_vision_window_index

            window_index = get_vision_window_index(
                image_grid_thw,
                spatial_merge_size=self.merge,
                window_size=visual.window_size,
                patch_size=visual.patch_size,
                kwargs={},
            )[0]
        return torch.argsort(window_index.cpu())


class Qwen3VLAdapter(QwenVLAdapter):
    model_class = "Qwen3VLForConditionalGeneration"
    model_type = "qwen3_vl"
    first_release = "5.0"  # 4.57 has the model, with another deepstack and positions interface

    def llm_inputs(self, compacted: Compacted, request: Request) -> dict:
        """Also each deepstack level's vectors of the kept tokens, in placeholder order, and
        where the kept placeholders are (`visual_pos_masks`)."""
        inputs = super().llm_inputs(compacted, request)
        levels = zip(*(image.extra for image in request.images))
        inputs["visual_pos_masks"] = compacted.input_ids == self.image_token_id
        inputs["deepstack_visual_embeds"] = [
            torch.cat([vectors[mask.to(vectors.device)] for vectors, mask in zip(level, compacted.keep_masks)])
            for level in levels
        ]
        return inputs

    @contextmanager
    def llm_call(self, call: dict, generating: bool):
        """The model builds the deepstack inputs from image features it computes itself, so
        they go in by a pre-hook on the language model, at its first call (the prefill)."""
        masks, levels = call.pop("visual_pos_masks"), call.pop("deepstack_visual_embeds")
        with super().llm_call(call, generating), _deepstack_at_prefill(self.vlm.language_model, masks, levels):
            yield


# --- positions and deepstack while a patched call runs ------------------------------------

# Which positions `get_rope_index` returns in the context (thread, asyncio task) of a patched
# call; the model's own everywhere else. Calls in several threads count their claims on the
# model; the last one out removes the override.
_given: ContextVar[dict | None] = ContextVar("tokendrop_rope_index", default=None)
_claims_lock = threading.Lock()
_claims: dict[nn.Module, int] = {}


@contextmanager
def _given_rope_index(vlm: nn.Module, positions: torch.Tensor, deltas: torch.Tensor):
    """While active, `vlm.get_rope_index` called in this context returns (`positions`,
    `deltas`), their rows repeated where generate expanded the batch (num_return_sequences,
    beams)."""
    own = type(vlm).get_rope_index.__get__(vlm)

    def get_rope_index(input_ids=None, *args, **kwargs):
        given = (_given.get() or {}).get(vlm)
        if given is None:
            return own(input_ids, *args, **kwargs)
        # the batch it is asked for (4.x asks with the mask alone, input_ids None at prefill)
        asked = (input_ids, kwargs.get("attention_mask"), kwargs.get("inputs_embeds"))
        rows = next((t.shape[0] for t in asked if t is not None), given[0].shape[1])
        repeat = rows // given[0].shape[1]
        return given[0].repeat_interleave(repeat, 1), given[1].repeat_interleave(repeat, 0)

    token = _given.set({**(_given.get() or {}), vlm: (positions, deltas)})
    with _claims_lock:
        _claims[vlm] = _claims.get(vlm, 0) + 1
        vlm.get_rope_index = get_rope_index
    try:
        yield
    finally:
        with _claims_lock:
            _claims[vlm] -= 1
            if not _claims[vlm]:
                del _claims[vlm]
                del vlm.get_rope_index
        _given.reset(token)


@contextmanager
def _deepstack_at_prefill(language_model: nn.Module, masks: torch.Tensor, levels: list[torch.Tensor]):
    """While active, the first call of `language_model` gets `visual_pos_masks` = `masks` (B, T)
    and `deepstack_visual_embeds` = `levels` (kept image tokens in placeholder order, each
    level (n, D)), rows repeated where generate expanded the batch."""
    first = [True]

    def inject(module, args, kwargs):
        if not first[0]:
            return None
        first[0] = False
        rows = kwargs["inputs_embeds"].shape[0]
        repeat = rows // masks.shape[0]
        embeds = levels
        if repeat > 1:
            counts = masks.sum(-1).tolist()
            embeds = [torch.cat([c.repeat(repeat, 1) for c in level.split(counts)]) for level in levels]
        return args, {
            **kwargs,
            "visual_pos_masks": masks.repeat_interleave(repeat, 0),
            "deepstack_visual_embeds": embeds,
        }

    hook = language_model.register_forward_pre_hook(inject, with_kwargs=True)
    try:
        yield
    finally:
        hook.remove()

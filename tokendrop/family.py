"""The adapter interface: what the core needs of a model family.

One subclass per family lives in `adapters/` (installed as `tokendrop.adapters`) and is
registered there in `ADAPTERS`; `adapter_for(model)` picks the one whose `supports(model)`
holds. Methods never touch a model: they see the images an adapter reads (`EncodedImage`)
and, when they are resolved, the few facts below (`n_vision_layers`, `feature_layer`,
`image_token_id`, `model`).

A family implements the few steps that depend on it:

    check_images(pixel_values, geometry)    the call's images as the processor lays them out
    layouts(geometry)                       where each image's placeholder vectors come from
    encode(pixel_values, geometry, signals) one vision pass: packed vectors and scores
    llm_inputs(compacted, inputs)           what the LLM receives besides the short prompt

and the core, per request (`tokendrop.patch`), calls `read` (those three steps, and each
image's prompt row), selects, then `feed` (the shared `tokendrop.compaction`, then
`llm_inputs`) and, for a forward, `with_image_features`.

Pruning inside the vision tower (`vision_prune_layer=K`) takes two more steps, in a family
that can (`in_tower_refusal` None):

    encode_at(pixel_values, geometry, signals, K)  the pass up to layer K: what a method reads there
    finish_tower(images, kept, K)                  layers K+1 up to the feature layer on each
                                                   tile's kept tokens: what the LLM receives

`read` calls the first in place of `encode`; the core calls the second between selection and
`feed`, and checks K with `check_prune_layer` when patching. Tools that time or inspect a model
(the profiler, `show`, the benchmarks) use `vision_tower`, `language_model`, `vision_entry`
and `image_features`. ARCHITECTURE.md has the recipe for adding a family.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .checks import UsageError, check_layer
from .compaction import Compacted, assign_rows, compact
from .layout import EncodedImage, ImageLayout


class Adapter(ABC):
    """A model family's glue. Subclasses set the class attributes, and in `__init__(model)`
    check the model (raising ValueError for one they cannot patch) and set the instance
    attributes."""

    model_class: ClassVar[str]  # the generating class it patches, e.g. "LlavaNextForConditionalGeneration"
    # the keyword inputs of a call that carry its images: the pixels, then each image's geometry
    # (e.g. ("pixel_values", "image_sizes")); a call with pixels is pruned
    image_inputs: ClassVar[tuple[str, str]]
    # other keyword inputs of a call that the vision pass reads (per-call overrides): popped
    # from the call and handed to `read` and `feed` as `options`; the rest go to the LLM untouched
    call_options: ClassVar[tuple[str, ...]] = ()
    signal_kinds: ClassVar[tuple[str, ...]]  # the signals `read` can capture (`tokendrop.scoring`)
    first_release: ClassVar[str] = "4.56"  # the first transformers release the family is patched on
    # why the family cannot prune inside its vision tower (`vision_prune_layer`), for the error;
    # None where it can: it implements `encode_at` and `finish_tower`
    in_tower_refusal: ClassVar[str | None] = "its adapter does not run the tower's later layers on kept tokens"

    model: nn.Module  # the patched model
    image_token_id: int  # the prompt's placeholder token: one per visual token the LLM receives
    n_vision_layers: int  # the vision tower's layers, for methods' layer indices
    feature_layer: int  # the vision layer whose output the LLM receives (negative: from the end)

    @property
    def config(self):
        """The model's (transformers) config."""
        return self.model.config

    @classmethod
    @abstractmethod
    def supports(cls, model: nn.Module) -> bool:
        """Whether `model` is of this family (read from its config; cheap, never raises)."""

    @classmethod
    @abstractmethod
    def facts(cls, config) -> ModelFacts:
        """What methods read of a model of this `config`, where none is loaded (a harness
        checking its options before the weights load, a vLLM server). ValueError for a
        configuration the family cannot patch."""

    @abstractmethod
    def check_images(self, pixel_values, geometry, **options):
        """The call's per-image `geometry` (the second of `image_inputs`) in the form `layouts`
        and `encode` take, after checking that `pixel_values` hold every image as the model's
        processor lays them out: bad input fails here, before the vision pass. ValueError."""

    @abstractmethod
    def layouts(self, geometry, **options) -> list[ImageLayout]:
        """Every image's layout, in order: where each of its placeholders' vectors comes from."""

    @abstractmethod
    def encode(self, pixel_values, geometry, signals: dict[int, str], **options) -> list[EncodedImage]:
        """One vision pass over the images, capturing `signals` ({layer: kind}): each image's
        packed vectors (what its placeholders receive, unpruned) and scores."""

    def input_layouts(self, inputs) -> list[ImageLayout]:
        """Each image's layout, from a processor's output (its image inputs and options)."""
        pixels, geometry = self.image_inputs
        options = {name: inputs[name] for name in self.call_options if name in inputs}
        return self.layouts(self.check_images(inputs[pixels], inputs[geometry], **options), **options)

    def read(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        pixel_values,
        geometry,
        questions: list[str] | None,
        signals: dict[int, str],
        options: dict,
        prune_layer: int | None = None,
    ) -> list[EncodedImage]:
        """Every image of a call, checked against its prompt and encoded (`check_images`,
        `encode`), with its place in the call, its prompt row, that row's attention mask and
        the caller's question for that row, in placeholder order. `options`: the call's `call_options` it holds.
        `prune_layer`: K of `vision_prune_layer` (checked), the pass then stops there (`encode_at`)."""
        geometry = self.check_images(pixel_values, geometry, **options)
        per_row = (input_ids == self.image_token_id).sum(1).tolist()
        rows = assign_rows(per_row, [layout.packed_source.numel() for layout in self.layouts(geometry, **options)])
        if prune_layer is None:
            images = self.encode(pixel_values, geometry, signals, **options)
        else:
            images = self.encode_at(pixel_values, geometry, signals, prune_layer, **options)
        for index, (image, row) in enumerate(zip(images, rows)):
            image.index = index
            image.prompt_row = input_ids[row]
            image.prompt_mask = None if attention_mask is None else attention_mask[row]
            image.question = None if questions is None else questions[row]
        return images

    def feed(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor | None,
        keep_masks: list[torch.Tensor],
        packed: list[torch.Tensor],
        pad_side: str,
        pad_token_id: int,
        request: Request | None = None,
    ) -> tuple[torch.Tensor, dict, list[torch.Tensor]]:
        """(shortened input_ids, the LLM's keyword inputs, the vectors each image feeds the LLM):
        `compaction.compact` of the prompt, image i keeping `packed[i][keep_masks[i]]`, then
        the family's `llm_inputs` for the `request` being pruned (None: a bare prompt)."""
        compacted = compact(
            input_ids,
            attention_mask,
            labels,
            keep_masks,
            packed,
            pad_side,
            pad_token_id,
            self.image_token_id,
            self.model.get_input_embeddings(),
        )
        request = request or Request(input_ids, attention_mask, {}, [])
        return compacted.input_ids, self.llm_inputs(compacted, request), compacted.kept

    def llm_inputs(self, compacted: Compacted, request: Request) -> dict:
        """The LLM's keyword inputs for a compacted prompt, in the model's own names:
        `compacted.llm_inputs()` here; a family whose LLM needs more (the positions the kept
        tokens have in the unpruned prompt, say) adds it."""
        return compacted.llm_inputs()

    def llm_call(self, call: dict, generating: bool) -> AbstractContextManager:
        """A context around the model's own `generate` (`generating`) or `forward`, whose
        keyword arguments `call` holds (the caller's and `llm_inputs`): a family whose entry
        points take an input of `llm_inputs` in another way (recomputing positions from the
        prompt, say) takes it out of `call` and supplies it there. Nothing here."""
        return nullcontext()

    @staticmethod
    def with_image_features(output, kept: list[torch.Tensor]):
        """A forward's output carrying the vectors the LLM received, where the release's output
        has a field for them (the unpatched model fills it with every vector)."""
        if "image_outputs" in getattr(output, "__dataclass_fields__", {}):  # 5.x
            output["image_outputs"] = BaseModelOutputWithPooling(pooler_output=kept)
        elif "image_hidden_states" in getattr(output, "__dataclass_fields__", {}):  # 4.x: one tensor
            output["image_hidden_states"] = torch.cat(kept)
        return output

    # --- pruning inside the vision tower (vision_prune_layer=K) -------------------------

    def check_prune_layer(self, layer) -> int:
        """`vision_prune_layer` as the absolute index K of the vision layer that selection reads,
        checked before the model is touched: an int layer index as the tower's layer list takes
        it (negative from the end), below the feature layer (at it, nothing is left to run on
        the kept tokens: that is pruning after the tower). ValueError naming the valid ones,
        or why the family cannot (`in_tower_refusal`)."""
        if self.in_tower_refusal is not None:
            raise UsageError(
                f"vision_prune_layer is not available for a {self.model_class}: {self.in_tower_refusal}. "
                "Patch it without vision_prune_layer: selection after the vision tower"
            )
        n = self.n_vision_layers
        layer = check_layer("vision_prune_layer", layer, n)
        feature = self.feature_layer % n
        if layer % n >= feature:
            raise UsageError(
                f"vision_prune_layer={layer} is vision layer {layer % n}, not below the feature layer {feature} "
                f"(whose output the LLM receives): take 0 to {feature - 1} (or {-n} to {feature - 1 - n}). "
                "Selection at the feature layer is what patching without vision_prune_layer does"
            )
        return layer % n

    def selection_facts(self, layer: int) -> ModelFacts:
        """What a method resolved for selection inside the tower at layer `layer` reads of the
        model: a tower that ends there. Its layers are 0 to `layer`, -1 (the last, and the
        default of every method's scored layer) is `layer` itself, and its features are that
        layer's output."""
        return ModelFacts(self.model_class, self.signal_kinds, self.image_token_id, layer + 1, -1, self.model)

    def encode_at(self, pixel_values, geometry, signals: dict[int, str], layer: int, **options) -> list[EncodedImage]:
        """The vision pass up to layer `layer` (absolute) and no further, capturing `signals`
        ({layer: kind}, indexed as `selection_facts(layer)` indexes them: -1 is `layer`): what
        `encode` gives for a tower that ends there (`packed`: that layer's output through the
        projector), each image with its tiles' hidden states after that layer (`hidden`)."""
        raise NotImplementedError(f"{type(self).__name__} does not prune inside the vision tower")

    def finish_tower(self, images: list[EncodedImage], kept: list[torch.Tensor], layer: int, **options):
        """The rest of the tower after `encode_at(..., layer)`: the layers after `layer` up to the
        feature layer, run on each tile's kept features (`kept[i]`, (N,) bool over image i's
        features) and what the tile needs beside them (a CLS token), then the projector. Returns
        each image's (L, D) packed vectors as `EncodedImage.packed` lays them out: the kept
        features' and the newlines filled in, the dropped features' positions never read."""
        raise NotImplementedError(f"{type(self).__name__} does not prune inside the vision tower")

    # --- for tools that time or inspect the model ------------------------------------

    @property
    @abstractmethod
    def vision_tower(self) -> nn.Module:
        """The vision encoder."""

    @property
    @abstractmethod
    def language_model(self) -> nn.Module:
        """The decoder the prompt's embeddings go through (its first call is the prefill)."""

    @property
    @abstractmethod
    def vision_entry(self) -> tuple[nn.Module, str]:
        """(module, method name) through which the model runs its whole vision pass, patched
        or not: the place to time it."""

    @abstractmethod
    def image_features(self, **inputs) -> list[torch.Tensor]:
        """The model's own, unpruned vision pass over a call's `image_inputs`: one tensor per
        image of the vectors its placeholders receive."""


@dataclass(frozen=True)
class Request:
    """The call being pruned, as the family's `llm_inputs` may need it: the unpruned prompt, the
    call's image inputs and options by name, and its images as encoded."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    inputs: dict
    images: list[EncodedImage]


@dataclass(frozen=True)
class ModelFacts:
    """What a method reads of a model when it is resolved (`Method.resolve`), for where no
    model is loaded (a vLLM server builds its own): an `Adapter` has the same attributes."""

    model_class: str
    signal_kinds: tuple[str, ...]
    image_token_id: int
    n_vision_layers: int
    feature_layer: int
    config: object  # the model's (transformers) config
    model: nn.Module | None = None  # none at hand: the router checks a saved router by sizes only

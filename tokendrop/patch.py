"""The path from `patch()` to the LLM.

`patch(model, method, budget)` wraps the instance's `generate` and `forward`. When a call
carries images, the wrapper runs once, before the LLM:

    adapter.read     check the inputs, run vision tower + projector once, only as deep as
                     the features and the method's scores are read (with score hooks only for
                     this pass); each image with its prompt row and question
    select_images    the images of each layout stacked (`ImageBatch`) and selected together
                     on the features' device (`method.select_batch`: exact budget, spatial
                     order), merged where the method merges, plus the newlines the policy
                     keeps (`tokendrop.pruning`, which the vLLM integration shares)
    adapter.feed     drop the matching placeholders from input_ids/attention_mask/labels,
                     embed the short prompt's text and gather each image's kept vectors
                     straight into its placeholders (`tokendrop.compaction`); the call's one
                     host sync, for the new prompt length and where each image lands
    original call    with those inputs_embeds (generate also gets the short input_ids)

`handle.last` is built from the selection's device tensors when first read, not in the call.

Inside the vision tower (`patch(..., vision_prune_layer=K)`) the same steps run, two of them
shorter or split:

    adapter.read         the vision pass stops at layer K: the method reads scores of layers
                         0..K and, as features, layer K's output through the projector
    select_images        unchanged: the kept tokens, as pruning after the tower would choose
                         them from those scores
    adapter.finish_tower layers K+1 up to the feature layer on each tile's kept tokens (and
                         its CLS token), then the projector: the vectors the LLM receives
    adapter.feed         unchanged

Decode steps and text-only calls pass straight through (a forward without images never enters
the patch); a `generate` that continues from a
patched call's cache feeds the shortened prompt that the cache holds, and a decode step of
the caller's own loop from such a cache gets the shortened prompt's attention mask. All state lives in one `Handle`
stored on the model; `unpatch` puts back exactly what was there before.

The instance attributes are `_Wrapper` objects, not closures, so that `copy.deepcopy` and
pickle give a copy its own working patch. Under an accelerate hook (`device_map="auto"`)
the patch sits beneath it, in the `_old_forward` that the hook calls.
"""

from __future__ import annotations

import copy
import functools
import inspect
import textwrap
import warnings
import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import Cache, GenerationConfig

from .adapters import adapter_for
from .checks import UsageError, UsageTypeError
from .family import Adapter, Request
from .method import Method, build as build_method
from .method.base import check_budget_given, check_fits, check_in_tower, check_signals, methods_doc
from .pruning import ImageRecord, Selected, select_images

ATTRIBUTE = "_tokendrop_handle"
WRAPPED = ("generate", "forward")
ACCELERATE_SLOT = "_old_forward"  # where accelerate's add_hook_to_module keeps the forward its hook calls


class Handle:
    """A patch: the method, the model's adapter, the vision layer it selects at inside the
    tower (`prune_layer`, absolute; None: after the tower), and the last call's records. With
    concurrent calls, `last` holds the records of whichever call finished last."""

    def __init__(self, model: nn.Module, method: Method, adapter: Adapter, prune_layer: int | None = None):
        self.model = model
        self.method = method
        self.adapter = adapter
        self.prune_layer = prune_layer
        self._last: list[ImageRecord] | tuple[Selected, ...] = []
        self._saved: dict[str, tuple[str, object]] = {}  # name -> (attribute we took, what it held)
        self._calls = None  # the wrappers' closures over this model, built on first use
        self._observers: list[Callable[[], AbstractContextManager]] = []

    def __repr__(self) -> str:
        where = "" if self.prune_layer is None else f" inside the vision tower at layer {self.prune_layer}"
        return f"<tokendrop patch {self.method!r}{where} on {type(self.model).__name__}>"

    def __getstate__(self) -> dict:
        # a copy builds closures over its own model, and is observed by no one
        return {**self.__dict__, "_calls": None, "_observers": []}

    @property
    def last(self) -> list[ImageRecord]:
        """What happened to each image of the last call, in order; read back from the device
        on first access, so that the call itself never waits for it."""
        if isinstance(self._last, tuple):
            self._last = [selected.record() for selected in self._last]
        return self._last

    @last.setter
    def last(self, records: list[ImageRecord]) -> None:
        self._last = records

    @property
    def in_force(self) -> bool:
        """False once removed or replaced by a later patch; its wrappers then pass through."""
        return self.model.__dict__.get(ATTRIBUTE) is self

    def install(self) -> None:
        """Put this patch in force on its model, in place of any patch there (a removed or
        replaced handle comes back, as `patched` restores the patch it found)."""
        unpatch(self.model)
        attrs = self.model.__dict__
        for name in WRAPPED:
            # beneath an accelerate hook, so that the hook still runs first and removing it keeps the patch
            slot = ACCELERATE_SLOT if name == "forward" and ACCELERATE_SLOT in attrs else name
            self._saved[name] = (slot, attrs.get(slot))
            attrs[slot] = _Wrapper(self, name)
        self._calls = None
        attrs[ATTRIBUTE] = self

    def _inner(self, name: str):
        """What the wrapper of `name` calls: what its attribute held before, else the class's method."""
        previous = self._saved[name][1]
        return previous if previous is not None else getattr(type(self.model), name).__get__(self.model)

    def _call(self, name: str, args, kwargs):
        if not self.in_force:  # still reachable through a wrapper installed on top of ours (accelerate's)
            return self._inner(name)(*args, **kwargs)
        if self._calls is None:
            self._calls = self._wrappers()
        return self._calls[name](*args, **kwargs)

    def remove(self) -> None:
        """Restore the model exactly as it was before `patch`. A handle no longer in force does
        nothing. Where accelerate moved our wrapper (into or out of `_old_forward`), the
        original goes back in its place."""
        if not self.in_force:
            return
        attrs = self.model.__dict__
        for name, (slot, previous) in self._saved.items():
            for where in (name, ACCELERATE_SLOT):
                if not _wraps(attrs.get(where), self, name):
                    continue
                if where == slot == name and previous is None:
                    del attrs[where]
                else:
                    attrs[where] = self._inner(name)
        del attrs[ATTRIBUTE]

    @contextmanager
    def observed(self, watch: Callable[[], AbstractContextManager]):
        """While open, each pruning step of this patch (the vision pass, selection and the
        shortened prompt: everything before the LLM) runs inside a fresh `watch()`: a timer,
        say, or a profiler's range."""
        self._observers.append(watch)
        try:
            yield self
        finally:
            self._observers.remove(watch)

    # --- the one pruning step ---------------------------------------------------------

    @torch.compiler.disable  # hooks added after torch.compile never fire in compiled code: run eagerly
    def prune(self, input_ids, attention_mask, labels, images: dict, questions, pad_default: str):
        """Select tokens for every image of the batch and shorten the prompts to match.
        `images`: the call's `adapter.image_inputs` and `call_options`, by name.
        Returns (shortened input_ids, the LLM's keyword inputs: inputs_embeds, attention_mask
        and labels when given) and the kept vectors of each image.
        `pad_default`: the padding side of rows that became shorter, where the batch has none."""
        self.last = []  # a failing call leaves no earlier call's records behind
        pixels, geometry = self.adapter.image_inputs
        if input_ids is None:
            raise UsageError(
                f"a patched model needs input_ids with its {pixels} (it removes the placeholders of "
                "dropped tokens); inputs_embeds cannot be shortened"
            )
        if images.get(geometry) is None:
            raise UsageError(f"{pixels} come with {geometry} (the processor returns both): pass them together")
        _check_prompt(input_ids, attention_mask, labels)
        _check_questions(questions, input_ids.shape[0])
        pad_side = padding_side(attention_mask, default=pad_default)  # read before the vision pass is queued
        options = {k: v for k, v in images.items() if k not in self.adapter.image_inputs}
        with ExitStack() as watched:
            for watch in self._observers:
                watched.enter_context(watch())
            encoded = self.adapter.read(
                input_ids,
                attention_mask,
                images[pixels],
                images[geometry],
                questions,
                self.method.signals(),
                options,
                self.prune_layer,
            )
            selected, packed = select_images(self.method, encoded)
            if self.prune_layer is not None:  # the rest of the tower, on the kept tokens only
                packed = self.adapter.finish_tower(encoded, [s.kept for s in selected], self.prune_layer, **options)
            compact_ids, llm_inputs, kept_features = self.adapter.feed(
                input_ids,
                attention_mask,
                labels,
                [s.keep_mask for s in selected],
                packed,
                pad_side,
                self._pad_token_id(),
                Request(input_ids, attention_mask, images, encoded),
            )
        self._last = tuple(selected)
        return compact_ids, llm_inputs, kept_features

    def _take_images(self, call: dict) -> dict:
        """The call's image inputs and vision-pass options, taken out of it."""
        names = (*self.adapter.image_inputs, *self.adapter.call_options)
        return {name: call.pop(name) for name in names if name in call}

    def _pad_token_id(self) -> int:
        for source in (self.model.generation_config, self.model.config.get_text_config()):
            pad = getattr(source, "pad_token_id", None)
            if pad is not None:
                return pad
        return 0  # any id works: compaction masks its padding out

    def _image_in_cache(self, input_ids, cache) -> bool:
        """Whether `cache` already holds image placeholders of `input_ids` (filled by an unpatched
        call): generate then runs only what follows, as stock. A cached text prefix is fine."""
        cached = cache.get_seq_length() if isinstance(cache, Cache) else 0
        return cached > 0 and bool((input_ids[:, :cached] == self.adapter.image_token_id).any())

    # --- the wrappers -----------------------------------------------------------------

    def _wrappers(self) -> dict:
        generate, forward = self._inner("generate"), self._inner("forward")  # bound, maybe already wrapped
        generate_signature = inspect.signature(generate)

        @functools.wraps(generate)
        def patched_generate(*args, **kwargs):
            call = generate_signature.bind_partial(*args, **kwargs).arguments
            call.update(call.pop("kwargs", {}))
            input_ids = call.pop("input_ids", call.pop("inputs", None))
            questions = call.pop("questions", None)
            self.last = []
            cache = next(
                (call[k] for k in ("cache", "past_key_values", "cache_params") if call.get(k) is not None), None
            )
            shortened = _shortened_prompt(cache)
            if shortened is not None:
                # continuing a patched call: its cache holds the shortened prompt, images included
                self._take_images(call)
                compact_ids, call["attention_mask"] = shortened.shorten(input_ids, call.get("attention_mask"))
            elif call.get(self.adapter.image_inputs[0]) is None or self._image_in_cache(input_ids, cache):
                # text only, or an unpatched call's cache that holds the whole prompt
                return generate(input_ids, **call)
            else:
                with torch.no_grad():  # as stock generate: no autograd graph for the vision pass
                    attention_mask = call.pop("attention_mask", None)
                    compact_ids, llm_inputs, _ = self.prune(
                        input_ids, attention_mask, None, self._take_images(call), questions, "left"
                    )
                call.update(llm_inputs)
            shift = input_ids.shape[1] - compact_ids.shape[1]
            _count_lengths_from_callers_prompt(call, self.model.generation_config, shift)
            with self.adapter.llm_call(call, generating=True):
                output = generate(compact_ids, **call)
            if shortened is None:
                repeats = _sequences(output).shape[0] // input_ids.shape[0]  # num_return_sequences
                _remember_shortened(output, cache, input_ids, compact_ids, call["attention_mask"], repeats)
            return _with_original_prompt(output, input_ids, compact_ids.shape[1])

        signature = inspect.signature(forward)

        @functools.wraps(forward)
        def patched_forward(*args, **kwargs):
            questions = kwargs.pop("questions", None)
            call = signature.bind_partial(*args, **kwargs).arguments
            call.update(call.pop("kwargs", {}))
            pixels = self.adapter.image_inputs[0]
            if call.get(pixels) is None:
                return forward(**_with_cache_mask(call))
            if call.get("position_ids") is not None:
                raise UsageError(
                    f"position_ids cannot be passed with {pixels} to a patched model: the prompt it "
                    "describes is shortened before the LLM. Leave position_ids out"
                )
            images = self._take_images(call)
            input_ids, attention_mask, labels = (call.pop(k, None) for k in ("input_ids", "attention_mask", "labels"))
            compact_ids, llm_inputs, kept_features = self.prune(
                input_ids, attention_mask, labels, images, questions, "right"
            )
            call.update(llm_inputs)
            with self.adapter.llm_call(call, generating=False):
                output = forward(**call)
            # a decode loop continues from this cache: its steps get the shortened prompt's mask
            _remember_shortened(output, None, input_ids, compact_ids, llm_inputs.get("attention_mask"), 1)
            return self.adapter.with_image_features(output, kept_features)

        return {"generate": patched_generate, "forward": patched_forward}


class _Wrapper:
    """`model.generate`/`model.forward` while patched: calls its handle's wrapper. An object,
    not a closure, so that deepcopy and pickle carry the handle to the copy."""

    def __init__(self, handle: Handle, name: str):
        self.handle, self.name = handle, name

    @property
    def __wrapped__(self):  # inspect.signature (generate routes arguments by it) sees the original
        return self.handle._inner(self.name)

    def __call__(self, *args, **kwargs):
        handle = self.handle
        if self.name == "forward" and not args and "questions" not in kwargs:
            if kwargs.get(handle.adapter.image_inputs[0]) is None:  # a decode step, or text only
                return handle._inner("forward")(**_with_cache_mask(kwargs))
        return handle._call(self.name, args, kwargs)


def _wraps(value, handle: Handle, name: str) -> bool:
    return isinstance(value, _Wrapper) and value.handle is handle and value.name == name


def _check_prompt(input_ids, attention_mask, labels) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        found = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise UsageError(
            f"input_ids must be 2-D (batch, sequence), as the processor returns them; got {found}. "
            "For one prompt add the batch dimension: input_ids[None]"
        )
    for name, tensor in (("attention_mask", attention_mask), ("labels", labels)):
        if tensor is not None and tensor.shape != input_ids.shape:
            raise UsageError(
                f"{name} has shape {tuple(tensor.shape)}, input_ids {tuple(input_ids.shape)}: they must match"
            )


def _check_questions(questions, rows: int) -> None:
    if questions is None:
        return
    if not isinstance(questions, (list, tuple)):
        raise UsageTypeError(
            f"questions= takes a list of question strings, one per prompt row ({rows} rows); got a "
            f"{type(questions).__name__}: pass a list, e.g. [question] for one prompt"
        )
    for i, question in enumerate(questions):
        if not isinstance(question, str):
            raise UsageTypeError(
                f"questions[{i}] is {type(question).__name__} ({question!r:.60}); questions= takes strings"
            )
    if len(questions) != rows:
        raise UsageError(f"questions= takes one question string per prompt row ({rows} rows), got {questions!r}")


def _count_lengths_from_callers_prompt(call: dict, model_config, shift: int) -> None:
    """generate's max_length/min_length count the prompt, which the LLM sees `shift` tokens
    shorter: lower them by as much, so that they allow exactly the new tokens they allow
    unpatched. Each is read where generate reads it and written back where it wins. Left
    alone where generate does not count the prompt with it: a max_new_tokens/min_new_tokens
    overrides it, or (4.x) it is the library's default from a config, read as new tokens."""
    given = call.get("generation_config")
    if given is not None:
        given = call["generation_config"] = copy.deepcopy(given)
    for name, new_tokens in (("max_length", "max_new_tokens"), ("min_length", "min_new_tokens")):
        value = _setting(name, call, given, model_config)
        if value is None or _setting(new_tokens, call, given, model_config) is not None:
            continue
        if call.get(name) is None and value == getattr(GenerationConfig(), name):
            continue
        value = value - shift if name == "max_length" else max(0, value - shift)
        if call.get(name) is None and given is not None:
            setattr(given, name, value)
        else:
            call[name] = value


def _setting(name: str, call: dict, given, model_config):
    """A generation setting where generate reads it: the kwarg, else generation_config=, else the model's."""
    return next(
        (v for v in (call.get(name), getattr(given, name, None), getattr(model_config, name, None)) if v is not None),
        None,
    )


@dataclass(frozen=True)
class _Shortened:
    """The caller's prompt rows and the shortened ones a patched generate fed the LLM; the
    cache it filled starts with the shortened ones."""

    original: torch.Tensor
    compact: torch.Tensor
    compact_mask: torch.Tensor | None

    def shorten(self, input_ids, attention_mask):
        """(input_ids, attention_mask) of a continuation, with the caller's prompt swapped for the
        shortened one that the cache holds."""
        n = self.original.shape[1]
        if not (
            isinstance(input_ids, torch.Tensor)
            and input_ids.dim() == 2
            and input_ids.shape[0] == len(self.original)
            and input_ids.shape[1] >= n
            and torch.equal(input_ids[:, :n], self.original.to(input_ids.device))
        ):
            raise UsageError(
                "this cache was filled by a tokendrop-patched generate, whose LLM saw a shortened prompt: continue "
                "with input_ids that start with the sequences that call returned (prompt included), or "
                "generate again without the cache"
            )
        ids = torch.cat([self.compact.to(input_ids.device), input_ids[:, n:]], 1)
        if attention_mask is None and self.compact_mask is None:
            return ids, None
        tail = torch.ones_like(input_ids[:, n:]) if attention_mask is None else attention_mask[:, n:]
        head = torch.ones_like(self.compact) if self.compact_mask is None else self.compact_mask
        return ids, torch.cat([head.to(tail.device), tail], 1)

    def decode_mask(self, attention_mask: torch.Tensor, cached: int, new: int) -> torch.Tensor:
        """The mask of a forward of `new` tokens from this cache (`cached` long): one as long
        as the cache is its own (generate's steps); one that starts with the caller's prompt
        (a decode loop that extends the caller's mask) gets the shortened prompt's columns."""
        width, n = attention_mask.shape[1], self.original.shape[1]
        if width == cached + new:
            return attention_mask
        if width != cached + new + n - self.compact.shape[1] or attention_mask.shape[0] != len(self.compact):
            raise UsageError(
                f"this cache holds a prompt a patched call shortened to {self.compact.shape[1]} tokens (yours has "
                f"{n}), and attention_mask has {width} columns for {cached} cached and {new} new tokens: pass "
                "your prompt's mask extended by one column per token since (it is swapped for the shortened "
                "one), or the cache's own length"
            )
        head = torch.ones_like(self.compact) if self.compact_mask is None else self.compact_mask
        return torch.cat([head.to(attention_mask.device, attention_mask.dtype), attention_mask[:, n:]], 1)


def _with_cache_mask(call: dict) -> dict:
    """A forward's keyword arguments, with the attention mask of a step from a cache that a
    patched call filled made the shortened prompt's (`_Shortened.decode_mask`)."""
    cache = next((call[k] for k in ("cache", "past_key_values") if call.get(k) is not None), None)
    shortened = _shortened_prompt(cache)
    mask, ids = call.get("attention_mask"), call.get("input_ids", call.get("inputs_embeds"))
    if shortened is None or mask is None or ids is None:
        return call
    return call | {"attention_mask": shortened.decode_mask(mask, cache.get_seq_length(), ids.shape[1])}


# cache -> _Shortened, for the caches that patched calls filled; weak, so a cache's entry goes
# with the cache
_SHORTENED: weakref.WeakKeyDictionary[Cache, _Shortened] = weakref.WeakKeyDictionary()


def _shortened_prompt(cache) -> _Shortened | None:
    return _SHORTENED.get(cache) if isinstance(cache, Cache) else None


def output_cache(output):
    """The key/value cache a forward or generate output carries, read by the name the release
    uses (`cache` from transformers 5.2x, `past_key_values` before): reading the old name on a
    new release prints a deprecation warning on every call."""
    fields = getattr(output, "__dataclass_fields__", {})
    return getattr(output, "cache" if "cache" in fields else "past_key_values", None)


def _remember_shortened(output, cache, input_ids, compact_ids, compact_mask, rows: int) -> None:
    """Tie the cache a patched call filled to the prompts it holds; `rows`: how many times
    each row is repeated in it (generate's num_return_sequences)."""
    returned = output_cache(output)
    cache = cache if returned is None else returned
    if isinstance(cache, Cache):
        original, compact = input_ids.repeat_interleave(rows, 0), compact_ids.repeat_interleave(rows, 0)
        mask = None if compact_mask is None else compact_mask.repeat_interleave(rows, 0)
        _SHORTENED[cache] = _Shortened(original, compact, mask)


def padding_side(attention_mask, default: str) -> str:
    """Keep the batch's own padding side; `default` when it has no padding."""
    if attention_mask is not None:
        if bool((attention_mask[:, 0] == 0).any()):
            return "left"
        if bool((attention_mask[:, -1] == 0).any()):
            return "right"
    return default


def _with_original_prompt(output, input_ids, compact_length: int):
    """Put the caller's own prompt ids in front of the generated tokens, so that slicing by the
    original prompt length still yields exactly the new tokens."""
    sequences = _sequences(output)
    prompt = input_ids.repeat_interleave(sequences.shape[0] // input_ids.shape[0], dim=0).to(sequences.device)
    sequences = torch.cat([prompt, sequences[:, compact_length:]], dim=1)
    if isinstance(output, torch.Tensor):
        return sequences
    output.sequences = sequences
    return output


def _sequences(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.sequences


# --- public API -----------------------------------------------------------------------


def patch(
    model: nn.Module,
    method: str | Method,
    budget: float | int | None = None,
    processor=None,
    vision_prune_layer: int | None = None,
    **options,
) -> Handle:
    """Make every later `model.generate(...)`/`model(...)` call feed the LLM only the visual
    tokens `method` keeps within `budget`, and return the patch's `Handle`.

    `method` is a registered name (listed below) with `budget` and the method's options as
    keywords, `patch(model, "hired", budget=0.2, alpha=0.5)`, or a method object that carries
    them, `patch(model, tokendrop.HiRED(budget=0.2, alpha=0.5))` (also one outside the
    registry, such as an evaluation oracle). `budget` is required: a fraction in (0, 1] of each
    image's feature tokens, or a token count per image (an int); 1.0 keeps every token and
    leaves the outputs unchanged. (`text` and `router` with `threshold=` take none.)
    `processor`, the model's processor, is needed by the methods that read the prompt
    (`text`, `router`, `dpp`); any method accepts it.
    `vision_prune_layer=K` (a vision layer index, negative from the end, below the feature
    layer) selects inside the vision tower: the method reads layer K (its layer options count
    in a tower that ends at K: -1 is K), and layers K+1 up to the feature layer run on the
    kept tokens only. The kept set is the one selection after the tower would choose from
    layer K's scores; the kept vectors differ, as the later layers see fewer tokens. None:
    selection after the tower.
    A PEFT-wrapped model is patched on its base model. Everything is validated before the
    model is touched; patching a patched model replaces the old patch."""
    if _is_peft(model):
        warnings.warn(
            f"patching the {type(model.get_base_model()).__name__} under the {type(model).__name__}: "
            "the PEFT model's calls run through it, so they are pruned too",
            stacklevel=2,
        )
    model = _base_model(model)
    adapter = adapter_for(model)
    if isinstance(method, Method):
        given = [f"{k}=" for k, v in (("budget", budget), ("processor", processor)) if v is not None] + [
            f"{k}=" for k in options
        ]
        if given:
            cls = type(method).__name__
            raise UsageTypeError(
                f"a method object carries its own budget and options, so {', '.join(given)} cannot be given "
                f"beside it: set them on the object, e.g. patch(model, {cls}(budget=0.2, ...)), or "
                f"dataclasses.replace(method, budget=0.2)"
            )
    else:
        method = build_method(method, budget=budget, processor=processor, **options)
    chosen, prune_layer = resolve(method, adapter, vision_prune_layer)
    handle = Handle(model, chosen, adapter, prune_layer)
    handle.install()
    return handle


patch.__doc__ += "\n\n" + textwrap.indent(methods_doc(), "    ")


def resolve(method: Method, adapter: Adapter, vision_prune_layer: int | None = None) -> tuple[Method, int | None]:
    """(`method` resolved against the model, the absolute vision layer it selects at inside the
    tower or None), everything checked: the method's options and signals against the model;
    with `vision_prune_layer`, that layer against the model (`Adapter.check_prune_layer`) and
    the method against selecting there (`check_in_tower`). The model is not touched."""
    if vision_prune_layer is None:
        return check_fits(method, adapter), None
    layer = adapter.check_prune_layer(vision_prune_layer)
    check_in_tower(method, layer)
    try:
        chosen = method.resolve(adapter.selection_facts(layer))
    except ValueError as error:
        raise UsageError(
            f"{error}. With vision_prune_layer={vision_prune_layer}, selection sees the tower up to layer {layer} "
            f"only: layers 0 to {layer}, -1 being layer {layer}; set the method's layer options within them"
        ) from None
    check_signals(chosen, adapter)
    check_budget_given(chosen)
    return chosen, layer


def _base_model(model) -> nn.Module:
    """The model to patch: a loaded HF model itself, or the one under a PEFT wrapper (whose
    forward and generate end in the base model's, so patching that patches the wrapper too)."""
    if not isinstance(model, nn.Module):
        raise UsageTypeError(f"patch() takes a loaded Hugging Face model, got {type(model).__name__}")
    if isinstance(getattr(model, "_orig_mod", None), nn.Module):
        raise UsageTypeError(
            "patch() takes the model, not its torch.compile wrapper: patch model._orig_mod (the compiled "
            "module then runs the patched model), or patch before compiling"
        )
    return model.get_base_model() if _is_peft(model) else model


def _is_peft(model) -> bool:
    return type(model).__module__.startswith("peft.") and hasattr(model, "get_base_model")


def handle_of(model: nn.Module) -> Handle | None:
    """The patch in force on `model` (on its base model, under a PEFT wrapper), or None."""
    return _base_model(model).__dict__.get(ATTRIBUTE)


def adapter_of(model: nn.Module) -> Adapter:
    """The model's adapter (its patch's, when patched): the one way tools reach model details."""
    handle = handle_of(model)
    return handle.adapter if handle is not None else adapter_for(_base_model(model))


def unpatch(model: nn.Module) -> None:
    """Remove tokendrop's patch, if any; the model is exactly as before `patch`."""
    handle = handle_of(model)
    if handle is not None:
        handle.remove()


@contextmanager
def patched(
    model: nn.Module,
    method: str | Method,
    budget: float | int | None = None,
    processor=None,
    vision_prune_layer: int | None = None,
    **options,
):
    """`with tokendrop.patched(model, "hired", budget=0.2) as handle:` patch for a block, with
    `patch`'s arguments. Leaving the block restores the patch from before it (or none), even
    where the block patched or unpatched the model itself."""
    previous = handle_of(model)
    handle = patch(model, method, budget=budget, processor=processor, vision_prune_layer=vision_prune_layer, **options)
    try:
        yield handle
    finally:
        unpatch(model)
        if previous is not None:
            previous.install()

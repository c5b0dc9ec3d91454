"""What a method is: a small dataclass of validated options that turns encoded images into
the feature tokens to keep. Budgets, allocation, top-k and newlines are shared
(`tokendrop.selection`); the patch machinery does the rest.

A method implements one of two entry points; the base class derives the other:
- `select_batch(batch)`: the images of one layout at once (`ImageBatch`, stacked on the
  features' device) -> a (B, N) bool mask of the kept features, with no host sync; a merging
  method returns a `Grouping` (each feature's owner: the kept index whose mean it joins).
- `select(image)`: one image -> its sorted kept indices, or a `Merged` for a merging method
  (`pool`, `visionzip`): the kept indices plus, for each, the group of feature indices whose
  mean (optionally weighted) the LLM receives at that position. Simple enough for a method
  that cannot batch; the patch then runs it image by image."""

from __future__ import annotations

import dataclasses
import inspect
import textwrap
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..checks import UsageError, check_choice
from ..layout import EncodedImage, ImageBatch, ImageLayout
from ..registry import Registry, did_you_mean
from ..selection import NEWLINE_POLICIES, Grouping, check_budget, feature_mask, keep_count


@dataclass(frozen=True, eq=False)
class Merged:
    """A merging method's selection of one image.

    indices: (k,) long, ascending: the kept feature indices, exactly the budget's count.
    groups: k (n_j,) long tensors, ascending: the feature indices averaged into kept token j.
        Groups are disjoint and indices[j] is the smallest member of groups[j] (a merged token
        stands at its group's first position); a token kept as it is, is its own group of one.
    weights: None for plain means, else k (n_j,) float tensors of non-negative weights with a
        positive sum, aligned with groups.
    """

    indices: torch.Tensor
    groups: list[torch.Tensor]
    weights: list[torch.Tensor] | None = None

    def grouping(self, n_features: int) -> Grouping:
        """This selection as the `Grouping` the shared steps take (one representation for
        every merging selection), checked: groups disjoint, each starting at its kept index,
        weights non-negative and aligned."""
        kept, groups = self.indices.cpu().long(), self.groups
        sizes = torch.tensor([g.numel() for g in groups], dtype=torch.long)
        members = torch.cat([g.cpu().long() for g in groups]) if groups else torch.zeros(0, dtype=torch.long)
        firsts = torch.tensor([int(g.min()) if g.numel() else -1 for g in groups], dtype=torch.long)
        if (
            len(groups) != kept.numel()
            or not torch.equal(firsts, kept)
            or members.unique().numel() != members.numel()
            or bool((members >= n_features).any())
            or bool((members < 0).any())
        ):
            raise RuntimeError(
                "a merging method returned groups that are not disjoint groups of feature indices "
                "each starting at its kept index"
            )
        owner = torch.full((n_features,), -1, dtype=torch.long)
        owner[members] = torch.repeat_interleave(kept, sizes)
        if self.weights is None:
            return Grouping(owner)
        w = torch.cat([x.cpu().float() for x in self.weights]) if self.weights else torch.zeros(0)
        if w.numel() != members.numel() or bool((w < 0).any()):
            raise RuntimeError("a merging method returned weights that do not match its groups or are negative")
        return Grouping(owner, torch.zeros(n_features).index_copy_(0, members, w))


class ProcessorNeeded(UsageError):
    """The method reads the question (`Method.reads`) and was given no processor to find it with."""


METHODS: Registry[type[Method]] = Registry("method")
READS = ("scores", "features", "question")  # what a selection can read of an image (`Method.reads`)


def option(default, doc: str, **kwargs):
    """A method option: a dataclass field whose `doc` the class's docstring lists (`register`
    writes it), so that help(tokendrop.HiRED) shows what each option does."""
    return field(default=default, metadata={"doc": doc}, **kwargs)


def register(name: str, summary: str):
    """Add the method class to `METHODS` as `name`, with its one-line `summary` (`patch`'s
    docstring lists them), and give it the docstring help() shows: its own (else its
    module's, which describes the method) and its options."""

    def add(cls):
        cls.name, cls.summary = name, summary
        cls.__doc__ = f"{description(cls)}\n\n{options_doc(cls)}"
        return METHODS.register(name)(cls)

    return add


def description(cls) -> str:
    """What the method does: the class's own docstring, else its module's; `dataclass` writes
    a class without one its signature, which help() shows anyway."""
    own = cls.__doc__ or ""
    if own.startswith(f"{cls.__name__}("):
        own = inspect.getmodule(cls).__doc__ or ""
    return inspect.cleandoc(own)


def options_doc(cls) -> str:
    lines = [f"Attributes (tokendrop.patch(model, {cls.name!r}, budget=..., OPTION=...) or {cls.__name__}(...)):"]
    for f in dataclasses.fields(cls):
        if f.init and "doc" in f.metadata:
            text = f"{f.name} (default {f.default!r}): {f.metadata['doc']}"
            lines.append(textwrap.fill(text, 96, initial_indent="    ", subsequent_indent="        "))
    return "\n".join(lines)


@dataclass
class Method:
    """Options every method takes."""

    name: ClassVar[str]
    summary: ClassVar[str]
    merges: ClassVar[bool] = False  # selects by merging (returns a `Merged` or `Grouping`): pool, visionzip
    budget: float | int | None = option(
        None,
        "the visual tokens kept per image: a fraction in (0, 1] of its feature tokens (0.2) or a token count "
        "(an int, 64). Required to patch: 1.0 keeps every token",
    )
    newlines: str = option(
        "rows",
        "the AnyRes row-end newline tokens: 'rows' keeps those of rows with a kept token, 'all' every one, 'drop' none",
    )

    def __post_init__(self):
        if self.budget is not None:  # checked when the model is patched: `check_budget_given`
            self.budget = check_budget(self.budget)
        check_choice("newlines", self.newlines, NEWLINE_POLICIES)

    def needs_budget(self) -> bool:
        """Whether selecting needs `budget` (text and router with threshold= do without)."""
        return True

    @classmethod
    def needs_processor(cls) -> bool:
        """Whether the method reads the prompt (through the model's processor)."""
        return any(f.name == "processor" for f in dataclasses.fields(cls))

    def resolve(self, adapter) -> Method:
        """A copy with model-dependent defaults filled in and checked against the model."""
        return self

    def signals(self) -> dict[int, str]:
        """CLS scores the vision pass must capture: {layer: "probs" | "logits"}."""
        return {}

    def kept_count(self, layout: ImageLayout) -> int:
        """How many feature tokens a selection keeps of an image of `layout`, known before any
        score is (a server writes placeholder counts from it): the budget's count here. A
        test checks it against what every method keeps."""
        return keep_count(self.budget, layout.n_features)

    def reads(self) -> frozenset[str]:
        """What selection reads of an image besides its layout (`READS`): "scores", the
        vision-pass signals of `signals()`; "features", its projected vectors (inside the
        tower, `vision_prune_layer=K`: layer K's output through the projector); "question", the
        question of its prompt row. A method that reads none selects from the geometry alone,
        so that a server can know its kept tokens before the vision pass (the vLLM
        integration does); one that reads the question cannot share a selection between two
        requests for the same image. A test checks every method against what it reads."""
        return frozenset({"scores"} if self.signals() else ())

    def files(self) -> dict[str, str]:
        """{option: digest of its content} for the files the options name (a saved router):
        a run's identity covers them, so that a replaced file is a changed run. None here."""
        return {}

    def select(self, image: EncodedImage) -> torch.Tensor | Merged:
        """Sorted (ascending) feature indices to keep, exactly the budget's count; a merging
        method returns them as a `Merged`, with the group each kept token stands for."""
        if type(self).select_batch is Method.select_batch:
            raise NotImplementedError(f"{type(self).__name__} implements neither select nor select_batch")
        chosen = self.select_batch(ImageBatch.of([image]))
        if not isinstance(chosen, Grouping):
            return torch.nonzero(chosen[0]).flatten()
        owner = chosen.owner[0]
        kept = torch.nonzero(chosen.kept[0]).flatten()
        groups = [torch.nonzero(owner == i).flatten() for i in kept.tolist()]
        weights = None if chosen.weights is None else [chosen.weights[0][g] for g in groups]
        return Merged(indices=kept, groups=groups, weights=weights)

    def select_batch(self, batch: ImageBatch) -> torch.Tensor | Grouping:
        """(B, N) bool: the features kept of each image of `batch`, exactly the budget's count;
        a merging method returns a `Grouping`. This default runs `select` image by image."""
        n = batch.layout.n_features
        chosen = [self.select(image) for image in batch.images]
        if not any(isinstance(c, Merged) for c in chosen):
            return torch.stack([feature_mask(c.to(batch.device), n) for c in chosen])
        groupings = [
            c.grouping(n)
            if isinstance(c, Merged)
            else Grouping(torch.where(feature_mask(c.cpu(), n), torch.arange(n), -1))
            for c in chosen
        ]
        weights = None
        if any(g.weights is not None for g in groupings):
            weights = torch.stack([torch.ones(n) if g.weights is None else g.weights for g in groupings])
            weights = weights.to(batch.device)
        return Grouping(torch.stack([g.owner for g in groupings]).to(batch.device), weights)


def check_signals(method: Method, adapter) -> None:
    """Raise if `method` needs a signal that `adapter` cannot supply (`adapter.signal_kinds`)."""
    for layer, kind in method.signals().items():
        if kind not in adapter.signal_kinds:
            name = getattr(method, "name", type(method).__name__)
            raise UsageError(
                f"method {name!r} needs the {kind!r} signal of vision layer {layer}, which tokendrop cannot "
                f"supply for a {adapter.model_class} (it supplies {', '.join(map(repr, adapter.signal_kinds))}): "
                "pick a method that uses only those"
            )


def check_budget_given(method: Method) -> None:
    """Refuse a method without a budget: it would keep every token, a patch that changes nothing."""
    if method.budget is None and method.needs_budget():
        name, cls = getattr(method, "name", "METHOD"), type(method).__name__
        raise UsageError(
            f"method {name!r} needs a budget, the visual tokens to keep per image: a fraction in (0, 1] or a "
            f"token count, e.g. tokendrop.patch(model, {name!r}, budget=0.2) or {cls}(budget=0.2) "
            "(budget=1.0 keeps every token)"
        )


def check_fits(method: Method, adapter) -> Method:
    """`method` resolved against a model and its signals checked, as `patch` does: `adapter`
    is a loaded model's, or the `ModelFacts` of its configuration, so that harnesses check
    options (a layer out of range) before the weights load; a saved router is then checked
    by the model's sizes only."""
    resolved = method.resolve(adapter)
    check_signals(resolved, adapter)
    check_budget_given(resolved)
    return resolved


def check_in_tower(method: Method, layer: int) -> None:
    """Raise ValueError where `method` cannot select inside the vision tower at layer `layer`
    (`vision_prune_layer`), saying why. What every other method reads there: the scores of
    layers 0 to `layer` and, as features, that layer's output through the projector (its
    tokens compared with each other, by diversity methods)."""
    name = getattr(method, "name", type(method).__name__)
    if "question" in method.reads():
        hint = " (dpp: relevance='cls', 'none' or 'allocator' reads no question)" if name == "dpp" else ""
        raise UsageError(
            f"method {name!r} cannot select inside the vision tower (vision_prune_layer={layer}): it scores the "
            "image's tokens against the question's LLM input embeddings, a comparison that means something only "
            "for the vectors the projector was trained to map into that space, the feature layer's; layer "
            f"{layer}'s output through the projector is not in it. Patch without vision_prune_layer{hint}"
        )
    if method.merges:
        raise UsageError(
            f"method {name!r} cannot select inside the vision tower (vision_prune_layer={layer}): it gives the "
            "LLM means of groups of feature-layer vectors, and inside the tower only the kept tokens reach the "
            "feature layer, so the tokens merged into them have no vector there to average. Patch without "
            "vision_prune_layer"
        )


def build(name: str, processor=None, **options) -> Method:
    """The method `name` with `options`. `processor` (the model's processor) goes to the
    methods that read the prompt and is ignored by the others, so that callers holding one
    can build every method alike."""
    cls = METHODS.get(name)
    fields = [f.name for f in dataclasses.fields(cls) if f.init and f.name != "processor"]
    for key in options:
        if key not in fields:
            raise UsageError(
                f"method {name!r} has no option {key!r}.{did_you_mean(key, fields)} Its options: {', '.join(fields)}"
            )
    if cls.needs_processor():
        options["processor"] = processor
    return cls(**options)


def methods_doc() -> str:
    """The registered methods, one paragraph each, for `patch`'s docstring."""
    lines = [
        textwrap.fill(
            "Methods (help(tokendrop.HiRED), or another method's class, lists its options and what they do; "
            "tokendrop.methods() gives every method's options with their defaults):",
            96,
        )
    ]
    for name, cls in METHODS.items():
        lines.append(textwrap.fill(f"{name!r} (tokendrop.{cls.__name__}): {cls.summary}", 96, subsequent_indent="    "))
    return "\n".join(lines)


def describe() -> dict[str, dict[str, object]]:
    """Every registered method with its options and their defaults; help(tokendrop.HiRED)
    (each method's class) says what each option does."""
    return {name: {f.name: f.default for f in dataclasses.fields(cls) if f.init} for name, cls in METHODS.items()}

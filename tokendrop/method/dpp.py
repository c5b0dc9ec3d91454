"""CDPruner (Zhang et al., NeurIPS 2025): keep the subset that a conditional DPP finds most
probable, so the kept tokens are both relevant to the question and unlike each other.

Kernel L = diag(r) S diag(r):
- S_ij = cos(v_i, v_j) over the *projected* feature tokens (the LLM-side features, after the
  projector), as the released code computes it (`image.features`).
- r is each token's relevance, min-max normalised over the whole image (every partition at
  once, as the released code normalises its batch of partitions; "allocator": per partition):
  r = (x - min x + 1e-6) / (max x - min x). x per `relevance`:
  - "text" (the paper's setting): x_i = mean_j cos(v_i, q_j) over the question's tokens q_j.
    The question is found exactly as `text` finds it (explicit `questions=` or the prompt), so
    it needs `processor=`. Features: the released code compares CLIP-joint-space embeddings
    (the vision tower's penultimate-layer patch features put through the last layer's
    post-LayerNorm and CLIP's visual projection, against CLIPTextModelWithProjection's pooled
    embedding of the instruction, one per 77-token segment); LLaVA-NeXT's Hugging Face
    checkpoints ship neither the projection nor the text encoder, so tokendrop uses the
    projected visual tokens against the LLM's input embeddings of the question's tokens, the
    space `text` scores in.
    Sign: the paper presents relevance as the instruction-visual similarity, high = relevant
    (arXiv 2506.10967, Sec. 3.3, which the authors cite for it in issue #5; issue #22 reads it
    the same way). The released code negates the cosine before normalising
    (Theia-4869/CDPruner, llava/model/llava_arch.py, `relevance = (-relevance).mean(dim=-1)`),
    which ranks the tokens least similar to the instruction highest; users asked why (issues
    #14, #19, #22: "exactly the opposite of the paper's description"), and the authors answer
    that it is a phenomenon they observed only with CLIP as LLaVA uses it (#14, pointing to
    #9): their mixed features (penultimate layer through the last layer's head) anti-align
    with the text embedding. tokendrop keeps the paper's sign, because it does not use that
    space: in the LLM embedding space the positive cosine is what `text` ranks by, and it is
    informative there (on the testbed the positive sign scored higher at every budget but
    the tightest; the README's results give the figures and the command).
  - "cls": x_i = the token's CLS attention (probabilities) at the feature layer; no question.
  - "none": r = 1, a plain DPP over S.
  - "allocator" (the default with allocation="hired" / "globalcom2", and only there): x_i =
    the allocator's own per-token importance, the score that method ranks each partition by
    (GlobalCom2: local + global logits, each L2-normalised; HiRED: CLS attention at its
    select_layer), min-max normalised over each partition separately (the method compares
    scores only within a partition, and GlobalCom2's base and crop scores are on different
    scales). The DPP then starts from the allocator's top token and trades its ranking off
    only against similarity to what is already kept: with one token per partition it keeps
    exactly what the allocator keeps, and with more it adds diversity on top of its choice.
The subset is greedy MAP inference by incremental Cholesky (Chen, Zhang & Zhou, NeurIPS 2018):
O(N k^2) after one O(N D) kernel row per step, never a determinant. Each step adds the token
with the largest conditional gain d_i^2 = L_ii - ||c_i||^2 (ties: the lower index). When every
remaining gain is below 1e-6 of the largest initial one (the kept tokens already span the rest,
as happens once k exceeds the features' rank), the rest are taken by relevance r (ties: the
lower index), so budgets stay exact.

Defaults: allocation="globalcom2" with relevance="allocator", the best setting measured on
the testbed (docs/results.md: 99.3 / 98.4 / 91.7 / 70.6 at 25 / 10 / 5 / 2%, against the
paper's setting's 99.2 / 97.4 / 80.8 / 39.5); it reads no question, so it needs no processor.
The paper's setting, one DPP over the image with the question as relevance, is
allocation="global" (relevance="text" then follows, and needs processor=).

`allocation` splits the budget over the AnyRes partitions: "global" runs one DPP over all of
the image's tokens; "partition" gives each partition a share proportional to its size (the
released code's fixed per-crop budget, with an exact total); "hired" / "globalcom2" take the
per-partition counts those methods compute with their default options, then run a DPP inside
each partition, by default with the allocator's importance as r (relevance="allocator").
Why that default: with the allocator's counts but another r (say "text"), a partition given
one token keeps the token of highest r, not the one the allocator ranks first, and a larger
share spends itself on diverse but unimportant tokens; on the testbed that lost to GlobalCom2
alone at every budget. An explicit relevance= still applies as written with every allocation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import lru_cache

import torch
import torch.nn.functional as F

from ..checks import UsageError, check_choice
from ..layout import ImageBatch, ImageLayout
from ..selection import keep_count, on_host, proportional_counts
from .base import Method, ProcessorNeeded, option, register
from .globalcom2 import GlobalCom2
from .hired import HiRED
from .text import Text

RELEVANCES = ("text", "cls", "none", "allocator")
ALLOCATIONS = ("global", "partition", "hired", "globalcom2")
ALLOCATORS = {"hired": HiRED, "globalcom2": GlobalCom2}


@register(
    "dpp",
    "CDPruner (NeurIPS 2025): a conditional DPP keeps tokens relevant to the question and unlike each other",
)
@dataclass
class DPP(Method):
    relevance: str | None = option(
        None,
        "each token's relevance r: 'text' (the question), 'cls' (CLS attention), 'none', or 'allocator' (the "
        "allocator's own per-token importance); None: 'allocator' with allocation 'hired' or 'globalcom2', "
        "else 'text'",
    )
    allocation: str = option(
        "globalcom2",
        "the budget split over partitions: 'global' (one DPP; the paper's setting, with relevance='text'), "
        "'partition' (by size), 'hired' or 'globalcom2' (those methods' counts; globalcom2, the default, "
        "measured best on the testbeds)",
    )
    processor: object = option(None, "the model's processor (or tokenizer); needed by relevance='text'", repr=False)
    # filled at patch time
    question: Text | None = field(init=False, repr=False, default=None)
    allocator: Method | None = field(init=False, repr=False, default=None)
    feature_layer: int = field(init=False, repr=False, default=-2)

    def __post_init__(self):
        super().__post_init__()
        check_choice("allocation", self.allocation, ALLOCATIONS)
        if self.relevance is None:
            self.relevance = "allocator" if self.allocation in ALLOCATORS else "text"
        check_choice("relevance", self.relevance, RELEVANCES)
        if self.relevance == "allocator" and self.allocation not in ALLOCATORS:
            raise UsageError(
                f"dpp: relevance='allocator' needs allocation='hired' or 'globalcom2' (the method whose "
                f"token importance it uses), got allocation={self.allocation!r}"
            )
        if self.relevance == "text":
            if self.processor is None:
                raise ProcessorNeeded(
                    "dpp with relevance='text' needs processor= (the model's processor or tokenizer) to find "
                    "and embed the question; relevance='cls', 'none' or 'allocator' needs none"
                )
            self.question = Text(processor=self.processor)  # the question rule, and its checks

    def resolve(self, adapter) -> DPP:
        resolved = replace(self)
        resolved.feature_layer = adapter.feature_layer
        if resolved.question is not None:
            resolved.question = resolved.question.resolve(adapter)
        if self.allocation in ALLOCATORS:
            resolved.allocator = ALLOCATORS[self.allocation](budget=self.budget).resolve(adapter)
        return resolved

    def signals(self) -> dict[int, str]:
        wanted = dict(self.allocator.signals()) if self.allocator is not None else {}
        if self.relevance == "cls":
            if wanted.get(self.feature_layer, "probs") != "probs":
                raise UsageError(
                    f"dpp: relevance='cls' and allocation={self.allocation!r} need layer "
                    f"{self.feature_layer} as both probabilities and logits"
                )
            wanted[self.feature_layer] = "probs"
        return wanted

    def reads(self) -> frozenset[str]:
        return super().reads() | {"features"} | ({"question"} if self.relevance == "text" else set())

    @torch.no_grad()  # a discrete choice: no graph, even when called in a training forward
    def select_batch(self, batch: ImageBatch) -> torch.Tensor:
        if len(batch) > 1 and on_host(batch.layout.packed_source):
            # image by image: the greedy runs set by set here anyway, and a batch's (B, N, D)
            # copies outgrow the blocks the C allocator reuses (each would cost fresh pages)
            return torch.cat([self.select_batch(ImageBatch([image], batch.layout)) for image in batch.images])
        layout = batch.layout
        features = F.normalize(batch.features.float(), dim=-1)
        relevance = self.relevance_scores(batch, features)
        k = keep_count(self.budget, layout.n_features)
        kept = torch.zeros(relevance.shape, dtype=torch.long, device=features.device)
        if self.allocation == "global":
            return kept.scatter_(-1, greedy_map(features, relevance, k, unit=True), 1).bool()
        # one greedy per (image, partition), all at once: partitions padded to the largest
        if self.allocator is None:
            counts = proportional_counts(k, layout).expand(len(batch), -1)
            steps = largest_share(layout.host, k)
        else:
            counts = self.allocator.counts(batch)
            steps = min(k, max(layout.sizes))
        members = layout.partition_members  # (P, M), -1 padded
        valid = (members >= 0).expand(len(batch), -1, -1)
        at = members.clamp(min=0)
        chosen = greedy_map(features[:, at], relevance[:, at], steps, counts=counts, valid=valid, unit=True)
        taken = torch.arange(chosen.shape[-1], device=features.device) < counts[..., None]
        picks = at.expand(len(batch), -1, -1).gather(-1, chosen)  # feature indices
        return kept.scatter_add_(-1, picks.flatten(1), taken.flatten(1).long()) > 0

    def relevance_scores(self, batch: ImageBatch, features: torch.Tensor) -> torch.Tensor:
        """(B, N) r in (0, 1] on the features' device, fp32; non-finite where x is (the greedy
        takes those tokens last), the bounds taken over the finite values."""
        layout = batch.layout
        if self.relevance == "none":
            return torch.ones(features.shape[:-1], device=features.device)
        if self.relevance == "allocator":  # min-max inside each partition
            x = self.allocator.scores(batch).to(features.device).float()
            part = layout.partition.expand_as(x)
            bounds = torch.zeros(len(batch), layout.n_partitions, device=x.device)
            for_min, for_max = finite_only(x)
            low = bounds.scatter_reduce(-1, part, for_min, "amin", include_self=False).gather(-1, part)
            high = bounds.scatter_reduce(-1, part, for_max, "amax", include_self=False).gather(-1, part)
            return min_max(x, low, high)
        if self.relevance == "cls":
            x = layout.per_feature(batch.cls_scores(self.feature_layer)).to(features.device).float()
        else:
            questions = self.question.questions(batch.images)
            x = torch.stack([question_relevance(f, question) for f, question in zip(features, questions)])
        for_min, for_max = finite_only(x)
        return min_max(x, for_min.min(-1, keepdim=True).values, for_max.max(-1, keepdim=True).values)


def finite_only(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` for a minimum and for a maximum, its non-finite values made +inf and -inf: they
    take part in neither bound."""
    finite = x.isfinite()
    return x.masked_fill(~finite, float("inf")), x.masked_fill(~finite, float("-inf"))


@lru_cache(maxsize=64)
def largest_share(layout: ImageLayout, k: int) -> int:
    """The largest partition share of `proportional_counts`, worked out once on the host."""
    return max(proportional_counts(k, layout).tolist())


def question_relevance(features: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
    """(N,) mean cosine of each unit feature (N, D) to the question's (T, D) input embeddings
    (the paper's sign)."""
    question = F.normalize(question.float().to(features.device), dim=-1)
    return (features @ question.T).mean(-1)


def min_max(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(x - min + eps) / (max - min), as CDPruner normalises relevance; a constant x gives 1."""
    return (x - low + eps) / (high - low).clamp(min=eps)


def greedy_map(
    features: torch.Tensor,
    quality: torch.Tensor,
    k: int,
    counts: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    unit: bool = False,
    tol: float = 1e-6,
) -> torch.Tensor:
    """Greedy MAP of the DPP with kernel L_ij = q_i q_j <f_i, f_j> (Chen, Zhang & Zhou 2018),
    for a batch of independent item sets at once, with no host sync: k steps for all, each set
    stops adding at its own count, and a set whose gains are exhausted is masked out of the
    updates and filled by quality after the loop.

    features: (..., n, D) rows; quality: (..., n); k <= n steps; counts: (...) items to choose
    per set (default k); valid: (..., n) bool, False for padding (never chosen); `unit`: the
    rows have unit length (cosine similarity), so L_ii = q_i^2 exactly and equal qualities tie
    exactly (broken by index). An item whose features or quality are not finite takes no part
    in the greedy: it comes after every finite item, in index order, so counts stay exact.
    Returns (..., k) long indices in the order chosen, on the features' device; slots past a
    set's count are meaningless.
    """
    *lead, n, _ = features.shape
    k = min(int(k), n)
    device = features.device
    quality = quality.float()
    valid = torch.ones(quality.shape, dtype=torch.bool, device=device) if valid is None else valid
    finite = features.isfinite().all(-1) & quality.isfinite()
    # zeroed, so that no product carries their NaN into the finite items' gains
    features = torch.where(finite[..., None], features, 0.0)
    quality = torch.where(finite, quality, 0.0)
    if on_host(features):  # see `greedy_map_set_by_set`
        return greedy_map_set_by_set(features, quality, k, counts, valid, finite, unit, tol)
    chosen = torch.zeros(*lead, k, dtype=torch.long, device=device)
    if k == 0:
        return chosen
    counts = torch.full(lead, k, device=device) if counts is None else counts
    factors = features.new_zeros(*lead, k, n)  # c: row i is the i-th column of the Cholesky factor
    norms = torch.ones_like(quality) if unit else (features * features).sum(-1)
    gains = torch.where(valid & finite, quality * quality * norms, float("-inf"))  # d_i^2, starting at L_ii
    floor = tol * gains.max(-1).values
    greedy = torch.ones(lead, dtype=torch.bool, device=device)  # still adding by gain
    n_greedy = torch.zeros(lead, dtype=torch.long, device=device)
    for i in range(k):
        best, j = gains.max(-1)
        # past its count, or every gain at most the floor (the kept items span the rest): stop
        greedy &= (best > floor) & (i < counts)
        chosen[..., i] = j
        n_greedy += greedy
        f_j = features.gather(-2, j[..., None, None].expand(*lead, 1, features.shape[-1]))  # (..., 1, D)
        # L_j,: (a row vector times the features: on CPU 3x faster than features times a column)
        row = quality.gather(-1, j[..., None]) * quality * (f_j @ features.mT)[..., 0, :]
        c_j = factors[..., :i, :].gather(-1, j[..., None, None].expand(*lead, i, 1))  # (..., i, 1)
        e = (row - (c_j.mT @ factors[..., :i, :])[..., 0, :]) / best.sqrt()[..., None]
        e = torch.where(greedy[..., None], e, 0.0)
        factors[..., i, :] = e
        gains = gains - e * e
        gains = gains.scatter(-1, j[..., None], torch.where(greedy, float("-inf"), best)[..., None])
    # the rest by quality (ties: lower index), among the items neither chosen nor padding, the
    # non-finite ones last
    slot = torch.arange(k, device=device)
    picked = torch.zeros(quality.shape, dtype=torch.long, device=device)
    picked.scatter_add_(-1, chosen, (slot < n_greedy[..., None]).long())
    key = torch.where(finite, -quality, torch.finfo(quality.dtype).max)
    key = torch.where((picked > 0) | ~valid, float("inf"), key)
    order = torch.sort(key, dim=-1, stable=True).indices
    fill = order.gather(-1, (slot - n_greedy[..., None]).clamp(0, n - 1))
    return torch.where(slot < n_greedy[..., None], chosen, fill)


def greedy_map_set_by_set(features, quality, k, counts, valid, finite, unit, tol) -> torch.Tensor:
    """`greedy_map` of each set on its own (`greedy_one_set` over its finite items, then its
    non-finite ones in index order), each only as many steps as its count: on a CPU there
    are no kernel launches to save and reading a value back waits for nothing, and a batch of
    row-times-matrix products runs several times slower than the same products one set at a
    time."""
    *lead, n, dim = features.shape
    n_sets = math.prod(lead)
    chosen = torch.zeros(n_sets, k, dtype=torch.long)
    counts = [k] * n_sets if counts is None else counts.flatten().tolist()
    usable, last = (valid & finite).reshape(n_sets, n), (valid & ~finite).reshape(n_sets, n)
    sets = zip(features.reshape(n_sets, n, dim), quality.reshape(n_sets, n), counts)
    for i, (row, (items, qualities, count)) in enumerate(zip(chosen, sets)):
        at = torch.nonzero(usable[i]).flatten()  # padding is never chosen
        picked = at[greedy_one_set(items[at], qualities[at], count, unit, tol)]
        row[:count] = torch.cat([picked, torch.nonzero(last[i]).flatten()])[:count]
    return chosen.view(*lead, k)


def greedy_one_set(features, quality, count: int, unit: bool, tol: float) -> torch.Tensor:
    """(count,) `greedy_map` of one set, as a plain loop that stops where the gains run out
    and fills the rest by quality (ties: lower index). Its products are written as
    `greedy_map`'s, so that both make the same choices."""
    n = features.shape[0]
    count = min(count, n)
    chosen = torch.zeros(count, dtype=torch.long)
    if count == 0:  # an empty partition (of a very thin image), or one given no tokens
        return chosen
    factors = features.new_zeros(count, n)
    norms = torch.ones_like(quality) if unit else (features * features).sum(-1)
    gains = quality * quality * norms
    floor = tol * gains.max()
    n_greedy = 0
    while n_greedy < count:
        best, j = gains.max(-1)
        if not best > floor:  # the kept items span the rest
            break
        i, n_greedy = n_greedy, n_greedy + 1
        chosen[i] = j
        row = quality[j] * quality * (features[j][None] @ features.mT)[0]
        c_j = factors[:i].gather(-1, j.expand(i, 1))
        e = (row - (c_j.mT @ factors[:i])[0]) / best.sqrt()
        factors[i] = e
        gains = gains - e * e
        gains[j] = float("-inf")
    taken = torch.zeros(n, dtype=torch.bool).index_fill_(0, chosen[:n_greedy], True)
    rest = torch.sort(torch.where(taken, float("inf"), -quality), stable=True).indices
    chosen[n_greedy:] = rest[: count - n_greedy]
    return chosen

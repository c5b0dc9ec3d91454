"""VisionZip (Yang et al., CVPR 2025, arXiv 2412.04467): a few *dominant* tokens carry most
of the vision encoder's attention; the rest are redundant enough to be merged into a few
*contextual* tokens.

Per partition (the paper runs on each 336 px view; here the budget's exact count is split
over partitions in proportion to their sizes, as `uniform`), with c the partition's share:
- contextual count m = floor(`contextual` * c), dominant count d = c - m (paper: 54 + 10 of
  64, 108 + 20 of 128: `contextual=0.15625`);
- dominant: the partition's d tokens of highest CLS attention at `select_layer` (softmax
  probabilities summed over heads, CLS->CLS excluded; default the model's feature layer, as
  the paper);
- contextual: the remaining r tokens in raster order; targets are every floor(r / m)-th of
  them, starting at the first (the first m such); every other remaining token joins the
  target of highest cosine similarity (ties: the earlier target); each contextual token is the
  plain mean of its target and the tokens that joined it.
Similarity: the paper compares the feature layer's attention *keys*; tokendrop compares the
projected features the LLM would see (`image.features`), so that methods need no extra hook,
and it averages those projected vectors, where the paper averages encoder hidden states
before the projector. A dominant token is its own group; a contextual token stands at its
group's first (smallest) feature index.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..checks import check_layer, check_real
from ..layout import EncodedImage
from ..selection import floor_fraction, keep_count, proportional_counts
from .base import Merged, Method, option, register


@register(
    "visionzip",
    "VisionZip (CVPR 2025): dominant tokens by CLS attention plus contextual tokens merged from the rest",
)
@dataclass
class VisionZip(Method):
    merges = True

    contextual: float = option(
        0.15625, "the share of each partition's kept tokens made by merging the rest (the paper's 10 of 64)"
    )
    select_layer: int | None = option(
        None, "the vision layer whose CLS attention picks the dominant tokens; None: the model's feature layer"
    )

    def __post_init__(self):
        super().__post_init__()
        self.contextual = check_real("contextual", self.contextual, 0.0, 1.0)

    def resolve(self, adapter) -> VisionZip:
        select = adapter.feature_layer if self.select_layer is None else self.select_layer
        return replace(self, select_layer=check_layer("select_layer", select, adapter.n_vision_layers))

    def signals(self) -> dict[int, str]:
        return {self.select_layer: "probs"}

    def reads(self) -> frozenset[str]:
        return frozenset({"scores", "features"})  # contextual tokens merge by similarity

    def select(self, image: EncodedImage) -> Merged:
        layout = image.layout
        counts = proportional_counts(keep_count(self.budget, layout.n_features), layout)
        scores = layout.per_feature(image.cls_scores(self.select_layer))
        features = image.features
        groups = []
        for p, count in enumerate(counts.tolist()):
            if count == 0:
                continue
            members = torch.nonzero(layout.partition == p).flatten()
            n_context = floor_fraction(self.contextual, count)
            order = torch.sort(-scores[members].float(), stable=True).indices  # ties: lower index
            dominant = members[order[: count - n_context]]
            groups += [i.view(1) for i in dominant]
            if n_context:
                rest = members[torch.sort(order[count - n_context :]).values]
                groups += contextual_groups(features, rest, n_context)
        groups.sort(key=lambda g: int(g[0]))
        return Merged(indices=torch.stack([g[0] for g in groups]), groups=groups)


def contextual_groups(features: torch.Tensor, rest: torch.Tensor, m: int) -> list[torch.Tensor]:
    """`rest` (r,) ascending feature indices -> m groups (ascending indices): the evenly spaced
    targets, each with the other tokens whose cosine similarity to it is highest."""
    step = max(1, rest.numel() // m)
    is_target = torch.zeros(rest.numel(), dtype=torch.bool)
    is_target[torch.arange(0, rest.numel(), step)[:m]] = True
    unit = F.normalize(features[rest.to(features.device)].float(), dim=-1)
    similarity = unit[~is_target.to(unit.device)] @ unit[is_target.to(unit.device)].T  # (r - m, m)
    owner = torch.empty(rest.numel(), dtype=torch.long)
    owner[is_target] = torch.arange(m)
    owner[~is_target] = similarity.argmax(-1).cpu() if similarity.numel() else torch.zeros(0, dtype=torch.long)
    return [rest[owner == t] for t in range(m)]

"""The learned router: the `text` method's question-aware selection with a trained score.

Each feature token scores
    s_i = sum_j cos(v_i, x_j)  +  (v^_i A) . (sum_j x^_j B)  +  v^_i . u
where v_i are the projected visual tokens, x_j the LLM input embeddings of the question's
tokens (found as `text` finds them), ^ means unit length, A and B are (D, rank) projections
and u a (D,) direction. The first term is `text`'s score. B and u start at zero, so an
untrained router (`router=None`) selects exactly what `text` selects; A starts random so that
B receives gradients. Everything runs in fp32 on the device of the projected features,
whatever the model's dtype or quantisation. `tokendrop.train_router` fits A, B and u with the
model frozen (see `tokendrop.training`).

A trained router is a folder of two files, the PEFT way: `router.safetensors` (A, B, u) and
`router.json` (format, tokendrop version, rank, how it was trained, and a fingerprint of the
base model that loading checks). No pickle is ever read.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..checks import check_int
from .base import register
from .text import Text

FORMAT = "tokendrop-router"
WEIGHTS_FILE, CONFIG_FILE = "router.safetensors", "router.json"
DEFAULT_RANK = 8
FINGERPRINT_ROWS, FINGERPRINT_DIMS = 4, 8
SHIPPED = {"testbed": Path(__file__).parents[1] / "testbed" / "router"}  # routers installed with tokendrop


class RouterWeights(nn.Module):
    """The learned term's parameters, fp32; `forward` gives the router's whole score."""

    def __init__(self, hidden_size: int, rank: int, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.visual = nn.Parameter(torch.randn(hidden_size, rank, generator=generator))  # A
        self.question = nn.Parameter(torch.zeros(hidden_size, rank))  # B
        self.salience = nn.Parameter(torch.zeros(hidden_size))  # u

    @property
    def rank(self) -> int:
        return self.visual.shape[1]

    def forward(self, visual: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
        """(N, D) visual tokens, (T, D) question embeddings, any dtype -> (N,) fp32 scores."""
        v = F.normalize(visual.float(), dim=-1)
        x = F.normalize(question.float(), dim=-1)
        cosine = (v @ x.T).sum(-1)  # `text`'s score, computed as cosine_scores computes it
        return cosine + (v @ self.visual) @ (x.sum(0) @ self.question) + v @ self.salience


def fingerprint(model) -> dict:
    """What identifies the base model a router belongs to: sizes, and a few input-embedding
    values (compared with a tolerance, so fp16/bf16/4-bit loads of one checkpoint match)."""
    embedding = model.get_input_embeddings().weight
    rows = torch.linspace(0, embedding.shape[0] - 1, FINGERPRINT_ROWS).round().long()
    sample = embedding[rows.to(embedding.device), :FINGERPRINT_DIMS].detach().float().cpu()
    config = model.config
    return dict(
        model_type=config.model_type,
        text_hidden_size=config.get_text_config().hidden_size,
        vision_hidden_size=config.vision_config.hidden_size,
        vocab_size=embedding.shape[0],
        embedding_rows=rows.tolist(),
        embedding_sample=[[round(v, 6) for v in row] for row in sample.tolist()],
    )


def sizes_mismatch(saved: dict, config) -> str | None:
    """Why a router saved for `saved` does not fit a model of `config`, from the sizes alone
    (where the model's weights are not at hand to compare: a vLLM server's)."""
    current = dict(
        model_type=config.model_type,
        text_hidden_size=config.get_text_config().hidden_size,
        vision_hidden_size=config.vision_config.hidden_size,
    )
    for key, value in current.items():
        if saved.get(key) != value:
            return f"{key} is {saved.get(key)!r} in the router, {value!r} in this model"
    return None


def fingerprint_mismatch(saved: dict, model) -> str | None:
    """Why a router saved for `saved` does not fit `model`, or None when it fits."""
    current = fingerprint(model)
    for key in ("model_type", "text_hidden_size", "vision_hidden_size", "vocab_size"):
        if saved.get(key) != current[key]:
            return f"{key} is {saved.get(key)!r} in the router, {current[key]!r} in this model"
    expected, found = torch.tensor(saved["embedding_sample"]), torch.tensor(current["embedding_sample"])
    if expected.shape != found.shape or not torch.allclose(expected, found, rtol=1e-2, atol=1e-3):
        return "the input-embedding rows differ (same sizes, other weights: another checkpoint)"
    return None


def save_router(weights: RouterWeights, folder: str | Path, model, training: dict) -> Path:
    """Write router.safetensors and router.json into `folder`; returns the folder."""
    from .. import __version__

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().float().cpu().contiguous() for name, p in weights.named_parameters()}
    save_file(tensors, folder / WEIGHTS_FILE, metadata={"format": FORMAT})
    config = dict(
        format=FORMAT,
        tokendrop_version=__version__,
        rank=weights.rank,
        hidden_size=weights.visual.shape[0],
        training=training,
        base_model=fingerprint(model),
    )
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def read_router(folder: str | Path) -> tuple[dict, RouterWeights]:
    """(router.json's content, the weights) from a saved router folder, checked for shape
    and completeness; errors name the file and what is wrong."""
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"router: {path} is missing; a router folder holds {CONFIG_FILE} and "
                f"{WEIGHTS_FILE} (written by tokendrop train-router)"
            )
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"router: {config_path} is not valid JSON ({error}); the file is damaged") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"router: {config_path} is not a tokendrop router config (format {FORMAT!r} expected)")
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(
            f"router: {weights_path} cannot be read ({error}); the file is damaged or "
            "truncated: copy it again or retrain"
        ) from None
    rank, hidden = config.get("rank"), config.get("hidden_size")
    expected = {"visual": (hidden, rank), "question": (hidden, rank), "salience": (hidden,)}
    found = {name: tuple(t.shape) for name, t in tensors.items()}
    if found != expected:
        raise ValueError(
            f"router: {weights_path} holds tensors {found}, but {config_path} (rank {rank}, hidden "
            f"size {hidden}) needs {expected}: the two files do not belong together"
        )
    weights = RouterWeights(hidden, rank)
    weights.load_state_dict(tensors)
    return config, weights


@register("router")
@dataclass
class Router(Text):
    """`text` with a learned score. `router`: a folder written by `tokendrop train-router`,
    or the name of one shipped with tokendrop ("testbed"); None: untrained, selects exactly
    as `text`. `rank`: of an untrained router (a saved one brings its own; giving another is
    an error)."""

    scope: str = "all"  # trained and swept on the same axis as every other method
    router: str | None = None
    rank: int | None = None
    weights: RouterWeights | None = field(init=False, repr=False, default=None)
    saved: dict | None = field(init=False, repr=False, default=None)

    def __post_init__(self):
        super().__post_init__()
        if self.rank is not None and check_int("rank", self.rank) < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.router is not None:
            if not isinstance(self.router, (str, Path)):
                raise TypeError(f"router must be the path of a saved router folder, got {self.router!r}")
            self.router = str(self.router)
            self.saved, self.weights = read_router(SHIPPED.get(self.router, self.router))
            if self.rank is not None and self.rank != self.weights.rank:
                raise ValueError(
                    f"rank={self.rank} was given, but the router in {self.router} has rank "
                    f"{self.weights.rank}: leave rank out to use the saved one"
                )

    def resolve(self, adapter) -> Router:
        resolved = copy.copy(super().resolve(adapter))  # shares the loaded weights, never reads them again
        hidden = adapter.config.get_text_config().hidden_size
        if resolved.weights is None:
            resolved.weights = RouterWeights(hidden, self.rank or DEFAULT_RANK)
        elif self.saved is not None:
            if adapter.model is None:  # a server's model (vLLM): its sizes, from its config
                mismatch = sizes_mismatch(self.saved["base_model"], adapter.config)
            else:
                mismatch = fingerprint_mismatch(self.saved["base_model"], adapter.model)
            if mismatch:
                raise ValueError(
                    f"router {self.router} was trained on another model: {mismatch}. Train one for "
                    "this model with tokendrop train-router"
                )
        resolved.weights.requires_grad_(False)
        return resolved

    def scores(self, visual: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
        if self.weights.visual.device != visual.device:  # fp32 on the features' device, moved once
            self.weights.to(visual.device)
        return self.weights(visual, question.to(visual.device))

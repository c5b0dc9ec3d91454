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
`router.json` (format, tokendrop version, rank, how it was trained, the weights file's
SHA-256, and a fingerprint of the base model, its language and its vision side, that loading
checks). No pickle is ever read; weights that are not finite are never written or loaded.

A shipped router is named `tokendrop:NAME` (`tokendrop:testbed`); a plain `NAME` means it too
unless a folder of that name exists, where the name is refused as ambiguous (`./NAME` is the
folder).
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load, save_file
from torch import nn

from ..checks import MissingInputError, UsageError, UsageTypeError, check_int
from .base import option, register
from .text import Text

FORMAT = "tokendrop-router"
WEIGHTS_FILE, CONFIG_FILE = "router.safetensors", "router.json"
DEFAULT_RANK = 8
FINGERPRINT_ROWS, FINGERPRINT_DIMS = 4, 8
FINGERPRINT_VISION_TENSORS = 16
SHIPPED = {"testbed": Path(__file__).parents[1] / "testbed" / "router"}  # routers installed with tokendrop
SHIPPED_PREFIX = "tokendrop:"  # `tokendrop:testbed`: a shipped router, never a folder
# what router.json must hold to be checked at all
REQUIRED = ("rank", "hidden_size", "weights_sha256", "base_model")
BASE_MODEL_KEYS = (
    "model_type",
    "text_hidden_size",
    "vision_hidden_size",
    "vocab_size",
    "embedding_sample",
    "vision_sample",
)


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


def fingerprint(adapter) -> dict:
    """What identifies the base model a router belongs to: sizes, a few input-embedding values
    and a few values of its vision side (`vision_sample`), compared with a tolerance so that
    fp16/bf16/4-bit loads of one checkpoint match. `adapter`: the model's (`adapter_for`)."""
    model = adapter.model
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
        embedding_sample=rounded(sample),
        vision_sample=vision_sample(adapter),
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


def vision_sample(adapter) -> list[list[float]]:
    """A few values of every part of the model outside its language model (vision tower,
    projector): FINGERPRINT_DIMS values each of up to FINGERPRINT_VISION_TENSORS parameters
    spread over them. Only parameters that quantisation leaves in floating point: not the
    weights of Linear layers, which bitsandbytes replaces, so every load of one checkpoint
    samples the same tensors."""
    language = {id(p) for p in adapter.language_model.parameters()}
    tensors = [
        parameter
        for module in adapter.model.modules()
        for name, parameter in module.named_parameters(recurse=False)
        if id(parameter) not in language and not (isinstance(module, nn.Linear) and name == "weight")
    ]
    if not tensors:
        return []
    picked = torch.linspace(0, len(tensors) - 1, min(FINGERPRINT_VISION_TENSORS, len(tensors))).round().long()
    sample = []
    for i in picked.tolist():
        flat = tensors[i].detach().reshape(-1)
        at = torch.linspace(0, flat.numel() - 1, FINGERPRINT_DIMS).round().long().to(flat.device)
        sample.append(flat[at].float().cpu())
    return rounded(torch.stack(sample))


def rounded(values: torch.Tensor) -> list[list[float]]:
    return [[round(v, 6) for v in row] for row in values.tolist()]


def fingerprint_mismatch(saved: dict, adapter) -> str | None:
    """Why a router saved for `saved` does not fit the model of `adapter`, or None when it fits."""
    current = fingerprint(adapter)
    for key in ("model_type", "text_hidden_size", "vision_hidden_size", "vocab_size"):
        if saved.get(key) != current[key]:
            return f"{key} is {saved.get(key)!r} in the router, {current[key]!r} in this model"
    if not close(saved["embedding_sample"], current["embedding_sample"]):
        return "the input-embedding rows differ (same sizes, other weights: another checkpoint)"
    if not close(saved["vision_sample"], current["vision_sample"]):
        return "the vision tower or projector differs (same sizes and embeddings, other vision weights)"
    return None


def close(expected: list, found: list) -> bool:
    expected, found = torch.tensor(expected), torch.tensor(found)
    return expected.shape == found.shape and torch.allclose(expected, found, rtol=1e-2, atol=1e-3)


def save_router(weights: RouterWeights, folder: str | Path, base_model: dict, training: dict) -> Path:
    """Write router.safetensors and router.json into `folder`; returns the folder. `base_model`:
    the model's `fingerprint`. Weights that are not finite are refused, and nothing is written."""
    from .. import __version__

    tensors = {name: p.detach().float().cpu().contiguous() for name, p in weights.named_parameters()}
    if not all(bool(t.isfinite().all()) for t in tensors.values()):
        raise UsageError(
            "router: the weights are not finite (NaN or inf: training diverged), so nothing was written; "
            "train again with a lower learning rate"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / WEIGHTS_FILE, metadata={"format": FORMAT})
    config = dict(
        format=FORMAT,
        tokendrop_version=__version__,
        rank=weights.rank,
        hidden_size=weights.visual.shape[0],
        weights_sha256=hashlib.sha256((folder / WEIGHTS_FILE).read_bytes()).hexdigest(),
        training=training,
        base_model=base_model,
    )
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def read_router(folder: str | Path) -> tuple[dict, RouterWeights]:
    """(router.json's content, the weights) from a saved router folder, checked for
    completeness, checksum, shape and finiteness; errors name the file and what is wrong."""
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise MissingInputError(
                f"router: {path} is missing; a router folder holds {CONFIG_FILE} and "
                f"{WEIGHTS_FILE} (written by tokendrop train-router)"
            )
    config = read_config(config_path)
    data = weights_path.read_bytes()
    try:
        tensors = load(data)
    except (SafetensorError, OSError, ValueError) as error:
        raise UsageError(
            f"router: {weights_path} cannot be read ({error}); the file is damaged or "
            "truncated: copy it again or retrain"
        ) from None
    if hashlib.sha256(data).hexdigest() != config["weights_sha256"]:  # damage that still parses
        raise UsageError(
            f"router: {weights_path} does not match the checksum in {config_path}: the file is damaged "
            "(or was replaced): copy the router folder again or retrain"
        )
    rank, hidden = config.get("rank"), config.get("hidden_size")
    expected = {"visual": (hidden, rank), "question": (hidden, rank), "salience": (hidden,)}
    found = {name: tuple(t.shape) for name, t in tensors.items()}
    if found != expected:
        raise UsageError(
            f"router: {weights_path} holds tensors {found}, but {config_path} (rank {rank}, hidden "
            f"size {hidden}) needs {expected}: the two files do not belong together"
        )
    if not all(bool(t.isfinite().all()) for t in tensors.values()):
        raise UsageError(
            f"router: {weights_path} holds weights that are not finite (NaN or inf): it would keep "
            "arbitrary tokens; retrain it with a lower learning rate"
        )
    weights = RouterWeights(hidden, rank)
    weights.load_state_dict(tensors)
    return config, weights


def read_config(path: Path) -> dict:
    """router.json, with every field loading checks."""
    from .. import __version__

    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f"router: {path} is not valid JSON ({error}); the file is damaged") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise UsageError(f"router: {path} is not a tokendrop router config (format {FORMAT!r} expected)")
    base_model = config.get("base_model")
    missing = [key for key in REQUIRED if key not in config]
    if isinstance(base_model, dict):
        missing += [f"base_model.{key}" for key in BASE_MODEL_KEYS if key not in base_model]
    elif "base_model" not in missing:
        missing.append("base_model")
    if missing:
        raise UsageError(
            f"router: {path} lacks {', '.join(missing)}, which loading checks: the file is damaged, or "
            f"was written before tokendrop {__version__} checked them; retrain the router with tokendrop "
            "train-router"
        )
    return config


def router_folder(name: str) -> Path:
    """The folder a `router=` value names: `tokendrop:NAME` a shipped router, a path a folder,
    and a shipped router's plain NAME that router unless a folder of that name exists, where
    it is refused as ambiguous."""
    if name.startswith(SHIPPED_PREFIX):
        shipped = name.removeprefix(SHIPPED_PREFIX)
        if shipped not in SHIPPED:
            raise UsageError(
                f"router={name!r}: tokendrop ships no router {shipped!r}; it ships "
                f"{', '.join(SHIPPED_PREFIX + n for n in SHIPPED)}"
            )
        return SHIPPED[shipped]
    if name in SHIPPED:
        if Path(name).exists():
            raise UsageError(
                f"router={name!r} names both the router shipped with tokendrop and the folder ./{name}: "
                f"write router='./{name}' for the folder, or router='{SHIPPED_PREFIX}{name}' for the shipped one"
            )
        return SHIPPED[name]
    return Path(name)


@register("router", "the learned router: text's score plus a term trained by tokendrop train-router; needs processor=")
@dataclass
class Router(Text):
    """`text` with a learned score: a router trained by `tokendrop train-router`, one shipped
    with tokendrop (`router_folder`), or untrained (selecting exactly as `text`)."""

    scope: str = option(
        "all",
        "'all': every token scored, as it is trained and swept, on the same axis as every other method; "
        "'crops': the base view kept whole",
    )
    router: str | None = option(
        None, "a folder written by tokendrop train-router, or 'tokendrop:testbed'; None: untrained (as text)"
    )
    rank: int | None = option(None, "the rank of an untrained router (8 by default); a saved router brings its own")
    weights: RouterWeights | None = field(init=False, repr=False, default=None)
    saved: dict | None = field(init=False, repr=False, default=None)

    def __post_init__(self):
        super().__post_init__()
        if self.rank is not None and check_int("rank", self.rank) < 1:
            raise UsageError(f"rank must be >= 1, got {self.rank}")
        if self.router is not None:
            if not isinstance(self.router, (str, Path)):
                raise UsageTypeError(f"router must be the path of a saved router folder, got {self.router!r}")
            self.router = str(self.router)
            self.saved, self.weights = read_router(router_folder(self.router))
            if self.rank is not None and self.rank != self.weights.rank:
                raise UsageError(
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
                mismatch = fingerprint_mismatch(self.saved["base_model"], adapter)
            if mismatch:
                raise UsageError(
                    f"router {self.router} was trained on another model: {mismatch}. Train one for "
                    "this model with tokendrop train-router"
                )
        resolved.weights.requires_grad_(False)
        return resolved

    def files(self) -> dict[str, str]:
        return {} if self.saved is None else {"router": self.saved["weights_sha256"]}

    def scores(self, visual: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
        if self.weights.visual.device != visual.device:  # fp32 on the features' device, moved once
            self.weights.to(visual.device)
        return self.weights(visual, question.to(visual.device))

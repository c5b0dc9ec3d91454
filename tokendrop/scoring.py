"""Per-token scores of chosen vision layers, captured by hooks during the vision pass.

CLIP (LLaVA-NeXT): the CLS query's attention. Forward hooks on `self_attn.q_proj` and
`self_attn.k_proj` give the projections the layer computes anyway; from them only the CLS
query row is scored against all keys, O(L) per head. Unlike `output_attentions=True` this
keeps the fast attention kernel (sdpa/flash) and never materialises the L x L maps. Works
unchanged on bitsandbytes-quantised projections.

SigLIP (LLaVA-OneVision) has no CLS token; the same two signal kinds have CLS-free
equivalents from the literature (see `received_attention` and `dissimilarity_to_mean`).

Threads (and asyncio tasks) may run the same tower at once: every hook sees every forward of
its module, so each capture records only the forwards of the context that opened it.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

# What a method can ask for, per layer (each adapter declares which it supplies):
#   "probs":  CLIP: softmax(q_cls K^T * scale) per head, summed over heads (HiRED);
#             SigLIP: the attention each token receives, averaged over queries and heads
#   "logits": CLIP: q_cls K^T * scale per head before softmax, averaged over heads (GlobalCom2);
#             SigLIP: -cos(token, mean token) of the layer's output (GlobalCom2's CLS-free score)
SIGNAL_KINDS = ("probs", "logits")

_active: ContextVar[dict | None] = ContextVar("tokendrop_cls_capture", default=None)


def cls_scores(q_cls: torch.Tensor, keys: torch.Tensor, num_heads: int, scale: float, kind: str) -> torch.Tensor:
    """q_cls (B, D), keys (B, L, D) -> (B, L - 1) fp32 scores of the non-CLS tokens."""
    batch, length, _ = keys.shape
    q = q_cls.float().view(batch, num_heads, -1)
    k = keys.float().view(batch, length, num_heads, -1)
    logits = torch.einsum("bhd,blhd->bhl", q, k) * scale
    if kind == "probs":
        scores = logits.softmax(-1).sum(1)
    else:
        scores = logits.mean(1)
    return scores[:, 1:]


def received_attention(queries: torch.Tensor, keys: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """queries, keys (B, L, D) -> (B, L) fp32: the attention each token receives, averaged over
    all queries and heads. Each tile's L x L maps are built one tile at a time, so memory stays
    that of one tile's maps (16 x 729 x 729 fp32, 34 MB, for SigLIP-so400m/384)."""
    batch, length, _ = keys.shape
    received = []
    for q, k in zip(queries, keys):
        q = q.float().view(length, num_heads, -1)
        k = k.float().view(length, num_heads, -1)
        probs = (torch.einsum("qhd,khd->hqk", q, k) * scale).softmax(-1)
        received.append(probs.mean((0, 1)))
    return torch.stack(received)


def dissimilarity_to_mean(hidden: torch.Tensor) -> torch.Tensor:
    """hidden (B, L, D) -> (B, L) fp32: -cos(x_i, mean_j x_j) within each tile."""
    hidden = hidden.float()
    return -F.cosine_similarity(hidden, hidden.mean(1, keepdim=True), dim=-1)


@contextmanager
def _capture():
    """(captured, watch): `watch(layer, modules, score, keep)` hooks every module of `modules`
    ({name: module}); once each has produced its output in a forward of this context, `score`
    of {name: keep(name, output)} is appended to `captured[layer]` (one entry per tower call).
    With `inputs=True` a module's positional inputs (a tuple) stand for its output, taken as
    it is called. Hooks are removed on exit."""
    captured: dict[int, list[torch.Tensor]] = {}
    handles = []
    token = _active.set(captured)

    def watch(layer: int, modules: dict[str, nn.Module], score, keep=lambda name, output: output, inputs=False):
        captured[layer] = []
        pending: dict[str, torch.Tensor] = {}
        for name, module in modules.items():

            def hook(module, args, output=None, name=name):
                if _active.get() is not captured:  # a forward of another thread's call
                    return
                if not inputs:
                    args = output[0] if isinstance(output, tuple) else output  # layers return tuples in 4.x
                pending[name] = keep(name, args)  # what it produced, or with `inputs` what it was given
                if len(pending) == len(modules):
                    captured[layer].append(score(pending))
                    pending.clear()

            handles.append(module.register_forward_pre_hook(hook) if inputs else module.register_forward_hook(hook))

    try:
        yield captured, watch
    finally:
        for handle in handles:
            handle.remove()
        _active.reset(token)


@contextmanager
def capture_cls_scores(attention_modules: dict[int, nn.Module], kinds: dict[int, str]):
    """While active, each forward of the CLIP tower in this thread (context) appends, for every
    layer in `kinds`, its (B, L - 1) CLS scores to `captured[layer]` (a list: one entry per
    tower call)."""
    with _capture() as (captured, watch):
        for layer, kind in kinds.items():
            attn = attention_modules[layer]
            watch(
                layer,
                {"q": attn.q_proj, "k": attn.k_proj},
                lambda p, attn=attn, kind=kind: cls_scores(p["q"], p["k"], attn.num_heads, attn.scale, kind),
                # keep only what the score needs: the CLS query row, or all keys
                keep=lambda name, output: output[:, 0] if name == "q" else output,
            )
        yield captured


@contextmanager
def capture_cls_scores_of_inputs(kernels: dict[int, tuple[nn.Module, int, float]], kinds: dict[int, str]):
    """`capture_cls_scores` where a layer's attention kernel is a module called with the query
    and keys, (B, L, num_heads * head_dim) each, as its first two inputs (a server's fused
    attention, as vLLM's): `kernels` {layer: (kernel, num_heads, scale)}; the CLS query row
    against all keys, taken as the kernel is called."""
    with _capture() as (captured, watch):
        for layer, kind in kinds.items():
            kernel, num_heads, scale = kernels[layer]
            watch(
                layer,
                {"qk": kernel},
                lambda p, n=num_heads, s=scale, kind=kind: cls_scores(p["qk"][0][:, 0], p["qk"][1], n, s, kind),
                inputs=True,
            )
        yield captured


@contextmanager
def capture_siglip_scores(encoder_layers: dict[int, nn.Module], kinds: dict[int, str]):
    """The CLS-free equivalents for a SigLIP tower: while active, each tower forward in this
    context appends, for every layer in `kinds`, its (B, L) scores to `captured[layer]`:
    "probs" from the layer's q/k projections (`received_attention`), "logits" from the layer's
    output hidden state (`dissimilarity_to_mean`)."""
    with _capture() as (captured, watch):
        for layer, kind in kinds.items():
            block = encoder_layers[layer]
            if kind == "probs":
                attn = block.self_attn
                watch(
                    layer,
                    {"q": attn.q_proj, "k": attn.k_proj},
                    lambda p, attn=attn: received_attention(p["q"], p["k"], attn.num_heads, attn.scale),
                )
            else:
                watch(layer, {"hidden": block}, lambda p: dissimilarity_to_mean(p["hidden"]))
        yield captured

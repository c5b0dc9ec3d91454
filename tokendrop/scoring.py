"""Per-token scores of chosen vision layers, captured by hooks during the vision pass.

CLIP (LLaVA-NeXT): the CLS query's attention. Forward hooks on `self_attn.q_proj` and
`self_attn.k_proj` give the projections the layer computes anyway; from them only the CLS
query row is scored against all keys, O(L) per head. Unlike `output_attentions=True` this
keeps the fast attention kernel (sdpa/flash) and never materialises the L x L maps. Works
unchanged on bitsandbytes-quantised projections.

SigLIP (LLaVA-OneVision) has no CLS token; the same two signal kinds have CLS-free
equivalents from the literature (see `received_attention` and `dissimilarity_to_mean`).
Qwen-VL's towers have none either and take each image as one packed sequence with rotary
positions: `capture_packed_scores` gives the same two kinds per image of the sequence.

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
#             SigLIP, Qwen-VL: the attention each token receives, averaged over queries and heads
#   "logits": CLIP: q_cls K^T * scale per head before softmax, averaged over heads (GlobalCom2);
#             SigLIP, Qwen-VL: -cos(token, mean token) of the layer's output (GlobalCom2's
#             CLS-free score)
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
    For the modules named in `inputs`, what they are called with, (args, kwargs), stands for
    their output. Hooks are removed on exit."""
    captured: dict[int, list[torch.Tensor]] = {}
    handles = []
    token = _active.set(captured)

    def watch(layer: int, modules: dict[str, nn.Module], score, keep=lambda name, output: output, inputs=()):
        captured[layer] = []
        pending: dict[str, torch.Tensor] = {}

        def seen(name, value):
            if _active.get() is not captured:  # a forward of another thread's call
                return
            pending[name] = keep(name, value)
            if len(pending) == len(modules):
                captured[layer].append(score(pending))
                pending.clear()

        for name, module in modules.items():
            if name in inputs:
                hook = module.register_forward_pre_hook(
                    lambda module, args, kwargs, name=name: seen(name, (args, kwargs)), with_kwargs=True
                )
            else:
                hook = module.register_forward_hook(lambda module, args, output, name=name: seen(name, _first(output)))
            handles.append(hook)

    try:
        yield captured, watch
    finally:
        for handle in handles:
            handle.remove()
        _active.reset(token)


def _first(output):
    return output[0] if isinstance(output, tuple) else output  # layers return tuples in 4.x


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
                lambda p, n=num_heads, s=scale, kind=kind: cls_scores(p["qk"][0][0][:, 0], p["qk"][0][1], n, s, kind),
                inputs=("qk",),
            )
        yield captured


@contextmanager
def capture_siglip_scores(
    encoder_layers: dict[int, nn.Module],
    kinds: dict[int, str],
    kernels: dict[int, tuple[nn.Module, int, float]] | None = None,
):
    """The CLS-free equivalents for a SigLIP tower: while active, each tower forward in this
    context appends, for every layer in `kinds`, its (B, L) scores to `captured[layer]`:
    "probs" from the layer's q/k projections (`received_attention`), "logits" from the layer's
    output hidden state (`dissimilarity_to_mean`). `kernels` ({layer: (kernel, num_heads,
    scale)}, as in `capture_cls_scores_of_inputs`): for a tower whose layers project q, k and v
    in one GEMM (a server's, as vLLM's), "probs" from the query and keys its attention kernel
    is called with instead."""
    with _capture() as (captured, watch):
        for layer, kind in kinds.items():
            block = encoder_layers[layer]
            if kind == "probs" and kernels is not None:
                kernel, num_heads, scale = kernels[layer]
                watch(
                    layer,
                    {"qk": kernel},
                    lambda p, n=num_heads, s=scale: received_attention(p["qk"][0][0], p["qk"][0][1], n, s),
                    inputs=("qk",),
                )
            elif kind == "probs":
                attn = block.self_attn
                watch(
                    layer,
                    {"q": attn.q_proj, "k": attn.k_proj},
                    lambda p, attn=attn: received_attention(p["q"], p["k"], attn.num_heads, attn.scale),
                )
            else:
                watch(layer, {"hidden": block}, lambda p: dissimilarity_to_mean(p["hidden"]))
        yield captured


def rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (L, heads, head_dim) with rotary positions applied in fp32: x cos + rotate_half(x) sin,
    cos and sin (L, head_dim) as the tower passes them to its attention."""
    x = x.float()
    half = x.shape[-1] // 2
    turned = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos.float()[:, None] + turned * sin.float()[:, None]


def received_attention_packed(q: torch.Tensor, k: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """q, k (L, heads, head_dim) fp32 of a packed sequence of images of `lengths` tokens -> (L,)
    the attention each token receives from its own image's tokens, averaged over those queries
    and the heads (the image attended as a whole, as a full-attention block attends it), one
    image and one head at a time so that memory stays one L_i x L_i map."""
    scale = q.shape[-1] ** -0.5
    received = []
    for q_i, k_i in zip(q.split(lengths), k.split(lengths)):
        total = q_i.new_zeros(q_i.shape[0])
        for head in range(q_i.shape[1]):
            total += (q_i[:, head] @ k_i[:, head].T * scale).softmax(-1).mean(0)
        received.append(total / q_i.shape[1])
    return torch.cat(received)


def dissimilarity_to_mean_packed(hidden: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """hidden (L, D) of a packed sequence of images of `lengths` tokens -> (L,) fp32:
    -cos(x_i, mean of x_i's image)."""
    return torch.cat([dissimilarity_to_mean(h[None])[0] for h in hidden.split(lengths)])


@contextmanager
def capture_packed_scores(blocks: dict[int, nn.Module], kinds: dict[int, str], lengths: list[int]):
    """A packed tower's scores (Qwen-VL: one sequence of every image's patches, rotary
    positions): while active, each tower forward in this context appends, for every layer in
    `kinds`, its (L,) scores in the tower's token order to `captured[layer]`: "probs" the
    attention each token receives within its image, from the block's `attn.qkv` output and
    the rotary (cos, sin) the block passes its attention (`received_attention_packed`);
    "logits" -cos to its image's mean token of the block's output. `lengths`: each image's
    tokens, in order (an image's tokens stay together in the tower's order)."""
    with _capture() as (captured, watch):
        for layer, kind in kinds.items():
            block = blocks[layer]
            if kind == "probs":
                attention = block.attn
                heads = attention.num_heads

                def score(p, heads=heads):
                    q, k, _ = p["qkv"].unflatten(-1, (3, heads, -1)).unbind(1)
                    cos, sin = p["rope"][1]["position_embeddings"]
                    return received_attention_packed(rotated(q, cos, sin), rotated(k, cos, sin), lengths)

                watch(layer, {"rope": attention, "qkv": attention.qkv}, score, inputs=("rope",))
            else:
                watch(layer, {"hidden": block}, lambda p: dissimilarity_to_mean_packed(p["hidden"], lengths))
        yield captured

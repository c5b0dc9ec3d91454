"""CLS-query attention of chosen vision layers, captured from their q/k projections.

Forward hooks on `self_attn.q_proj` and `self_attn.k_proj` give the projections the layer
computes anyway; from them only the CLS query row is scored against all keys, O(L) per
head. Unlike `output_attentions=True` this keeps the fast attention kernel (sdpa/flash) and
never materialises the L x L maps. Works unchanged on bitsandbytes-quantised projections.

Threads (and asyncio tasks) may run the same tower at once: every hook sees every forward of
its module, so each capture records only the forwards of the context that opened it.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

# What a method can ask for, per layer:
#   "probs":  softmax(q_cls K^T * scale) per head, summed over heads (HiRED)
#   "logits": q_cls K^T * scale per head before softmax, averaged over heads (GlobalCom2)
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


@contextmanager
def capture_cls_scores(attention_modules: dict[int, nn.Module], kinds: dict[int, str]):
    """While active, each forward of the vision tower in this thread (context) appends, for
    every layer in `kinds`, its (B, L - 1) CLS scores to `captured[layer]` (a list: one entry
    per tower call)."""
    captured: dict[int, list[torch.Tensor]] = {layer: [] for layer in kinds}
    token = _active.set(captured)
    handles = []
    try:
        for layer, kind in kinds.items():
            attn = attention_modules[layer]
            pending: dict[str, torch.Tensor] = {}

            def on_output(name, attn=attn, kind=kind, layer=layer, pending=pending):
                def hook(module, args, output):
                    if _active.get() is not captured:  # a forward of another thread's call
                        return
                    # keep only what the score needs: the CLS query row, or all keys
                    pending[name] = output[:, 0] if name == "q" else output
                    if len(pending) == 2:
                        captured[layer].append(
                            cls_scores(pending.pop("q"), pending.pop("k"), attn.num_heads, attn.scale, kind)
                        )

                return hook

            handles.append(attn.q_proj.register_forward_hook(on_output("q")))
            handles.append(attn.k_proj.register_forward_hook(on_output("k")))
        yield captured
    finally:
        for handle in handles:
            handle.remove()
        _active.reset(token)

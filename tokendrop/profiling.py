"""Honest measurement helpers: synchronised timing, peak memory, per-token generate timing.

The same code runs on CPU and CUDA. GPU kernels run asynchronously, so every timestamp is
taken after `synchronize`; time to first token (prefill, vision pass included) and decode
speed are separate figures, taken from one `generate` call by a stopping criterion that
stamps every generated token.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList

from .harness import device_name  # noqa: F401  (the benchmarks import it from here)
from .patch import ATTRIBUTE, adapter_of

PROC_STATUS = Path("/proc/self/status")
PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


def synchronize(device: torch.device | str) -> None:
    """Wait for queued kernels, so that a clock read afterwards includes them (no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# --- peak memory ----------------------------------------------------------------------


@dataclass
class PeakMemory:
    """Filled in when the `peak_memory` block ends."""

    kind: str  # "cuda_max_allocated" (all devices summed) or "cpu_peak_rss" (process)
    start_bytes: int = 0  # in use when the block began
    peak_bytes: int = 0  # the most in use during the block, start included

    @property
    def added_bytes(self) -> int:
        """What the block needed on top of what was already in use."""
        return self.peak_bytes - self.start_bytes


@contextmanager
def peak_memory(device: torch.device | str):
    """`with peak_memory(device) as mem: ...` then `mem.peak_bytes`.

    CUDA: the allocator's own peak (`max_memory_allocated`), reset at entry, summed over all
    devices since a model may be sharded. CPU: the process's resident-set high-water mark
    (VmHWM), reset by writing "5" to /proc/self/clear_refs (Linux only). RSS also counts
    freed heap that malloc keeps for reuse, so the heap is trimmed first: otherwise a
    previous, larger call would hide this one's needs."""
    cuda = torch.device(device).type == "cuda"
    result = _reset_cuda_peak() if cuda else _reset_cpu_peak()
    yield result
    result.peak_bytes = _cuda_peak() if cuda else _proc_status_bytes("VmHWM")


def _reset_cuda_peak() -> PeakMemory:
    for d in _cuda_devices():
        torch.cuda.reset_peak_memory_stats(d)
    return PeakMemory("cuda_max_allocated", start_bytes=sum(map(torch.cuda.memory_allocated, _cuda_devices())))


def _cuda_peak() -> int:
    return sum(map(torch.cuda.max_memory_allocated, _cuda_devices()))


def _cuda_devices() -> range:
    return range(torch.cuda.device_count())


def _reset_cpu_peak() -> PeakMemory:
    if not PROC_CLEAR_REFS.exists():
        raise RuntimeError("peak CPU memory is read from /proc/self (Linux); this system has no /proc/self/clear_refs")
    gc.collect()
    libc = ctypes.CDLL(None)  # the running process's symbols, libc's included
    if hasattr(libc, "malloc_trim"):  # glibc: give freed heap back to the OS
        libc.malloc_trim(0)
    PROC_CLEAR_REFS.write_text("5")
    return PeakMemory("cpu_peak_rss", start_bytes=_proc_status_bytes("VmRSS"))


def _proc_status_bytes(field: str) -> int:
    for line in PROC_STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"{PROC_STATUS} has no {field} line")


# --- generate timing ------------------------------------------------------------------


class StepTimer(StoppingCriteria):
    """A stopping criterion that never stops: generate calls it once per generated token,
    right after that token is chosen, so its stamps time each step of the one request.
    The first stamp closes prefill (time to first token); later steps cannot move it."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.start = 0.0
        self.stamps: list[float] = []

    def begin(self) -> None:
        synchronize(self.device)
        self.stamps = []
        self.start = time.perf_counter()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        synchronize(self.device)
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    @property
    def ttft_s(self) -> float:
        return self.stamps[0] - self.start

    @property
    def decode_tok_per_s(self) -> float | None:
        """Tokens after the first, per second of decoding; None with fewer than two tokens."""
        if len(self.stamps) < 2:
            return None
        return (len(self.stamps) - 1) / (self.stamps[-1] - self.stamps[0])


@contextmanager
def stages(model: nn.Module):
    """Yields a dict that fills in, for one request, the per-stage figures the model's own
    entry points reveal: `vision_s` (the vision pass: tower, projector, packing, with any
    scoring hooks), `select_s` (tokendrop's own work around it: selection and compaction; 0
    when unpatched), `llm_prefill_s`, `llm_prompt_len` and `kv_cache_bytes` (the language
    model's first call). Wrappers and hooks are removed on exit."""
    device = model_device(model)
    seen: dict[str, float] = {"vision_s": 0.0, "select_s": 0.0}
    adapter = adapter_of(model)
    vision, entry = adapter.vision_entry
    llm = adapter.language_model
    handle = model.__dict__.get(ATTRIBUTE)
    original_entry = vision.__dict__.get(entry)

    def timed(function, key):
        @functools.wraps(function)
        def run(*args, **kwargs):
            synchronize(device)
            start = time.perf_counter()
            result = function(*args, **kwargs)
            synchronize(device)
            seen[key] = seen.get(key, 0.0) + time.perf_counter() - start
            return result

        return run

    def before_prefill(module, args, kwargs):
        if "llm_prompt_len" not in seen:
            tokens = kwargs.get("inputs_embeds")
            seen["llm_prompt_len"] = tokens.shape[1]
            synchronize(device)
            seen["llm_start"] = time.perf_counter()

    def after_prefill(module, args, kwargs, output):
        if "llm_prefill_s" not in seen:
            synchronize(device)
            seen["llm_prefill_s"] = time.perf_counter() - seen.pop("llm_start")
            seen["kv_cache_bytes"] = cache_bytes(output.past_key_values)

    setattr(vision, entry, timed(getattr(vision, entry), "vision_s"))
    if handle is not None:
        handle.prune = timed(handle.prune, "prune_s")
    hooks = [
        llm.register_forward_pre_hook(before_prefill, with_kwargs=True),
        llm.register_forward_hook(after_prefill, with_kwargs=True),
    ]
    try:
        yield seen
        if handle is not None:
            seen["select_s"] = seen.pop("prune_s", 0.0) - seen["vision_s"]
    finally:
        for hook in hooks:
            hook.remove()
        if original_entry is None:
            delattr(vision, entry)
        else:
            setattr(vision, entry, original_entry)
        if handle is not None:
            del handle.prune


def cache_bytes(cache) -> int:
    """Bytes held by a key/value cache (0 without one, e.g. use_cache=False)."""
    if cache is None:
        return 0
    return sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values) if t is not None)


def measure_generate(model: nn.Module, inputs: dict, max_new_tokens: int, **generate_kwargs) -> dict:
    """One `model.generate(**inputs)` call, timed and metered; `inputs` already on the model's
    device. Returns seconds, tokens/s, bytes and token counts (JSON-ready)."""
    device = model_device(model)
    timer = StepTimer(device)
    criteria = StoppingCriteriaList([*generate_kwargs.pop("stopping_criteria", []), timer])
    with stages(model) as stage, peak_memory(device) as memory:
        timer.begin()
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, stopping_criteria=criteria, **generate_kwargs)
        synchronize(device)
        generate_s = time.perf_counter() - timer.start
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    return {
        "ttft_s": timer.ttft_s,
        "generate_s": generate_s,
        "decode_tok_per_s": timer.decode_tok_per_s,
        "new_tokens": sequences.shape[1] - inputs["input_ids"].shape[1],
        "peak_memory_bytes": memory.peak_bytes,
        "added_memory_bytes": memory.added_bytes,
        "memory_kind": memory.kind,
        **stage,
    }

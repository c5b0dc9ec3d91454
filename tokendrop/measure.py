"""Measurement helpers: synchronised timing, per-stage times, peak memory, memory caps.

`profiler.py` (`tokendrop.profile`, `tokendrop.throughput`) and the benchmarks in `eval/` build
on these; nothing here runs a grid or writes a report.

The same code runs on CPU, CUDA and the other accelerators torch knows (`torch.accelerator`:
MPS, XPU), falling back to `torch.cuda` on a torch without it. Kernels run asynchronously, so
every timestamp is taken after `synchronize`; time to first token (prefill, vision pass
included) and decode speed are separate figures, taken from one `generate` call by a stopping
criterion that stamps every generated token.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList

from .checks import UsageError, UsageTypeError
from .harness import device_name
from .patch import adapter_of, handle_of, output_cache

PROC_STATUS = Path("/proc/self/status")
PROC_CLEAR_REFS = Path("/proc/self/clear_refs")
GIB = 2**30
CPU_ALLOCATOR_FAILED = "DefaultCPUAllocator: can't allocate memory"  # torch's RuntimeError on the CPU


def _accelerator_api(device: torch.device):
    """The module with synchronize and the allocator's counters for `device`:
    `torch.accelerator` where this torch has it (2.8+) and `device` is the current
    accelerator, else `torch.cuda`."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "max_memory_allocated"):
        current = accelerator.current_accelerator()
        if current is not None and current.type == device.type:
            return accelerator
    return torch.cuda


def synchronize(device: torch.device | str) -> None:
    """Wait for queued kernels, so that a clock read afterwards includes them (no-op on CPU)."""
    device = torch.device(device)
    if device.type != "cpu":
        _accelerator_api(device).synchronize(device)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def release_memory(device: torch.device | str) -> None:
    """Collect garbage and hand the allocator's free blocks back, so that the next run starts
    from what is really in use (after an out-of-memory error above all)."""
    gc.collect()
    device = torch.device(device)
    if device.type != "cpu":
        _accelerator_api(device).empty_cache()


# --- peak memory ----------------------------------------------------------------------


@dataclass
class PeakMemory:
    """Filled in when the `peak_memory` block ends; the byte counts stay None where this
    system cannot tell (CPU memory off Linux)."""

    # "<device>_max_allocated" (devices summed), "cpu_peak_rss" (process) or "unavailable": a
    # peak that can be reset per run is Linux's VmHWM, which psutil does not give (its only peak,
    # Windows' peak working set, cannot be reset)
    kind: str
    start_bytes: int | None = None  # in use when the block began
    peak_bytes: int | None = None  # the most in use during the block, start included

    @property
    def added_bytes(self) -> int | None:
        """What the block needed on top of what was already in use (the loaded model's weights)."""
        return None if self.peak_bytes is None else self.peak_bytes - self.start_bytes


@contextmanager
def peak_memory(device: torch.device | str):
    """`with peak_memory(device) as mem: ...` then `mem.peak_bytes`.

    Accelerators: the allocator's own peak (`max_memory_allocated`), reset at entry, summed
    over all devices since a model may be sharded. CPU: the process's resident-set high-water
    mark (VmHWM), reset by writing "5" to /proc/self/clear_refs (Linux only; elsewhere the
    figures are None, kind "unavailable"). RSS also counts freed heap that malloc keeps for
    reuse, so the heap is trimmed first: otherwise a previous, larger call would hide this
    one's needs."""
    device = torch.device(device)
    accelerator = device.type != "cpu"
    result = _reset_device_peak(device) if accelerator else _reset_cpu_peak()
    yield result
    if accelerator:
        result.peak_bytes = _device_peak(device)
    elif result.kind != "unavailable":
        result.peak_bytes = proc_status_bytes("VmHWM")


def _devices(device: torch.device) -> range:
    return range(_accelerator_api(device).device_count())


def _reset_device_peak(device: torch.device) -> PeakMemory:
    api = _accelerator_api(device)
    for index in _devices(device):
        api.reset_peak_memory_stats(index)
    in_use = sum(api.memory_allocated(index) for index in _devices(device))
    return PeakMemory(f"{device.type}_max_allocated", start_bytes=in_use)


def _device_peak(device: torch.device) -> int:
    api = _accelerator_api(device)
    return sum(api.max_memory_allocated(index) for index in _devices(device))


def cpu_peak_available() -> bool:
    return PROC_CLEAR_REFS.exists() and PROC_STATUS.exists()


def _reset_cpu_peak() -> PeakMemory:
    if not cpu_peak_available():
        return PeakMemory("unavailable")
    gc.collect()
    libc = ctypes.CDLL(None)  # the running process's symbols, libc's included
    if hasattr(libc, "malloc_trim"):  # glibc: give freed heap back to the OS
        libc.malloc_trim(0)
    PROC_CLEAR_REFS.write_text("5")
    return PeakMemory("cpu_peak_rss", start_bytes=proc_status_bytes("VmRSS"))


def proc_status_bytes(field: str, path: Path = PROC_STATUS) -> int:
    for line in path.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"{path} has no {field} line")


def check_cpu_limit(limit_bytes: int) -> None:
    """Refuse a CPU memory limit above the machine's memory (psutil: any system): the tool's
    own cap would never fire, and a batch past the memory there is would fail in the
    allocator (or be ended by the operating system), not as the limit says."""
    total = psutil.virtual_memory().total
    if limit_bytes > total:
        raise UsageError(
            f"memory limit {limit_bytes / GIB:.1f} GiB is above this machine's memory ({total / GIB:.1f} GiB): "
            "pick a smaller --memory-limit"
        )


# --- memory caps ----------------------------------------------------------------------


@contextmanager
def memory_cap(model: nn.Module, limit_bytes: int | None):
    """Within the block, running `model` past `limit_bytes` raises `torch.OutOfMemoryError`,
    as a card of that size would. None: no cap.

    CUDA: the caching allocator is capped with `set_per_process_memory_fraction` on every
    device the model is on (the previous fraction is restored on exit). It counts PyTorch's
    allocations, not the CUDA context (a few hundred MB on a real card). CPU: the tool
    enforces the cap on the process's peak RSS, weights included: every repeated block (each
    layer of an `nn.ModuleList`) checks the high-water mark before it runs, so a run that
    overflows stops at the next layer, and `check_cpu_cap` checks it once more after the run."""
    if limit_bytes is None:
        yield
        return
    devices = sorted({p.device for p in model.parameters()}, key=str)
    kinds = {d.type for d in devices}
    if kinds == {"cpu"}:
        with _cpu_cap(model, limit_bytes):
            yield
    elif kinds <= {"cuda", "cpu"}:
        with _cuda_cap([d for d in devices if d.type == "cuda"], limit_bytes):
            yield
    else:
        raise UsageError(
            f"a memory limit caps CUDA's allocator or, on CPU, the process's RSS; this model is on "
            f"{', '.join(sorted(kinds))}: profile without --memory-limit"
        )


@contextmanager
def _cuda_cap(devices: list[torch.device], limit_bytes: int):
    previous = {}
    try:
        for device in devices:
            total = torch.cuda.get_device_properties(device).total_memory
            if limit_bytes > total:
                raise UsageError(
                    f"memory limit {limit_bytes / GIB:.1f} GiB exceeds {device_name(device)}'s "
                    f"{total / GIB:.1f} GiB: pick a smaller --memory-limit"
                )
            getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # torch >= 2.6
            previous[device] = getter(device) if getter else 1.0
            torch.cuda.empty_cache()  # cached blocks above the cap would otherwise stay usable
            torch.cuda.set_per_process_memory_fraction(limit_bytes / total, device)
        yield
    finally:
        for device, fraction in previous.items():
            torch.cuda.set_per_process_memory_fraction(fraction, device)


@contextmanager
def _cpu_cap(model: nn.Module, limit_bytes: int):
    if not cpu_peak_available():
        raise UsageError(
            "a CPU memory limit is enforced on the peak RSS that Linux reports in /proc/self; "
            "this system has no /proc/self/clear_refs: profile without --memory-limit"
        )

    def check(module, args):
        check_cpu_cap(limit_bytes)

    blocks = {id(b): b for m in model.modules() if isinstance(m, nn.ModuleList) for b in m}
    hooks = [block.register_forward_pre_hook(check) for block in blocks.values()]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def check_cpu_cap(limit_bytes: int | None) -> None:
    """Raise `torch.OutOfMemoryError` if the process's peak RSS since the last reset (by
    `peak_memory`) is over `limit_bytes`."""
    if limit_bytes is None or not cpu_peak_available():
        return
    peak = proc_status_bytes("VmHWM")
    if peak > limit_bytes:
        raise torch.OutOfMemoryError(
            f"CPU memory limit exceeded: peak RSS {peak / GIB:.2f} GiB > limit {limit_bytes / GIB:.2f} GiB"
        )


def parse_memory_size(value) -> int:
    """Bytes from a size: a number of GiB (24, 0.5) or a string with a unit, "24GB", "16GiB",
    "512MB", "512MiB" (GB and MB mean 2**30 and 2**20 bytes, as nvidia-smi and torch count a
    card's memory)."""
    units = {"": GIB, "g": GIB, "gb": GIB, "gib": GIB, "m": 2**20, "mb": 2**20, "mib": 2**20}
    example = 'e.g. 24 or "24GB" (GiB) or "512MB" (MiB)'
    if isinstance(value, bool):
        raise UsageTypeError(f"memory limit must be a size, {example}; got {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        digits = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        number, unit = digits, text[len(digits) :]
        try:
            number = float(number)
        except ValueError:
            raise UsageError(f"memory limit must be a number with an optional unit, {example}; got {value!r}") from None
        if unit not in units:
            raise UsageError(f"memory limit {value!r}: unknown unit {unit!r}; use GB or MB ({example})")
    else:
        raise UsageTypeError(f"memory limit must be a size, {example}; got {type(value).__name__}")
    if not (math.isfinite(number) and number > 0):
        raise UsageError(f"memory limit must be a positive size, {example}; got {value!r}")
    return int(number * units[unit])


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
    scoring hooks; pruned inside the tower, both of its parts: up to the pruning layer, and
    the rest on the kept tokens, `Adapter.finish_tower`), `select_s` (tokendrop's own work
    around it: selection and compaction; 0 when unpatched), `llm_prefill_s`, `llm_prompt_len`
    and `kv_cache_bytes` (the language model's first call). Wrappers and hooks are removed on
    exit."""
    device = model_device(model)
    seen: dict[str, float] = {"vision_s": 0.0, "select_s": 0.0}
    adapter = adapter_of(model)
    vision, entry = adapter.vision_entry
    llm = adapter.language_model
    handle = handle_of(model)
    original_entry = vision.__dict__.get(entry)

    @contextmanager
    def stopwatch(key: str):
        synchronize(device)
        start = time.perf_counter()
        yield
        synchronize(device)
        seen[key] = seen.get(key, 0.0) + time.perf_counter() - start

    def timed(function, key):
        @functools.wraps(function)
        def run(*args, **kwargs):
            with stopwatch(key):
                return function(*args, **kwargs)

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
            seen["kv_cache_bytes"] = cache_bytes(output_cache(output))

    setattr(vision, entry, timed(getattr(vision, entry), "vision_s"))
    if handle is not None and handle.prune_layer is not None:  # the tower's rest: vision too
        adapter.finish_tower = timed(adapter.finish_tower, "vision_s")
    hooks = [
        llm.register_forward_pre_hook(before_prefill, with_kwargs=True),
        llm.register_forward_hook(after_prefill, with_kwargs=True),
    ]
    try:
        with handle.observed(lambda: stopwatch("prune_s")) if handle is not None else nullcontext():
            yield seen
        if handle is not None:
            seen["select_s"] = seen.pop("prune_s", 0.0) - seen["vision_s"]
    finally:
        for hook in hooks:
            hook.remove()
        adapter.__dict__.pop("finish_tower", None)
        if original_entry is None:
            delattr(vision, entry)
        else:
            setattr(vision, entry, original_entry)


def cache_bytes(cache) -> int:
    """Bytes held by a key/value cache (0 without one, e.g. use_cache=False)."""
    if cache is None:
        return 0
    return sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values) if t is not None)


def measure_generate(
    model: nn.Module, inputs: dict, max_new_tokens: int, memory_limit_bytes: int | None = None, **generate_kwargs
) -> dict:
    """One `model.generate(**inputs)` call, timed and metered; `inputs` already on the model's
    device. Returns seconds, tokens/s, bytes and token counts (JSON-ready). With
    `memory_limit_bytes`, a run past it raises `torch.OutOfMemoryError` (see `memory_cap`)."""
    device = model_device(model)
    timer = StepTimer(device)
    criteria = StoppingCriteriaList([*generate_kwargs.pop("stopping_criteria", []), timer])
    with memory_cap(model, memory_limit_bytes), stages(model) as stage, peak_memory(device) as memory:
        timer.begin()
        try:
            output = model.generate(
                **inputs, max_new_tokens=max_new_tokens, stopping_criteria=criteria, **generate_kwargs
            )
        except RuntimeError as error:
            if CPU_ALLOCATOR_FAILED not in str(error):
                raise
            # the CPU allocator's failure is a RuntimeError, CUDA's an OutOfMemoryError: one kind for callers
            raise torch.OutOfMemoryError(str(error).splitlines()[0]) from error
        synchronize(device)
        generate_s = time.perf_counter() - timer.start
        if device.type == "cpu":
            check_cpu_cap(memory_limit_bytes)  # the blocks' checks miss a peak after the last layer
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


def time_call(run, device: torch.device | str) -> float:
    """Seconds `run()` takes, the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - start


def measure_call(run, device: torch.device | str) -> dict:
    """`run()` once, timed (synchronised) and metered: seconds, peak and added bytes."""
    with peak_memory(device) as memory:
        seconds = time_call(run, device)
    return {
        "time_s": seconds,
        "peak_memory_bytes": memory.peak_bytes,
        "added_memory_bytes": memory.added_bytes,
        "memory_kind": memory.kind,
    }

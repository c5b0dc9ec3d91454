"""What the measuring and evaluating harnesses share (`profile`, `show`, `sweep`, the
benchmarks, the lmms-eval model): written once here.

- `REFERENCE`: the method name of the unpatched model's rows ("none");
- `chat_prompt`: a user turn of images and a question in the model's chat template;
- `spread`: median, min and max of repeated measurements, and `spread_exceeds`: whether
  they vary too much to compare (max - min over 20% of the median);
- `provenance`: one shape for every output file (date, git revision, versions, device, the
  run's configuration);
- `text_table`: a plain-text table (rich), for the terminal and for logs;
- `positive_int`: the argparse type of counts, for the CLI and the benchmarks' own parsers.

Nothing here imports torch or transformers at import time: the command line imports it to
answer `--help` fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

from .checks import UsageError
from .registry import did_you_mean

REFERENCE = "none"  # the unpatched model, a row of every profile and every sweep
SPREAD_TOLERANCE = 0.2  # repeats whose max - min exceeds this share of the median are flagged


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def chat_prompt(processor, question: str, n_images: int = 1, answer: str | None = None) -> str:
    """The user turn (images first, then the question) in the model's chat template, with the
    generation prompt: the text to give the processor beside the images. With `answer` (for
    training), the exchange instead: the user turn, then the assistant's answer and its end of turn.
    A question that holds the image token is refused: its placeholder would have no image."""
    from .method.text import image_token

    token = image_token(processor)
    if token in question:
        raise UsageError(
            f"the question {question!r:.80} holds the image token {token!r}: the prompt places the image "
            "itself; write the question without it"
        )
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
    conversation = [{"role": "user", "content": content}]
    if answer is None:
        return processor.apply_chat_template(conversation, add_generation_prompt=True)
    conversation.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return processor.apply_chat_template(conversation)


def method_options(options, methods: list[str], harness: str, varied: str) -> dict[str, dict]:
    """A harness's per-method options as plain dicts, refused where they name a method that
    `harness` ("this profile") does not run or set the budget, which it varies (`varied`:
    "profiled")."""
    options = {name: dict(opts) for name, opts in (options or {}).items()}
    for name, opts in options.items():
        if name not in methods:
            raise UsageError(
                f"options given for method {name!r}, which {harness} does not run "
                f"({', '.join(methods)}).{did_you_mean(name, methods)}"
            )
        if "budget" in opts:
            raise UsageError(
                f"options for {name!r}: the budget is {varied}; set it with budgets (--budgets), not as an option"
            )
    return options


def spread(values) -> dict:
    """{median, min, max} of repeated measurements."""
    values = list(values)
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def spread_exceeds(stats: dict, tolerance: float = SPREAD_TOLERANCE) -> bool:
    """Whether a `spread` varies by more than `tolerance` of its median (max - min)."""
    return stats["max"] - stats["min"] > tolerance * abs(stats["median"])


def git_revision() -> str | None:
    """The commit of the tokendrop checkout this runs from ("+dirty" with local changes), or
    None for an installed copy."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        run = lambda *args: subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)  # noqa: E731
        head = run("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    found = {"tokendrop": __version__, "python": sys.version.split()[0]}
    for package in ("torch", "transformers", "accelerate", "bitsandbytes"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def device_name(device) -> str:
    """The accelerator's name, or the CPU model and torch's thread count."""
    import torch

    device = torch.device(device)
    if device.type != "cpu":
        backend = getattr(torch, device.type, None)  # torch.cuda, torch.xpu, torch.mps...
        return backend.get_device_name(device) if hasattr(backend, "get_device_name") else str(device)
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)
    return f"CPU {model or platform.machine()}, {torch.get_num_threads()} threads"


def provenance(config=None, model=None, **extra) -> dict:
    """The record every output file carries: {date, git, versions, device, model, config,
    ...extra}. `config`: a dataclass or a dict (made JSON-ready); `model`: the loaded model,
    for its device, dtype, quantisation and attention implementation."""
    record = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "git": git_revision(),
        "versions": versions(),
        "device": None,
        "model": None,
    }
    if model is not None:
        device = next(model.parameters()).device
        quantization = getattr(model.config, "quantization_config", None)
        record["device"] = device_name(device)
        record["model"] = {
            "name": getattr(model, "name_or_path", None) or type(model).__name__,
            "revision": getattr(model.config, "_commit_hash", None),
            "dtype": str(model.dtype).removeprefix("torch."),
            "quantization": quantization.to_dict() if hasattr(quantization, "to_dict") else quantization,
            "attn_implementation": model.config.get_text_config()._attn_implementation,
        }
    if config is not None:
        record["config"] = jsonable(dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config)
    return record | extra


def jsonable(value):
    """`value` with paths and tuples as JSON has them, and anything else JSON cannot hold as
    its repr (a processor passed as an option, say)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def differences(new: dict, old: dict, prefix: str = "") -> list[str]:
    """Dotted names of the keys whose values differ, nested dicts walked into; values are
    compared as JSON, so that 1 (one token) and 1.0 (every token) differ."""
    changed = []
    for k in sorted(set(new) | set(old)):
        a, b = new.get(k), old.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += differences(a, b, f"{prefix}{k}.")
        elif json.dumps(a) != json.dumps(b):
            changed.append(prefix + k)
    return changed


def text_table(columns, rows, title: str | None = None, caption: str | None = None) -> str:
    """A table as plain text: `columns` are headers, `rows` lists of cells (None shows as -);
    the first column (names) is left-aligned, the others (figures) right-aligned."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(
        *columns, title=title, caption=caption, box=box.SIMPLE_HEAD, title_justify="left", caption_justify="left"
    )
    for column in table.columns[1:]:
        column.justify = "right"
    rows = [["-" if cell is None else str(cell) for cell in row] for row in rows]
    for row in rows:
        table.add_row(*row)
    # wide enough that no cell wraps: a wrapped row cannot be read back line by line
    widest = [len(str(header)) for header in columns]
    for row in rows:
        widest = [max(w, len(cell)) for w, cell in zip(widest, row)]
    width = max(100, sum(w + 3 for w in widest) + 4)
    console = Console(width=width, record=True, file=_Null(), color_system=None)
    console.print(table)
    return "\n".join(line.rstrip() for line in console.export_text().splitlines()).strip("\n")


class _Null:
    def write(self, text) -> int:
        return len(text)

    def flush(self) -> None:
        pass

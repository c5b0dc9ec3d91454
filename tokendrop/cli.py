"""The `tokendrop` command. Each subcommand is one function registered with `@command`,
which names its arguments; `main` builds the argparse parser from the registry."""

from __future__ import annotations

import argparse
from typing import Callable, NamedTuple

import torch
import transformers

from . import __version__, patch, unpatch
from .method import METHODS
from .presets import PRESETS, build_preset, synthetic_image
from .profiling import device_name, measure_generate
from .registry import Registry
from .selection import check_budget


class Command(NamedTuple):
    summary: str
    arguments: list[tuple]  # (flags, options) pairs for `add_argument`
    run: Callable[[argparse.Namespace], None]


COMMANDS: Registry[Command] = Registry("command")
PROMPT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]


def arg(*flags, **options) -> tuple:
    """One `add_argument` call, written where the command is declared."""
    return flags, options


def command(name: str, summary: str, arguments: list[tuple]):
    def add(run):
        COMMANDS.register(name)(Command(summary, arguments, run))
        return run

    return add


# --- argument types: a ValueError/TypeError becomes argparse's usage error --------------


def budget(text: str) -> float | int:
    """'0.2' is a fraction, '64' (no dot) a token count, as `patch(budget=...)` reads them."""
    try:
        return check_budget(int(text) if text.lstrip("+-").isdigit() else float(text))
    except (TypeError, ValueError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def image_size(text: str) -> tuple[int, int]:
    """'WIDTHxHEIGHT' -> (width, height)."""
    width, sep, height = text.lower().partition("x")
    if not (sep and width.isdigit() and height.isdigit() and int(width) > 0 and int(height) > 0):
        raise argparse.ArgumentTypeError(f"image size must be WIDTHxHEIGHT in pixels, e.g. 672x672; got {text!r}")
    return int(width), int(height)


def torch_device(text: str) -> torch.device:
    try:
        return torch.device(text)
    except RuntimeError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


# --- demo -----------------------------------------------------------------------------


@command(
    "demo",
    summary="patch a random-weight preset model at several budgets and time one generate per budget",
    arguments=[
        arg("--preset", choices=PRESETS.names(), default="llava-next-shape"),
        arg("--budgets", type=budget, nargs="+", default=[1.0, 0.4, 0.2, 0.1],
            help="fractions in (0, 1], or token counts per image (integers without a dot)"),
        arg("--method", choices=METHODS.names(), default="hired"),
        arg("--max-new-tokens", type=positive_int, default=8),
        arg("--image-size", type=image_size, default=(672, 672), metavar="WxH"),
        arg("--device", type=torch_device, default="cuda" if torch.cuda.is_available() else "cpu"),
    ],
)
def demo(args) -> None:
    print(
        f"Preset {args.preset!r} has random weights: the generated text is meaningless. "
        "Only shapes, token counts, timings and memory are real.\n"
        f"tokendrop {__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{device_name(args.device)}, {args.max_new_tokens} new tokens per run",
        flush=True,
    )
    model, processor = build_preset(args.preset)
    model.to(args.device)
    text = processor.apply_chat_template(PROMPT, add_generation_prompt=True)
    inputs = processor(images=synthetic_image(*args.image_size), text=text, return_tensors="pt").to(args.device)
    # every run decodes the same number of tokens, whatever the random weights pick
    settings = dict(max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens, do_sample=False)
    model.generate(**inputs, **settings)  # warm-up: first-call allocations and kernel selection
    rows = []
    try:
        for value in args.budgets:
            handle = patch(model, args.method, budget=value)
            rows.append(demo_row(value, measure_generate(model, inputs, **settings), handle.last))
    finally:
        unpatch(model)
    print(format_table(rows))


def demo_row(value, measured: dict, records) -> dict:
    return dict(
        measured,
        budget=value,
        visual_kept=sum(r.n_kept + r.n_newlines for r in records),
        features_kept=sum(r.n_kept for r in records),
        features_before=sum(r.n_before for r in records),
    )


def format_table(rows: list[dict]) -> str:
    """Rows as a plain text table; speedups against the budget-1.0 row when there is one."""
    full = next((r for r in rows if type(r["budget"]) is float and r["budget"] == 1.0), None)

    def speedup(row, key):
        return "-" if full is None else f"{full[key] / row[key]:.2f}x"

    header = ("budget", "visual kept", "features kept", "LLM prompt", "TTFT s", "generate s",
              "decode tok/s", "peak MB", "TTFT speedup", "generate speedup")
    lines = [header]
    for r in rows:
        decode = "-" if r["decode_tok_per_s"] is None else f"{r['decode_tok_per_s']:.2f}"
        lines.append((
            str(r["budget"]), str(r["visual_kept"]), f"{r['features_kept']}/{r['features_before']}",
            str(r["llm_prompt_len"]), f"{r['ttft_s']:.3f}", f"{r['generate_s']:.3f}", decode,
            f"{r['peak_memory_bytes'] / 2**20:.0f}", speedup(r, "ttft_s"), speedup(r, "generate_s"),
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    table = "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines)
    return (
        f"{table}\n"
        "visual kept: feature + newline tokens the LLM sees. TTFT includes the vision pass and scoring. "
        f"Peak memory: {rows[0]['memory_kind']}."
    )


# --- entry point ----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokendrop", description="Drop visual tokens before the LLM.")
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, spec in COMMANDS.items():
        sub = subcommands.add_parser(name, help=spec.summary, description=spec.summary)
        for flags, options in spec.arguments:
            sub.add_argument(*flags, **options)
        sub.set_defaults(run=spec.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.run(args)
    return 0


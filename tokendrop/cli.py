"""The `tokendrop` command. Each subcommand is one `add_*` function that declares its
arguments and sets `run` to the function that carries it out.

The command line is the top layer: it may import every other module, the evaluation code
included, and nothing imports it. It imports torch and transformers only inside `run_*`, so
that `--help`, `--version` and argument errors answer at once. Names that live in registries
(methods, presets, tasks) are therefore checked after parsing, before any model loads, with
the registry's did-you-mean message.
"""

from __future__ import annotations

import argparse
import ast
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .checks import UsageError
from .harness import REFERENCE, positive_int
from .preset_specs import PRESETS

DTYPE_NAMES = ("auto", "float32", "float16", "bfloat16", "fp32", "fp16", "bf16")  # loading.DTYPES (a test checks)
PRESET_NAMES = tuple(PRESETS.names())
BUDGET_HELP = (
    "fractions in (0, 1] of each image's tokens (0.2, 1.0), or token counts per image "
    "(integers without a dot: 1 is one token, 1.0 every token)"
)


class Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown in help, but not for flags and options without one."""

    def _get_help_string(self, action):
        if action.default in (None, False, [], argparse.SUPPRESS) or isinstance(action, argparse._VersionAction):
            return action.help
        return super()._get_help_string(action)


# --- argument types: a ValueError/TypeError becomes argparse's usage error --------------


def budget(text: str) -> float | int:
    """'0.2' is a fraction, '64' (no dot) a token count, as `patch(budget=...)` reads them.
    Checked here as `selection.check_budget` checks it, without importing torch."""
    try:
        value = int(text) if text.lstrip("+-").isdigit() else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"budget must be a fraction in (0, 1] or a token count >= 1, got {text!r}"
        ) from None
    if isinstance(value, int) and value < 1:
        raise argparse.ArgumentTypeError(f"a token-count budget must be >= 1, got {value}")
    if isinstance(value, float) and not (math.isfinite(value) and 0 < value <= 1):
        raise argparse.ArgumentTypeError(
            f"a fractional budget must be in (0, 1], got {value}; a token count is an integer without a dot"
        )
    return value


def key_value(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not (sep and name and value):
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def method_option(text: str) -> tuple[str, str, object]:
    """METHOD.OPTION=VALUE; VALUE is a Python literal (0.5, -2, True) or else a string."""
    target, value = key_value(text)
    method, dot, option = target.partition(".")
    if not (dot and method and option):
        raise argparse.ArgumentTypeError(f"expected METHOD.OPTION=VALUE (e.g. hired.alpha=0.3), got {text!r}")
    try:
        value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        pass  # a bare word such as `drop` is a string
    return method, option, value


def grouped(options: list[tuple[str, str, object]]) -> dict[str, dict]:
    """[(method, option, value)] -> {method: {option: value}}."""
    result: dict[str, dict] = {}
    for method, option, value in options:
        result.setdefault(method, {})[option] = value
    return result


def image_size(text: str) -> tuple[int, int]:
    """'WIDTHxHEIGHT' -> (width, height)."""
    width, sep, height = text.lower().partition("x")
    if not (sep and width.isdigit() and height.isdigit() and int(width) > 0 and int(height) > 0):
        raise argparse.ArgumentTypeError(f"image size must be WIDTHxHEIGHT in pixels, e.g. 672x672; got {text!r}")
    return int(width), int(height)


def device_map(text: str) -> str:
    from .loading import check_device_map  # torch: only when the flag is given

    try:
        check_device_map(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def image_file(text: str):
    from .files import open_image  # refuses FIFOs and decompression bombs

    try:
        return open_image(text)
    except (OSError, ValueError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None


# --- arguments shared by the subcommands ------------------------------------------------


def model_flags() -> argparse.ArgumentParser:
    """How the model loads: one parent parser, so that every command that loads a model takes
    the same flags (`loaded_model` reads them)."""
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--dtype", choices=DTYPE_NAMES, default="auto")
    flags.add_argument(
        "--device-map", type=device_map, help="passed to from_pretrained: auto, cpu, cuda:0 (default: auto with a GPU)"
    )
    flags.add_argument("--attn-implementation", choices=["sdpa", "eager", "flash_attention_2"])
    quantize = flags.add_mutually_exclusive_group()
    quantize.add_argument("--load-in-4bit", action="store_true", help="bitsandbytes NF4 weights")
    quantize.add_argument("--load-in-8bit", action="store_true", help="bitsandbytes LLM.int8 weights")
    return flags


def add_model_argument(parser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help=f"a Hugging Face id or local path of a checkpoint of a supported family (LLaVA-NeXT, LLaVA-OneVision, "
        "Qwen2-VL, Qwen2.5-VL, Qwen3-VL), or an embedded preset "
        f"({', '.join(PRESET_NAMES)}; testbed is trained, the others have random weights)",
    )


def add_methods(parser, default: list[str], plural: bool = True) -> None:
    if plural:
        parser.add_argument(
            "--methods",
            nargs="+",
            default=default,
            metavar="METHOD",
            help="registered methods (tokendrop.methods() lists them, with their options)",
        )
    else:
        parser.add_argument(
            "--method",
            default=default[0],
            metavar="METHOD",
            help="a registered method (tokendrop.methods() lists them, with their options)",
        )
    parser.add_argument(
        "--option",
        dest="options",
        action="append",
        type=method_option,
        default=[],
        metavar="METHOD.OPTION=VALUE",
        help="a method option, e.g. hired.alpha=0.3; repeatable",
    )


def add_vision_prune_layer(parser) -> None:
    parser.add_argument(
        "--vision-prune-layer",
        type=int,
        metavar="K",
        help="select inside the vision tower: methods read vision layer K (an index of the tower's layers, "
        "negative from the end, below the feature layer) and layers K+1 up to the feature layer run on the kept "
        "tokens only (LLaVA-NeXT, LLaVA-OneVision). Default: select after the tower",
    )


def add_budgets(parser, default) -> None:
    if isinstance(default, list) or default is None:
        parser.add_argument("--budgets", nargs="+", type=budget, default=default, help=BUDGET_HELP)
    else:
        parser.add_argument("--budget", type=budget, default=default, help=BUDGET_HELP)


def check_budgets(budgets) -> None:
    """Warn where `1` (one token) most likely meant 1.0 (every token)."""
    if any(b == 1 and isinstance(b, int) for b in budgets) and any(isinstance(b, float) for b in budgets):
        print(
            "tokendrop: warning: budget 1 (no dot) keeps one token per image; write 1.0 to keep every token",
            file=sys.stderr,
        )


def check_methods(methods, extra=()) -> None:
    from .method import METHODS

    for name in methods:
        if name not in extra:
            METHODS.get(name)


def loaded_model(args):
    from .loading import LoadOptions, load_model

    options = LoadOptions(args.dtype, args.device_map, args.load_in_4bit, args.load_in_8bit, args.attn_implementation)
    return load_model(args.model, options)


def random_weights_note(model_name: str) -> str:

    if model_name in PRESETS.names() and not PRESETS.get(model_name).get("task"):
        return (
            f"Preset {model_name!r} has random weights: the generated text is meaningless. "
            "Only shapes, token counts, timings and memory are real."
        )
    return ""


# --- profile ------------------------------------------------------------------------------


def add_input_arguments(group) -> None:
    """The image sources of profile and demo, one at most."""
    group.add_argument(
        "--image-size", type=image_size, metavar="WxH", help="a synthetic image of this size (default 672x672)"
    )
    group.add_argument(
        "--task",
        choices=["shapes", "testbed"],  # testbed: the task's old name, warned about
        help="the shapes task's first test image and its question, in place of an image and --prompt "
        "(the default for --model testbed, which knows only its task's images)",
    )


def profile_inputs(args) -> tuple[list, str]:
    """The images and the prompt that `args` ask to profile."""
    from .eval.tasks import current_task_name
    from .presets import synthetic_image

    trained_for = PRESETS.get(args.model).get("task") if args.model in PRESETS.names() else None
    task = args.task or (None if getattr(args, "images", None) or args.image_size else trained_for)
    if current_task_name(task) == "shapes":
        if args.prompt is not None:
            raise UsageError("--prompt asks about your image; the shapes task brings its own question: drop one")
        from .eval.shapes import shapes_sample

        sample = shapes_sample("test", 0)
        return [sample["image"]], sample["question"]
    images = getattr(args, "images", None) or [synthetic_image(*(args.image_size or (672, 672)))]
    return images, args.prompt or "Describe the image."


def add_profile(subcommands, flags: argparse.ArgumentParser) -> None:
    parser = subcommands.add_parser(
        "profile",
        parents=[flags],
        help="time and meter methods x budgets x batch sizes: TTFT, decode speed, memory; or, with --throughput, "
        "the largest batch that fits and its throughput",
        description="Profile a model over methods x budgets x batch sizes, with the unpatched model as reference. "
        "With --throughput: for each method x budget and the unpatched model, the largest batch that fits in "
        "memory (doubling, then bisecting) and the requests/s and tokens/s at that batch.",
        formatter_class=Formatter,
    )
    add_model_argument(parser)
    add_methods(parser, ["hired"])
    add_budgets(parser, [1.0, 0.4, 0.2, 0.1])
    add_vision_prune_layer(parser)
    parser.add_argument("--batch-sizes", nargs="+", type=positive_int, help="default 1; not with --throughput")
    images = parser.add_mutually_exclusive_group()
    images.add_argument("--images", nargs="+", type=image_file, help="image files, used round-robin per batch")
    add_input_arguments(images)
    parser.add_argument("--prompt", help='the question (default "Describe the image."; a task brings its own)')
    add_timing_arguments(parser, repeats=3, warmup=None)
    parser.add_argument(
        "--throughput",
        action="store_true",
        help="search the largest batch that fits per method x budget, and measure throughput at it",
    )
    parser.add_argument(
        "--memory-limit",
        metavar="SIZE",
        help='a run past it is out of memory, as on a smaller card: GiB (24) or with a unit ("24GB", "512MB"). '
        "Caps CUDA's allocator; on CPU the tool enforces it on the process's peak RSS (required there with "
        "--throughput)",
    )
    parser.add_argument(
        "--max-batch-size", type=positive_int, help="--throughput searches batches up to this (default 64)"
    )
    parser.add_argument("--out", type=Path, help="write profile (or throughput) .json, .csv and .png here")
    parser.add_argument(
        "--wide",
        action="store_true",
        help="print every figure, each with its min-max (wider than 120 columns); the default table has the main ones",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=run_profile)


def add_timing_arguments(parser, repeats: int, warmup: int | None) -> None:
    parser.add_argument("--max-new-tokens", type=positive_int, default=8)
    parser.add_argument("--repeats", type=positive_int, default=repeats, help="measured runs per cell")
    parser.add_argument(
        "--warmup",
        type=int,
        default=warmup,
        help="unmeasured runs per cell first"
        + (" (default 1; 0 with --throughput, whose search warms up)" if warmup is None else ""),
    )


def profile_config(args, prompt: str, out: Path | None):
    """A ProfileConfig, or with --throughput a ThroughputConfig: every value checked here."""
    from .preset_specs import with_preset_defaults
    from .profiler import ProfileConfig, ThroughputConfig

    check_methods(args.methods)
    throughput = getattr(args, "throughput", False)
    common = dict(
        methods=args.methods,
        budgets=args.budgets,
        options=with_preset_defaults(args.model, args.methods, grouped(args.options)),
        prompt=prompt,
        max_new_tokens=args.max_new_tokens,
        repeats=args.repeats,
        memory_limit=getattr(args, "memory_limit", None),
        vision_prune_layer=getattr(args, "vision_prune_layer", None),
        out=out,
        progress=not args.no_progress,
    )
    if args.warmup is not None:
        common["warmup"] = args.warmup
    if throughput:
        if args.batch_sizes:
            raise UsageError("--throughput searches the batch size: drop --batch-sizes (cap it with --max-batch-size)")
        return ThroughputConfig(**common, max_batch_size=args.max_batch_size or 64)
    if getattr(args, "max_batch_size", None) is not None:
        raise UsageError("--max-batch-size bounds the search of --throughput: add --throughput, or drop it")
    return ProfileConfig(**common, batch_sizes=getattr(args, "batch_sizes", None) or [1])


def run_profile(args) -> None:
    import torch

    from .files import writable_folder
    from .loading import check_model_name, load_processor, model_facts
    from .profiler import format_table, format_throughput_table, profile, throughput

    check_model_name(args.model)
    images, prompt = profile_inputs(args)
    config = profile_config(args, prompt, args.out)  # every value checked here
    if args.device_map == "cpu" or not torch.cuda.is_available():
        config.check_device("cpu")  # the model will load on the CPU: a limit it needs is asked for now
    processor = load_processor(args.model)
    config.check(processor, model_facts(args.model))  # a bad option fails before the model loads
    if config.out:
        writable_folder(config.out)
    model = loaded_model(args)
    note = random_weights_note(args.model)
    if note:
        print(note, flush=True)
    if args.throughput:
        print(format_throughput_table(throughput(model, processor, images, config), wide=args.wide))
        name = "throughput"
    else:
        print(format_table(profile(model, processor, images, config), wide=args.wide))
        name = "profile"
    if config.out:
        print(f"\n{name}.json, {name}.csv and {name}.png in {config.out}")


# --- demo ---------------------------------------------------------------------------------


def add_demo(subcommands, flags: argparse.ArgumentParser) -> None:
    parser = subcommands.add_parser(
        "demo",
        parents=[flags],
        help="see tokendrop work offline: real answers and accuracy on the trained testbed model",
        description="With the trained testbed model (the default): each method's answers at the lowest budget next "
        "to the truth for a few test images, the accuracy at each budget on --samples test samples, what the lowest "
        "budget buys (visual tokens and prompt length into the LLM, and LLM prefill time, for one test image), and "
        "a picture of the kept tokens (seconds on a CPU). With a random-weight preset (--preset llava-next-shape: a "
        "LLaVA-NeXT-sized model, a few minutes on 2 CPU cores): the timing profile instead.",
        formatter_class=Formatter,
    )
    parser.add_argument(
        "--preset",
        "--model",
        dest="model",
        default="testbed",
        metavar="PRESET",
        help=f"an embedded model: {', '.join(PRESET_NAMES)}",
    )
    add_methods(parser, None)
    parser._option_string_actions["--methods"].help = (
        f"registered methods (default: {' '.join(TESTBED_DEMO['methods'])} on the testbed; "
        f"{' '.join(TIMING_DEMO['methods'])} for the timing demo)"
    )
    add_budgets(parser, None)
    parser._option_string_actions["--budgets"].help = (
        f"{BUDGET_HELP} (default: {' '.join(map(str, TESTBED_DEMO['budgets']))} on the testbed; "
        f"{' '.join(map(str, TIMING_DEMO['budgets']))} for the timing demo)"
    )
    parser.add_argument("--samples", type=positive_int, default=200, help="test samples scored per method and budget")
    parser.add_argument("--examples", type=positive_int, default=3, help="test images whose answers are printed")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("tokendrop-demo"),
        help="the run's records and summary, and kept.png; rerun into it to resume",
    )
    add_timing_arguments(parser, repeats=3, warmup=None)
    parser.set_defaults(max_new_tokens=None)
    parser._option_string_actions[
        "--warmup"
    ].help = "unmeasured runs per timed cell first (default: 1 on the testbed, 0 for the timing demo)"
    add_input_arguments(parser.add_mutually_exclusive_group())
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(run=run_demo)


# the demos' defaults. The testbed's: the best methods at 5% on its sweep (README: router
# 98.2%, divprune 96.2%) beside hired and random, at a moderate and an aggressive budget
TESTBED_DEMO = {"methods": ["router", "divprune", "hired", "random"], "budgets": [0.2, 0.05], "warmup": 1}
TIMING_DEMO = {"methods": ["hired"], "budgets": [0.4, 0.2, 0.1], "warmup": 0}


def run_demo(args) -> None:
    trained = PRESETS.get(args.model).get("task") == "shapes"  # an unknown preset fails here
    demo = TESTBED_DEMO if trained and args.image_size is None else TIMING_DEMO
    args.methods = args.methods or demo["methods"]
    args.budgets = args.budgets or demo["budgets"]
    args.warmup = demo["warmup"] if args.warmup is None else args.warmup
    if demo is TESTBED_DEMO:
        import torch

        # the testbed's ops are too small to split over threads: on 2 CPU cores one thread
        # ran the demo in 23 s, two in 142 s beside other work (their waits for each other)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return run_testbed_demo(args)
        finally:
            torch.set_num_threads(threads)
    args.prompt, args.images = None, None
    args.max_new_tokens = args.max_new_tokens or 8
    return run_timing_demo(args)


def run_timing_demo(args) -> None:
    """A random-weight preset: the profile of one image, batch 1."""
    from .loading import load_processor
    from .profiler import format_table, profile

    if args.repeats < 3:
        raise UsageError(
            f"the timing demo runs at least 3 repeats, so that its table shows the spread; got --repeats "
            f"{args.repeats} (tokendrop profile runs fewer)"
        )
    images, prompt = profile_inputs(args)
    config = profile_config(args, prompt, args.out / "profile")
    processor = load_processor(args.model)
    config.check(processor)
    model = loaded_model(args)
    note = random_weights_note(args.model)
    if note:
        print(note, flush=True)
    print(format_table(profile(model, processor, images, config)))
    print(f"\nprofile.json, profile.csv and profile.png in {config.out}")


def run_testbed_demo(args) -> None:
    """The trained testbed: answers, accuracy, what the lowest budget buys, and what was kept."""
    from .eval.shapes import MAX_NEW_TOKENS, shapes_sample
    from .eval.sweep import SweepConfig, format_summary, read_records, sweep
    from .harness import text_table
    from .loading import load_processor
    from .preset_specs import with_preset_defaults
    from .visualize import show

    check_methods(args.methods)
    if args.warmup < 0:
        raise UsageError(f"--warmup must be >= 0, got {args.warmup}")
    config = SweepConfig(
        model=args.model,
        tasks=["shapes"],
        out=args.out / "sweep",
        methods=args.methods,
        budgets=args.budgets,
        options=grouped(args.options),
        limit=args.samples,
        batch_size=50,
        max_new_tokens=args.max_new_tokens or MAX_NEW_TOKENS,
        dtype=args.dtype,
        device_map=args.device_map,
        load_in_4bit=args.load_in_4bit,
        load_in_8bit=args.load_in_8bit,
        attn_implementation=args.attn_implementation,
        progress=not args.no_progress,
    )
    lowest = config.budgets[-1]  # the last listed: the lowest, as the defaults list them
    options = with_preset_defaults(config.model, config.methods, config.options)
    sample = shapes_sample("test", 0)
    processor = load_processor(args.model)
    model = loaded_model(args)
    summary = sweep(config, model=model, processor=processor)

    # a few test images: each method's answer at the lowest budget next to the truth
    cells = [(REFERENCE, None)] + [(m, lowest) for m in config.methods]
    records = {(r["method"], repr(r["budget"]), r["index"]): r for r in read_records(config.out)}
    indices = sorted({r["index"] for r in records.values()})[: args.examples]
    header = ["sample", "question", "truth"] + [m if b is None else f"{m} {b}" for m, b in cells]
    rows = []
    for index in indices:
        first = records[(REFERENCE, "None", index)]
        answers = [_answer(records.get((m, repr(b), index))) for m, b in cells]
        rows.append([index, first["question"], first["reference"], *answers])
    print()
    print(text_table(header, rows, title=f"Answers on test images at budget {lowest} (* = wrong)"))
    print()
    print(format_summary(summary))
    print()
    print(budget_buys(model, processor, sample, config.methods, lowest, options, args.repeats, args.warmup))

    # the kept tokens of the first example at the lowest budget, by the first method
    sample = shapes_sample("test", indices[0]) if indices else sample
    method = config.methods[0]
    out = args.out / "kept.png"
    show(model, processor, sample["image"], method, lowest, sample["question"], out=out, **options.get(method, {}))
    print(f"\n{method} at budget {lowest} on test sample {sample['id']}: {out}")
    print(f"records, summary.json and plots in {config.out}. The same on any model: tokendrop sweep --help")


def budget_buys(model, processor, sample, methods, budget, options, repeats: int, warmup: int) -> str:
    """One line: what each method feeds the LLM at `budget` for `sample`'s image and question,
    and its LLM prefill time (median of `repeats` runs after `warmup`), beside the unpatched
    model's. Timed by stage (`tokendrop.measure.stages`) without `profile`'s memory figures,
    whose garbage collection before every run took longer than the runs themselves here."""
    import statistics
    from contextlib import nullcontext

    import torch

    from .measure import stages
    from .patch import patched
    from .profiler import batch_inputs

    inputs = batch_inputs(processor, [sample["image"]], sample["question"], 1, model)
    parts = []
    for method in [REFERENCE, *methods]:
        unpatched = method == REFERENCE
        chosen = options.get(method, {})
        patch = nullcontext() if unpatched else patched(model, method, budget, processor=processor, **chosen)
        with patch as handle, torch.no_grad():
            runs = []
            for _ in range(warmup + repeats):
                with stages(model) as stage:
                    model.generate(**inputs, max_new_tokens=1, do_sample=False)
                runs.append(stage)
            visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
            if not unpatched:
                visual = sum(r.n_kept + r.n_newlines for r in handle.last)
        prefill = statistics.median(run["llm_prefill_s"] for run in runs[warmup:])
        name = "unpatched" if unpatched else method
        parts.append(f"{name} {visual} / {runs[-1]['llm_prompt_len']} / {prefill * 1000:.1f} ms")
    return (
        f"What budget {budget} buys (one test image; visual tokens / prompt tokens into the LLM / LLM prefill, "
        f"median of {repeats}): " + ", ".join(parts)
    )


def _answer(record) -> str:
    """A prediction as the demo prints it: marked * when wrong."""
    if record is None:
        return "?"
    if record["error"] is not None:
        return "error"
    prediction = record["prediction"] or "''"
    return prediction if record["score"] else prediction + " *"


# --- show ---------------------------------------------------------------------------------


def add_show(subcommands, flags: argparse.ArgumentParser) -> None:
    parser = subcommands.add_parser(
        "show",
        parents=[flags],
        help="draw an image with the patches a method keeps highlighted",
        description="Draw IMAGE with the patches a method keeps bright and the dropped ones dimmed: the base view "
        "and the crop canvas of an AnyRes model, the image itself of a native-resolution one (Qwen-VL).",
        formatter_class=Formatter,
    )
    parser.add_argument("image", type=image_file)
    add_model_argument(parser)
    add_methods(parser, ["hired"], plural=False)
    add_budgets(parser, 0.2)
    add_vision_prune_layer(parser)
    parser.add_argument("--question", default="Describe the image.")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.set_defaults(run=run_show)


def run_show(args) -> None:
    from .harness import chat_prompt
    from .loading import check_model_name, load_processor, model_facts
    from .method import build as build_method
    from .method.base import check_fits
    from .preset_specs import with_preset_defaults
    from .visualize import check_figure_path, show

    check_model_name(args.model)
    check_methods([args.method])
    options = grouped(args.options)
    for name in options:
        if name != args.method:
            raise UsageError(f"options given for method {name!r}, which show does not run ({args.method})")
    options = with_preset_defaults(args.model, [args.method], options).get(args.method, {})
    check_figure_path(args.out)
    processor = load_processor(args.model)
    method = build_method(args.method, budget=args.budget, processor=processor, **options)
    check_fits(method, model_facts(args.model))  # before the model loads
    chat_prompt(processor, args.question)
    model = loaded_model(args)
    show(
        model,
        processor,
        args.image,
        args.method,
        args.budget,
        args.question,
        out=args.out,
        vision_prune_layer=args.vision_prune_layer,
        **options,
    )
    print(f"wrote {args.out}")


# --- sweep --------------------------------------------------------------------------------


def add_sweep(subcommands, flags: argparse.ArgumentParser) -> None:
    help = "evaluate methods x budgets x tasks on a model: records, summary table and plots"
    parser = subcommands.add_parser("sweep", parents=[flags], help=help, description=help, formatter_class=Formatter)
    add_model_argument(parser)
    parser.add_argument(
        "--tasks",
        nargs="+",
        required=True,
        metavar="TASK",
        help="vqav2, textvqa, gqa, pope, scienceqa_img, mme, custom, shapes (see the README)",
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory; rerun into it to resume")
    add_methods(parser, None)
    parser.set_defaults(methods=None)
    parser._option_string_actions["--methods"].help = (
        "default: every registered method; oracle (shapes only, evaluation only) keeps the queried object's "
        "tokens first"
    )
    add_budgets(parser, [0.1, 0.2, 0.4])
    add_vision_prune_layer(parser)
    parser.add_argument(
        "--data",
        action="append",
        type=key_value,
        default=[],
        metavar="TASK=PATH",
        help="a local copy (parquet, save_to_disk, JSONL) or hub id for a task; repeatable",
    )
    parser.add_argument("--limit", type=positive_int, help="samples per task, drawn with --seed (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=positive_int, default=1)
    parser.add_argument("--max-new-tokens", type=positive_int, help="default: per task (16; custom 32)")
    parser.add_argument(
        "--retry-failed", action="store_true", help="run failed samples again instead of keeping their error"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(run=run_sweep)


def sweep_config(args):
    from .eval.sweep import TASK_METHODS, SweepConfig

    if args.methods is not None:
        check_methods(args.methods, extra=TASK_METHODS)
    return SweepConfig(
        model=args.model,
        tasks=args.tasks,
        out=args.out,
        methods=args.methods,
        budgets=args.budgets,
        options=grouped(args.options),
        vision_prune_layer=args.vision_prune_layer,
        data=dict(args.data),
        limit=args.limit,
        seed=args.seed,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        dtype=args.dtype,
        device_map=args.device_map,
        load_in_4bit=args.load_in_4bit,
        load_in_8bit=args.load_in_8bit,
        attn_implementation=args.attn_implementation,
        retry_failed=args.retry_failed,
        progress=not args.no_progress,
    )


def run_sweep(args) -> None:
    from .eval.sweep import format_summary, sweep

    config = sweep_config(args)
    summary = sweep(config)
    if summary is not None:  # the process that merged
        print(format_summary(summary))
        print(f"\nrecords, summary.json, summary.csv and plots/ in {config.out}")


# --- train-router -------------------------------------------------------------------------


# RouterTraining's defaults (tokendrop.training imports torch; a test checks they agree)
TRAINING_DEFAULTS = dict(
    budget=0.05,
    loss="kl",
    steps=1000,
    batch_size=8,
    accumulate=1,
    samples=8,
    lr=1e-2,
    rank=8,
    scope="all",
    seed=0,
    checkpoint_every=100,
    validate_every=100,
    prompt_template=None,
)


def add_train_router(subcommands, flags: argparse.ArgumentParser) -> None:
    parser = subcommands.add_parser(
        "train-router",
        parents=[flags],
        help="train the learned router (method router) for a model, the model frozen",
        description="Train a router for --model on --data and write router.safetensors and router.json to "
        "--out. Rerun the same command to resume from the last checkpoint.",
        formatter_class=Formatter,
    )
    add_model_argument(parser)
    parser.add_argument(
        "--data",
        required=True,
        help="a JSONL file of {image, question, answer?} lines (image paths relative to it), or "
        "a sweep task whose train split is read (e.g. shapes)",
    )
    parser.add_argument(
        "--validation",
        metavar="SOURCE",
        help="examples with answers scored every --validate-every steps: a JSONL file, or TASK or "
        "TASK=SPLIT as sweep's --data reads it (e.g. shapes=validation)",
    )
    parser.add_argument("--validation-samples", type=positive_int, default=200, help="the first N of --validation")
    parser.add_argument("--out", type=Path, required=True, help="the router folder to write")
    d = TRAINING_DEFAULTS
    parser.add_argument("--budget", type=budget, default=d["budget"], help="the budget it trains at")
    parser.add_argument(
        "--loss",
        choices=("kl", "ce", "mix"),
        default=d["loss"],
        help="kl: match the unpruned model's answer (no labels); ce: the data's answers; mix: both",
    )
    for name, kind, help in (
        ("steps", positive_int, "optimizer updates"),
        ("batch_size", positive_int, "prompts per process and micro-step"),
        ("accumulate", positive_int, "micro-steps of gradient accumulation per update"),
        ("samples", positive_int, "selections drawn per prompt (>= 2)"),
        ("lr", float, "peak learning rate (warm-up, then cosine decay)"),
        ("rank", positive_int, "rank of the learned visual-question term"),
        ("seed", int, "decides the data order, the sampling noise and the initial weights"),
        ("checkpoint_every", positive_int, "steps between checkpoints in OUT/checkpoint"),
        ("validate_every", positive_int, "steps between validation scores"),
    ):
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=d[name], help=help)
    parser.add_argument("--scope", choices=["all", "crops"], default=d["scope"])
    parser.add_argument("--prompt-template", help='for a processor without a chat template: "... {question} ..."')
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=run_train_router)


def run_train_router(args) -> None:
    from .loading import load_processor
    from .training import RouterTraining, check_run, read_jsonl, train_router

    given = {name: getattr(args, name) for name in TRAINING_DEFAULTS}
    config = RouterTraining(out=args.out, progress=not args.no_progress, **given)
    data = read_jsonl(args.data) if Path(args.data).is_file() else task_examples(args.data, "train")
    validation = None
    if args.validation:
        source = args.validation
        validation = read_jsonl(source) if Path(source).is_file() else task_examples(source, None)
        validation = [validation[i] for i in range(min(args.validation_samples, len(validation)))]
    checked = check_run(config, data, validation)  # the data and --out, before the model loads
    args.device_map = device_map_from_launch(args) or args.device_map
    processor = load_processor(args.model)
    model = loaded_model(args)
    out = train_router(model, processor, data, config, validation, checked)
    # a bare folder name could be a shipped router's: `./NAME` never is
    named = out if len(out.parts) > 1 or out.is_absolute() else f"./{out}"
    print(
        f"wrote {out / 'router.safetensors'} and {out / 'router.json'}; use it with "
        f"--method router --option router.router={named}"
    )


def task_examples(spec: str, split: str | None) -> TaskExamples:
    """The examples of a sweep task: TASK (its evaluated split, or `split`), or TASK=SOURCE."""
    from .eval.data import fingerprint
    from .eval.tasks import TASKS, build_task, current_task_name
    from .files import image_digest

    name, equals, source = spec.partition("=")
    name = current_task_name(name)
    if name not in TASKS.names():
        raise UsageError(f"--data/--validation {spec!r} is neither a file nor a task ({', '.join(TASKS.names())})")
    task = build_task(name)
    rows, image_of = task.load(source or None, split)
    # the name now, so that `--data testbed` and `--data shapes` are one run (and resume each
    # other); a local source's files and the image files its rows name, by content
    identity = [f"{name}{equals}{source}:{split}:{len(rows)}"]
    if source and fingerprint(source) is not None:
        identity.append(fingerprint(source))
    if isinstance(rows, list):
        paths = (getattr(image_of(row, index), "path", None) for index, row in enumerate(rows))
        identity.append(image_digest(path for path in paths if path is not None))
    return TaskExamples(task, rows, image_of, identity=":".join(identity))


class TaskExamples(Sequence):
    """A task's rows as training examples, each made when indexed (a split can be large)."""

    def __init__(self, task, rows, image_of, identity: str):
        self.task, self.rows, self.image_of, self.identity = task, rows, image_of, identity

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        from .training import Example

        row = self.rows[index]
        sample = self.task.sample(row, index, self.image_of(row, index))
        answer = sample.reference[0] if isinstance(sample.reference, list) else sample.reference
        return Example(sample.image, sample.question, None if answer is None else str(answer))


def device_map_from_launch(args):
    """Under `accelerate launch`, a whole model per process, on that process's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.device_map is None:
        from accelerate import PartialState

        return {"": PartialState().device}
    return None


# --- entry point --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokendrop", description="Drop visual tokens before the LLM.")
    parser.add_argument("--version", action="version", version=f"tokendrop {__version__}")
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    flags = model_flags()
    for add in (add_demo, add_profile, add_show, add_sweep, add_train_router):
        add(subcommands, flags)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_budgets(getattr(args, "budgets", None) or [])
    try:
        args.run(args)
    except UsageError as error:
        # bad input found after parsing (a name, a path, a missing package, data or model that
        # cannot be read): the subcommand's usage and the message, exit 2. Anything else is a
        # bug or a failure of the run, and keeps its traceback
        subcommand_parser(parser, args.command).error(str(error))
    return 0


def subcommand_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    (subcommands,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return subcommands.choices[command]

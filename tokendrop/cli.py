"""The `tokendrop` command. Each subcommand is one `add_*` function that declares its
arguments and sets `run` to the function that carries it out."""

from __future__ import annotations

import argparse
import ast
import dataclasses
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from .loading import DTYPES, check_device_map, load_model, load_processor
from .method import METHODS
from .presets import PRESETS, synthetic_image, with_preset_defaults
from .selection import check_budget

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
    try:
        check_device_map(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def image_file(text: str) -> Image.Image:
    try:
        return Image.open(text).convert("RGB")
    except OSError as error:
        raise argparse.ArgumentTypeError(f"cannot read image {text!r}: {error}") from None


def add_model_arguments(parser, default=None) -> None:
    parser.add_argument("--model", default=default, required=default is None,
                        help=f"a Hugging Face id or local path of a LLaVA-NeXT checkpoint, or a preset "
                             f"({', '.join(PRESETS.names())})")
    parser.add_argument("--dtype", choices=list(DTYPES), default="auto")
    parser.add_argument("--device-map", type=device_map,
                        help="passed to from_pretrained: auto, cpu, cuda:0 (default: auto with a GPU)")
    parser.add_argument("--attn-implementation", choices=["sdpa", "eager", "flash_attention_2"])
    quantize = parser.add_mutually_exclusive_group()
    quantize.add_argument("--load-in-4bit", action="store_true", help="bitsandbytes NF4 weights")
    quantize.add_argument("--load-in-8bit", action="store_true", help="bitsandbytes LLM.int8 weights")


def loaded_model(args):
    return load_model(args.model, args.dtype, args.device_map, args.load_in_4bit, args.load_in_8bit,
                      args.attn_implementation)


def random_weights_note(model_name: str) -> str:
    if model_name in PRESETS.names() and not PRESETS.get(model_name).get("task"):
        return (f"Preset {model_name!r} has random weights: the generated text is meaningless. "
                "Only shapes, token counts, timings and memory are real.")
    return ""


# --- profile and demo -------------------------------------------------------------------


def add_input_arguments(group) -> None:
    """The image sources of profile and demo, one at most."""
    group.add_argument("--image-size", type=image_size, metavar="WxH",
                       help="a synthetic image of this size (default 672x672)")
    group.add_argument("--task", choices=["testbed"],
                       help="the task's first test image and its question, in place of an image and --prompt "
                            "(the default for --model testbed, which knows only its task's images)")


def profile_inputs(args) -> tuple[list[Image.Image], str]:
    """The images and the prompt that `args` ask to profile."""
    trained_for = PRESETS.get(args.model).get("task") if args.model in PRESETS.names() else None
    task = args.task or (None if args.images or args.image_size else trained_for)
    if task == "testbed":
        from .eval.testbed import testbed_sample

        if args.prompt is not None:
            raise ValueError("--prompt asks about your image; the testbed task brings its own question: drop one")
        sample = testbed_sample("test", 0)
        return [sample["image"]], sample["question"]
    return args.images or [synthetic_image(*(args.image_size or (672, 672)))], args.prompt or "Describe the image."


def add_profile(subcommands) -> None:
    parser = subcommands.add_parser(
        "profile", help="time and meter methods x budgets x batch sizes: TTFT, decode speed, memory",
        description="Profile a model over methods x budgets x batch sizes, with the unpatched model as reference.")
    add_model_arguments(parser)
    parser.add_argument("--methods", nargs="+", choices=METHODS.names(), default=["hired"])
    parser.add_argument("--budgets", nargs="+", type=budget, default=[1.0, 0.4, 0.2, 0.1],
                        help="fractions in (0, 1], or token counts per image (integers without a dot)")
    parser.add_argument("--batch-sizes", nargs="+", type=positive_int, default=[1])
    images = parser.add_mutually_exclusive_group()
    images.add_argument("--images", nargs="+", type=image_file, help="image files, used round-robin per batch")
    add_input_arguments(images)
    parser.add_argument("--option", dest="options", action="append", type=method_option, default=[],
                        metavar="METHOD.OPTION=VALUE", help="a method option, e.g. hired.alpha=0.3; repeatable")
    parser.add_argument("--prompt", help='the question (default "Describe the image."; a task brings its own)')
    parser.add_argument("--max-new-tokens", type=positive_int, default=8)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write profile.json, profile.csv and profile.png here")
    parser.set_defaults(run=run_profile)


def run_profile(args) -> None:
    from .profile_grid import format_table, plan_grid, profile, writable_folder

    processor = load_processor(args.model)
    images, prompt = profile_inputs(args)
    options = with_preset_defaults(args.model, args.methods, grouped(args.options))
    plan_grid(args.methods, args.budgets, options, processor)  # a bad option fails before the model loads
    if args.out:
        writable_folder(args.out)
    model = loaded_model(args)
    print(random_weights_note(args.model), flush=True)
    rows = profile(model, processor, args.methods, args.budgets, args.batch_sizes, images, prompt,
                   args.max_new_tokens, args.repeats, args.warmup, args.out, options)
    print(format_table(rows))
    if args.out:
        print(f"\nprofile.json, profile.csv and profile.png in {args.out}")


def add_demo(subcommands) -> None:
    parser = subcommands.add_parser(
        "demo", help="profile an embedded preset offline: HiRED at several budgets, one image",
        description="`tokendrop profile` preset: an offline model, one image (a synthetic 672x672 one, or a "
                    "testbed one for --model testbed), batch 1, one measured run per budget.")
    parser.add_argument("--model", "--preset", dest="preset", choices=PRESETS.names(), default="llava-next-shape",
                        help="the embedded model: random weights but testbed, which is trained (default llava-next-shape)")
    parser.add_argument("--method", choices=METHODS.names(), default="hired")
    parser.add_argument("--budgets", nargs="+", type=budget, default=[1.0, 0.4, 0.2, 0.1],
                        help="fractions in (0, 1], or token counts per image (integers without a dot)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=8)
    add_input_arguments(parser.add_mutually_exclusive_group())
    parser.set_defaults(run=run_demo)


def run_demo(args) -> None:
    run_profile(argparse.Namespace(
        model=args.preset, dtype="auto", device_map=None, attn_implementation=None, load_in_4bit=False,
        load_in_8bit=False, methods=[args.method], budgets=args.budgets, batch_sizes=[1], images=None,
        image_size=args.image_size, task=args.task, prompt=None, max_new_tokens=args.max_new_tokens,
        repeats=1, warmup=1, out=None, options=[],
    ))


# --- show -------------------------------------------------------------------------------


def add_show(subcommands) -> None:
    parser = subcommands.add_parser(
        "show", help="draw an image with the patches a method keeps highlighted",
        description="Draw IMAGE twice, base view and crop canvas, kept patches bright and dropped ones dimmed.")
    parser.add_argument("image", type=image_file)
    add_model_arguments(parser)
    parser.add_argument("--method", choices=METHODS.names(), required=True)
    parser.add_argument("--budget", type=budget, default=1.0)
    parser.add_argument("--question", default="Describe the image.")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.set_defaults(run=run_show)


def run_show(args) -> None:
    from .visualize import check_figure_path, show

    check_figure_path(args.out)
    processor = load_processor(args.model)
    model = loaded_model(args)
    options = with_preset_defaults(args.model, [args.method], {}).get(args.method, {})
    show(model, processor, args.image, args.method, args.budget, args.question, out=args.out, **options)
    print(f"wrote {args.out}")


# --- train-router -----------------------------------------------------------------------


def add_train_router(subcommands) -> None:
    from .training import LOSSES, RouterTraining

    defaults = {f.name: f.default for f in dataclasses.fields(RouterTraining)}
    parser = subcommands.add_parser(
        "train-router", help="train the learned router (method router) for a model, the model frozen",
        description="Train a router for --model on --data and write router.safetensors and router.json to "
                    "--out. Rerun the same command to resume from the last checkpoint.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--data", required=True,
                        help="a JSONL file of {image, question, answer?} lines (image paths relative to it), or "
                             "a sweep task whose train split is read (e.g. testbed)")
    parser.add_argument("--validation", metavar="SOURCE",
                        help="examples with answers scored every --validate-every steps: a JSONL file, or TASK or "
                             "TASK=SPLIT as sweep's --data reads it (e.g. testbed=validation)")
    parser.add_argument("--validation-samples", type=positive_int, default=200, help="the first N of --validation")
    parser.add_argument("--out", type=Path, required=True, help="the router folder to write")
    parser.add_argument("--budget", type=budget, default=defaults["budget"], help="the budget it trains at")
    parser.add_argument("--loss", choices=LOSSES, default=defaults["loss"],
                        help="kl: match the unpruned model's answer (no labels); ce: the data's answers; mix: both")
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
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=defaults[name], help=help)
    parser.add_argument("--scope", choices=["all", "crops"], default=defaults["scope"])
    parser.add_argument("--prompt-template", help='for a processor without a chat template: "... {question} ..."')
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=run_train_router)


def run_train_router(args) -> None:
    from .training import RouterTraining, read_jsonl, train_router

    config = RouterTraining(
        out=args.out, budget=args.budget, loss=args.loss, steps=args.steps, batch_size=args.batch_size,
        accumulate=args.accumulate, samples=args.samples, lr=args.lr, rank=args.rank, scope=args.scope,
        seed=args.seed, checkpoint_every=args.checkpoint_every, validate_every=args.validate_every,
        prompt_template=args.prompt_template, progress=not args.no_progress,
    )
    data = read_jsonl(args.data) if Path(args.data).is_file() else task_examples(args.data, "train")
    validation = None
    if args.validation:
        source = args.validation
        validation = read_jsonl(source) if Path(source).is_file() else task_examples(source, None)
        validation = [validation[i] for i in range(min(args.validation_samples, len(validation)))]
    args.device_map = device_map_from_launch(args) or args.device_map
    processor = load_processor(args.model)
    model = loaded_model(args)
    out = train_router(model, processor, data, config, validation)
    print(f"wrote {out / 'router.safetensors'} and {out / 'router.json'}; use it with "
          f"--method router --option router.router={out}")


def task_examples(spec: str, split: str | None) -> "TaskExamples":
    """The examples of a sweep task: TASK (its evaluated split, or `split`), or TASK=SOURCE."""
    from .eval.tasks import TASKS, build_task

    name, _, source = spec.partition("=")
    if name not in TASKS.names():
        raise ValueError(f"--data/--validation {spec!r} is neither a file nor a task ({', '.join(TASKS.names())})")
    task = build_task(name)
    rows, image_of = task.load(source or None, split)
    return TaskExamples(task, rows, image_of, identity=f"{spec}:{split}:{len(rows)}")


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
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.device_map is None:
        from accelerate import PartialState

        return {"": PartialState().device}
    return None


# --- entry point ----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from .eval.sweep import add_sweep_parser  # evaluation code loads only with the command list

    parser = argparse.ArgumentParser(prog="tokendrop", description="Drop visual tokens before the LLM.")
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (add_demo, add_profile, add_show, add_sweep_parser, add_train_router):
        add(subcommands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, TypeError, FileNotFoundError) as error:
        parser.error(str(error))  # bad input found after parsing: a usage error (exit 2), not a traceback
    return 0

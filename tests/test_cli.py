"""The command line behaves like one: fast help, one error line with exit code 2 for every
bad input found after parsing, everything checked before a model loads, and one set of
flags across the subcommands."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tokendrop import cli, profiler
from tokendrop.cli import main
from tokendrop.presets import synthetic_image

QUICK = ["--budgets", "0.5", "--max-new-tokens", "1", "--repeats", "1", "--warmup", "0", "--image-size", "90x60"]


def cli_error(capsys, *argv) -> str:
    """Run the command, expect a usage error (exit code 2, no traceback) under the subcommand's
    own usage, and return its message."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"\nusage: tokendrop {argv[0]} " in f"\n{err}", err
    prefix = f"tokendrop {argv[0]}: error: "
    last = err.strip().splitlines()[-1]
    assert last.startswith(prefix), last
    return last[len(prefix) :]


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if a model is loaded or built."""
    from tokendrop import loading

    def fail(*args, **kwargs):
        raise AssertionError("a model was loaded before the error was found")

    monkeypatch.setattr(loading, "load_model", fail)
    monkeypatch.setattr(loading, "build_preset", fail)
    monkeypatch.setattr(profiler, "run_cell", fail)


def custom_data(folder: Path) -> Path:
    folder.mkdir()
    synthetic_image(90, 60).save(folder / "0.png")
    path = folder / "data.jsonl"
    path.write_text(json.dumps({"image": "0.png", "question": "Say it.", "answers": ["x"]}) + "\n")
    return path


# --- the errors of the issue: one line, exit code 2, no traceback ----------------------------


def test_out_holding_another_configuration(capsys, tmp_path):
    data = custom_data(tmp_path / "data")
    sweep = [
        "sweep",
        "--model",
        "tiny",
        "--tasks",
        "custom",
        "--data",
        f"custom={data}",
        "--methods",
        "random",
        "--max-new-tokens",
        "1",
        "--out",
        str(tmp_path / "run"),
        "--no-progress",
    ]
    assert main([*sweep, "--budgets", "0.5"]) == 0
    error = cli_error(capsys, *sweep, "--budgets", "0.25")
    assert error.startswith(f"{tmp_path / 'run'} holds run ") and "differs in: budgets" in error


def test_unknown_model(capsys, monkeypatch, no_model):
    from tokendrop import loading

    def offline(spec, *args, **kwargs):
        raise OSError(f"{spec} is not a local folder and is not a valid model identifier")

    monkeypatch.setattr(loading.AutoProcessor, "from_pretrained", offline)
    error = cli_error(capsys, "profile", "--model", "org/no-such-model", *QUICK)
    assert error == "org/no-such-model is not a local folder and is not a valid model identifier"


def test_offline_dataset(capsys, monkeypatch, no_model, tmp_path):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'lmms-lab/textvqa' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    error = cli_error(
        capsys, "sweep", "--model", "tiny", "--tasks", "textvqa", "--methods", "random", "--out", str(tmp_path / "run")
    )
    assert "lmms-lab/textvqa" in error


def test_prompt_together_with_a_task(capsys, no_model):
    error = cli_error(capsys, "profile", "--model", "testbed", "--task", "shapes", "--prompt", "What?")
    assert error == ("--prompt asks about your image; the shapes task brings its own question: drop one")


@pytest.mark.parametrize("command", ["profile", "sweep"])
def test_unwritable_out(capsys, tmp_path, no_model, command):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker / "run"
    if command == "profile":
        error = cli_error(capsys, "profile", "--model", "tiny", *QUICK, "--out", str(out))
    else:
        data = custom_data(tmp_path / "data")
        error = cli_error(
            capsys,
            "sweep",
            "--model",
            "tiny",
            "--tasks",
            "custom",
            "--data",
            f"custom={data}",
            "--methods",
            "random",
            "--out",
            str(out),
        )
    assert error.startswith(f"cannot write to {out}: ") and error.endswith("pick a folder you can write")


# --- everything is checked before a model loads --------------------------------------------


def test_a_misspelt_option_fails_before_the_model_loads(capsys, no_model):
    error = cli_error(capsys, "profile", "--model", "tiny", "--methods", "hired", *QUICK, "--option", "hired.alhpa=0.3")
    assert "alhpa" in error and "alpha" in error


@pytest.mark.parametrize("command", [["profile", "--model", "tiny", *QUICK], ["demo", "--preset", "tiny"]])
def test_an_option_for_a_method_not_run_is_refused(capsys, no_model, command, tmp_path):
    error = cli_error(capsys, *command, "--methods", "hired", "--option", "globalcom2.tau=5", "--out", str(tmp_path))
    assert error == ("options given for method 'globalcom2', which this profile does not run (hired).")


def test_show_refuses_an_option_for_another_method(capsys, no_model, tmp_path):
    image = tmp_path / "photo.png"
    synthetic_image(90, 60).save(image)
    error = cli_error(
        capsys,
        "show",
        str(image),
        "--model",
        "tiny",
        "--method",
        "hired",
        "--option",
        "globalcom2.tau=5",
        "--out",
        str(tmp_path / "k.png"),
    )
    assert error == "options given for method 'globalcom2', which show does not run (hired)"


def test_an_unknown_method_says_what_it_meant(capsys, no_model):
    error = cli_error(capsys, "profile", "--model", "tiny", *QUICK, "--methods", "hird")
    assert error.startswith("unknown method 'hird'. Did you mean 'hired'?")


def test_budget_one_among_fractions_warns(capsys, no_model):
    # the warning comes before the (unrelated) error that ends the run
    with pytest.raises(SystemExit):
        main(["profile", "--model", "tiny", "--budgets", "0.5", "1", "--methods", "hird"])
    assert "tokendrop: warning: budget 1 (no dot) keeps one token per image; write 1.0" in capsys.readouterr().err


def test_budget_help_says_what_1_means():
    help = cli.build_parser()._subparsers._group_actions[0].choices["profile"].format_help()
    assert "1 is one token, 1.0 every token" in " ".join(help.split())


# --- fast help, version, defaults in help, the same flags everywhere ---------------------------


def test_help_and_argument_errors_do_not_import_torch():
    code = (
        "import sys\nfrom tokendrop.cli import main\n"
        "for argv in (['--help'], ['sweep', '--help'], ['demo', '--help'], ['profile', '--budgets', '0']):\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))\n"
        "print('HEAVY', heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]


def test_version(capsys):
    import tokendrop

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"tokendrop {tokendrop.__version__}"


def test_help_shows_defaults_and_shared_flags():
    subcommands = cli.build_parser()._subparsers._group_actions[0].choices
    flags = {name: set(parser._option_string_actions) for name, parser in subcommands.items()}
    for name in ("profile", "show", "sweep", "train-router"):
        assert {"--model", "--dtype", "--device-map", "--attn-implementation", "--load-in-4bit"} <= flags[name], name
    for name in ("demo", "profile", "show", "sweep"):
        assert "--option" in flags[name] and "--out" in flags[name], name
    assert "--repeats" in flags["demo"]
    assert "(default: 0.2)" in " ".join(subcommands["show"].format_help().split())
    assert "(default: 200)" in " ".join(subcommands["demo"].format_help().split())


def test_the_commands_name_lists_match_the_registries():
    """The command line keeps these names itself (so that --help needs no torch)."""
    from tokendrop.loading import DTYPES
    from tokendrop.presets import PRESETS
    from tokendrop.training import RouterTraining

    assert cli.DTYPE_NAMES == tuple(DTYPES) and cli.PRESET_NAMES == tuple(PRESETS.names())
    defaults = {f: getattr(RouterTraining(out="x"), f) for f in cli.TRAINING_DEFAULTS}
    assert defaults == cli.TRAINING_DEFAULTS


# --- library functions leave the user's matplotlib backend alone ---------------------------


def test_show_and_profile_leave_the_backend_alone(tiny, tmp_path):
    import matplotlib

    import tokendrop

    before = matplotlib.get_backend()
    matplotlib.use("pdf")  # a backend the user chose; neither call may switch it
    try:
        model, processor = tiny
        tokendrop.show(model, processor, synthetic_image(90, 60), "hired", 0.5, out=tmp_path / "k.png")
        assert matplotlib.get_backend() == "pdf"
        tokendrop.profile(
            model,
            processor,
            [synthetic_image(90, 60)],
            tokendrop.ProfileConfig(
                budgets=[0.5], max_new_tokens=1, repeats=1, warmup=0, out=tmp_path / "profile", progress=False
            ),
        )
        assert matplotlib.get_backend() == "pdf"
        assert (tmp_path / "k.png").stat().st_size > 0 and (tmp_path / "profile" / "profile.png").stat().st_size > 0
    finally:
        matplotlib.use(before)


def test_a_resumed_sweep_says_how_far_it_got(capsys, tmp_path):
    data = custom_data(tmp_path / "data")
    sweep = [
        "sweep",
        "--model",
        "tiny",
        "--tasks",
        "custom",
        "--data",
        f"custom={data}",
        "--methods",
        "random",
        "--budgets",
        "0.5",
        "--max-new-tokens",
        "1",
        "--out",
        str(tmp_path / "run"),
    ]
    assert main([*sweep, "--no-progress"]) == 0
    assert "resuming" not in capsys.readouterr().out
    assert main(sweep) == 0
    assert "resuming: 2 of 2 records done" in capsys.readouterr().out


# --- issue 27: one set of model flags, the subcommand's usage, user errors apart from bugs ----


def test_every_command_that_loads_a_model_takes_the_same_model_flags():
    subcommands = cli.build_parser()._subparsers._group_actions[0].choices
    model_flags = set(cli.model_flags()._option_string_actions) - {"-h", "--help"}
    assert model_flags == {"--dtype", "--device-map", "--attn-implementation", "--load-in-4bit", "--load-in-8bit"}
    for name in ("demo", "profile", "show", "sweep", "train-router"):
        assert model_flags <= set(subcommands[name]._option_string_actions), name
    assert cli.build_parser().parse_args(["demo", "--dtype", "bf16"]).dtype == "bf16"


@pytest.mark.parametrize("command", [["demo", "--samples", "1"], ["demo", "--preset", "tiny"]])
def test_the_demo_loads_its_model_as_the_flags_say(capsys, monkeypatch, tmp_path, command):
    from tokendrop import loading
    from tokendrop.checks import UsageError

    asked = []

    def load_model(spec, options=None, **fields):
        asked.append((spec, options))
        raise UsageError("loaded")

    monkeypatch.setattr(loading, "load_model", load_model)
    argv = [*command, "--dtype", "bf16", "--device-map", "cpu", "--out", str(tmp_path), "--no-progress"]
    assert cli_error(capsys, *argv) == "loaded"
    ((spec, options),) = asked
    assert options.dtype == "bf16" and options.device_map == "cpu"


def test_an_error_after_parsing_shows_the_subcommands_usage(capsys, no_model):
    with pytest.raises(SystemExit):
        main(["profile", "--model", "testbed", "--task", "shapes", "--prompt", "What?"])
    err = capsys.readouterr().err
    assert err.startswith("usage: tokendrop profile ") and "COMMAND" not in err
    assert err.strip().splitlines()[-1].startswith("tokendrop profile: error: --prompt asks about your image")


def test_only_usage_errors_are_usage_errors(capsys, monkeypatch):
    """A bad input ends with the usage and exit code 2; any other exception, a ValueError from a
    bug included, keeps its traceback."""
    import tokendrop
    from tokendrop.checks import MissingInputError, MissingPackageError, UsageTypeError

    def run_with(error):
        def run(args):
            raise error

        monkeypatch.setattr(cli, "run_show", run)
        return main(["show", "image.png", "--model", "tiny", "--out", "k.png"])

    monkeypatch.setattr(cli, "image_file", str)  # the image is not opened
    for error in (
        tokendrop.UsageError("a bad value"),
        UsageTypeError("a bad type"),
        MissingInputError("no such file"),
        MissingPackageError("pip install it"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            run_with(error)
        assert exit_info.value.code == 2 and capsys.readouterr().err.endswith(f"show: error: {error}\n")
    for error in (ValueError("a bug"), TypeError("a bug"), OSError("disk"), ImportError("a bug"), KeyError("bug")):
        with pytest.raises(type(error)):
            run_with(error)
    # each usage error is still the builtin error its check raised before it existed
    assert issubclass(UsageTypeError, TypeError) and issubclass(MissingInputError, FileNotFoundError)
    assert issubclass(MissingPackageError, ImportError) and issubclass(tokendrop.UsageError, ValueError)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["profile", "--model", "tiny", *QUICK, "--option", "hired.select_layer=0.5"], "select_layer must be an int"),
        (["profile", "--model", "tiny", *QUICK, "--methods", "hird"], "unknown method 'hird'"),
        (["demo", "--warmup", "-1", "--out", "OUT"], "--warmup must be >= 0, got -1"),
        (
            ["sweep", "--model", "tiny", "--tasks", "custom", "--data", "custom=/nowhere.jsonl", "--out", "OUT"],
            "/nowhere",
        ),
    ],
)
def test_input_checks_raise_usage_errors(capsys, no_model, tmp_path, argv, message):
    assert message in cli_error(capsys, *[str(tmp_path / "run") if a == "OUT" else a for a in argv])

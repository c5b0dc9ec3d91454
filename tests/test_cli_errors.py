"""Issue 13, profile/show/CLI: bad input is refused up front, with a message that says what
was wrong, before a model loads or a measurement is lost; the command line ends such errors
with `tokendrop COMMAND: error: ...` under the command's usage and exit code 2, never a traceback."""

import os

import pytest

import tokendrop
from conftest import without_hanging
from tokendrop import loading, profiler
from tokendrop.cli import main
from tokendrop.harness import chat_prompt
from tokendrop.presets import PRESETS, build_preset, synthetic_image
from tokendrop.profiler import REFERENCE, ProfileConfig, profile
from tokendrop.visualize import show

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
def grid_never_runs(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a profile cell ran before the error was found")

    monkeypatch.setattr(profiler, "run_cell", fail)


@pytest.fixture
def no_hub(monkeypatch):
    """Records hub look-ups instead of making them."""
    asked = []

    def hub(spec, *args, **kwargs):
        asked.append(spec)
        raise OSError(f"offline: {spec}")

    monkeypatch.setattr(loading.AutoProcessor, "from_pretrained", hub)
    monkeypatch.setattr(loading.AutoModelForImageTextToText, "from_pretrained", hub)
    monkeypatch.setattr(loading.AutoConfig, "from_pretrained", hub)
    return asked


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "photo.png"
    synthetic_image(90, 60, seed=2).save(path)
    return path


# --- 1. profile options are validated before anything runs -----------------------------


@pytest.mark.parametrize(
    "option, message",
    [
        (
            "hird.alpha=0.3",
            "options given for method 'hird', which this profile does not run (hired). Did you mean 'hired'?",
        ),
        ("uniform.newlines=none", "options given for method 'uniform', which this profile does not run (hired)."),
        ("hired.alpha=2.0", "alpha must be a number in [0.0, 1.0], got 2.0"),
        (
            "hired.budget=0.1",
            "options for 'hired': the budget is profiled; set it with budgets (--budgets), not as an option",
        ),
    ],
)
def test_profile_command_refuses_bad_options(capsys, grid_never_runs, option, message):
    error = cli_error(capsys, "profile", "--model", "tiny", "--methods", "hired", *QUICK, "--option", option)
    assert error == message


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"hird": {"alpha": 0.3}}, ValueError, "Did you mean 'hired'"),
        ({"hired": {"alpha": 2.0}}, ValueError, "alpha must be a number"),
        ({"hired": {"select_layer": 7}}, ValueError, "has 3 layers"),  # only the model can tell
    ],
)
def test_profile_refuses_bad_options(tiny, grid_never_runs, options, error, message):
    model, processor = tiny
    with pytest.raises(error, match=message):
        profile(
            model,
            processor,
            [synthetic_image(90, 60)],
            ProfileConfig(["hired"], [0.5], options=options, progress=False),
        )


# --- 2. the reference cells run unpatched, and the user's patch comes back ---------------


def test_profile_of_a_patched_model_measures_the_unpatched_reference(tiny):
    model, processor = tiny
    handle = tokendrop.patch(model, "hired", budget=0.2)
    rows = profile(
        model,
        processor,
        [synthetic_image(90, 60)],
        ProfileConfig(["uniform"], [1.0], max_new_tokens=1, repeats=1, warmup=0, progress=False),
    )
    reference = next(r for r in rows if r["method"] == REFERENCE)
    assert reference["status"] == "ok" and reference["llm_prompt_len"] == reference["prompt_len"]
    assert rows[1]["prefill_speedup_ideal"] == pytest.approx(1.0)  # budget 1.0 against the true reference
    assert model.__dict__["_tokendrop_handle"] is handle
    inputs = processor(
        images=[synthetic_image(90, 60)],
        text=[chat_prompt(processor, "Hi")],
        return_tensors="pt",
    )
    model.generate(**inputs, max_new_tokens=1)
    assert handle.last and handle.last[0].n_kept < handle.last[0].n_before  # the user's patch is in force


def test_profile_restores_the_users_patch_after_a_failure(tiny, monkeypatch):
    model, processor = tiny
    handle = tokendrop.patch(model, "hired", budget=0.2)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(profiler, "run_cell", interrupted)
    with pytest.raises(KeyboardInterrupt):
        profile(model, processor, [synthetic_image(90, 60)], ProfileConfig(["uniform"], [1.0], progress=False))
    assert model.__dict__["_tokendrop_handle"] is handle


# --- 3. Python API type errors ---------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(methods="hired"), r"methods must be a list, e.g. methods=\['hired'\]; got 'hired'"),
        (dict(budgets=0.5), r"budgets must be a list, e.g. budgets=\[1.0, 0.2\]; got 0.5"),
        (dict(batch_sizes=2), r"batch_sizes must be a list, e.g. batch_sizes=\[1, 4\]; got 2"),
    ],
)
def test_profile_config_type_errors(kwargs, message):
    with pytest.raises(TypeError, match=message):
        ProfileConfig(**kwargs)


@pytest.mark.parametrize(
    "images, message",
    [
        ("photo.png", r"images must be a list of PIL images.*got 'photo.png'"),
        (["photo.png"], r"images must be a list of PIL images.*got a str"),
        ([synthetic_image(90, 60)], r"config must be a tokendrop.ProfileConfig, got dict"),
    ],
)
def test_profile_type_errors(tiny, grid_never_runs, images, message):
    model, processor = tiny
    config = {"methods": ["hired"]} if "config" in message else ProfileConfig(progress=False)
    with pytest.raises(TypeError, match=message):
        profile(model, processor, images, config)


def test_show_wants_a_pil_image(tiny, photo):
    model, processor = tiny
    expected = r"image must be a PIL image \(open a file with PIL.Image.open\(path\)\), got a str$"
    with pytest.raises(TypeError, match=expected):
        show(model, processor, str(photo), "hired", 0.5)


# --- 4. command-line errors --------------------------------------------------------------


def test_show_out_is_a_folder(capsys, tmp_path, photo):
    error = cli_error(capsys, "show", str(photo), "--model", "tiny", "--method", "uniform", "--out", str(tmp_path))
    assert error == (f"the figure path {tmp_path} is a folder: name the PNG to write, e.g. {tmp_path / 'kept.png'}")


def test_show_out_in_a_missing_folder(capsys, tmp_path, photo):
    out = tmp_path / "missing" / "kept.png"
    error = cli_error(capsys, "show", str(photo), "--model", "tiny", "--method", "uniform", "--out", str(out))
    assert error == f"cannot write {out}: the folder {out.parent} does not exist; create it first"


def test_show_checks_out_before_running(tiny, tmp_path, monkeypatch):
    model, processor = tiny
    monkeypatch.setattr(model, "generate", lambda *a, **k: pytest.fail("the model ran"))
    with pytest.raises(ValueError, match="is a folder"):
        show(model, processor, synthetic_image(90, 60), "uniform", 0.5, out=tmp_path)


@pytest.mark.parametrize("command", [["profile", *QUICK], ["show", "IMAGE", "--method", "uniform", "--out", "OUT"]])
def test_device_map_banana(capsys, photo, tmp_path, command):
    command = [str(photo) if a == "IMAGE" else str(tmp_path / "k.png") if a == "OUT" else a for a in command]
    error = cli_error(capsys, *command, "--model", "tiny", "--device-map", "banana")
    assert error.endswith(
        "argument --device-map: device_map must be auto, balanced, balanced_low_0, sequential, "
        "cpu, cuda, cuda:N or a dict of module -> device; got 'banana'"
    )


def test_device_map_names_a_missing_gpu(capsys, monkeypatch):
    monkeypatch.setattr(loading.torch.cuda, "is_available", lambda: False)
    error = cli_error(capsys, "profile", "--model", "tiny", *QUICK, "--device-map", "cuda:0")
    assert error.endswith(
        "argument --device-map: device_map 'cuda:0' needs a GPU that torch does not see "
        "(it sees none): use cpu, or leave it out"
    )
    with pytest.raises(ValueError, match="needs a GPU"):
        loading.load_model("tiny", device_map="cuda:0")


def test_model_typo_does_not_reach_the_hub(capsys, no_hub):
    error = cli_error(capsys, "profile", "--model", "tinny", *QUICK)
    assert error == (
        f"no preset or local path named 'tinny'; presets: {', '.join(PRESETS.names())}. "
        "Did you mean 'tiny'? A Hugging Face id has the form org/name"
    )
    assert no_hub == []


def test_hub_ids_still_reach_the_hub(no_hub):
    with pytest.raises(OSError, match="offline"):
        loading.load_processor("org/model")
    assert no_hub == ["org/model"]


def test_profile_out_is_checked_before_the_grid_runs(capsys, tmp_path, grid_never_runs):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    error = cli_error(capsys, "profile", "--model", "tiny", *QUICK, "--out", str(blocker / "profile"))
    assert error.startswith(f"cannot write to {blocker / 'profile'}: ")
    assert error.endswith("; pick a folder you can write")


def test_errors_after_parsing_are_usage_errors(capsys):
    error = cli_error(capsys, "profile", "--model", "testbed", "--task", "shapes", "--prompt", "What?")
    assert error.startswith("--prompt asks about your image")


# --- issue 26: image files, figure paths and prompts, refused before a model loads -------------


@pytest.fixture
def model_never_loads(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the model loaded before the error was found")

    monkeypatch.setattr(loading, "load_model", fail)


def fifo_at(tmp_path):
    fifo = tmp_path / "photo.png"
    os.mkfifo(fifo)
    return fifo


@pytest.mark.parametrize("command", [["show", "IMAGE", "--out", "OUT"], ["profile", "--images", "IMAGE", *QUICK[:-2]]])
def test_a_fifo_given_as_an_image_is_refused_at_once(capsys, tmp_path, command, model_never_loads):
    fifo = fifo_at(tmp_path)
    argv = [str(fifo) if a == "IMAGE" else str(tmp_path / "k.png") if a == "OUT" else a for a in command]
    error = without_hanging(lambda: cli_error(capsys, *argv, "--model", "tiny"), fifo)
    assert f"{fifo} is not a regular file" in error


@pytest.mark.parametrize("size", [(90, 60), (200, 200)])  # past PIL's warning limit, past its error limit
@pytest.mark.parametrize("command", [["show", "IMAGE", "--out", "OUT"], ["profile", "--images", "IMAGE", *QUICK[:-2]]])
def test_a_decompression_bomb_is_a_usage_error(capsys, tmp_path, command, size, monkeypatch, model_never_loads):
    from PIL import Image

    bomb = tmp_path / "bomb.png"
    Image.new("RGB", size).save(bomb)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64)  # the real limit, 89 million pixels, scaled down
    argv = [str(bomb) if a == "IMAGE" else str(tmp_path / "k.png") if a == "OUT" else a for a in command]
    error = cli_error(capsys, *argv, "--model", "tiny")
    assert f"image {bomb}" in error and "decompression bomb" in error and "MAX_IMAGE_PIXELS" in error


def test_show_refuses_a_figure_format_matplotlib_cannot_write(capsys, tmp_path, photo, model_never_loads):
    out = tmp_path / "kept.txt"
    error = cli_error(capsys, "show", str(photo), "--model", "tiny", "--out", str(out))
    assert error.startswith(f"cannot write the figure as {out}: ") and "png" in error


def test_a_prompt_holding_the_image_token_is_refused_before_the_model_loads(capsys, model_never_loads):
    error = cli_error(capsys, "profile", "--model", "tiny", *QUICK, "--prompt", "<image> What is it?")
    assert "holds the image token '<image>'" in error


def test_a_corrupt_checkpoint_is_a_usage_error(capsys, tmp_path, photo):
    model, processor = build_preset("tiny")
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    error = cli_error(capsys, "show", str(photo), "--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "k.png"))
    assert error.startswith(f"cannot load the weights of {tmp_path / 'ckpt'}: ")
    assert "damaged or cut short" in error


@pytest.mark.parametrize(
    "command", [["show", "IMAGE", "--out", "OUT", "--method", "hired"], ["profile", *QUICK, "--methods", "hired"]]
)
def test_a_layer_the_tower_lacks_is_refused_before_the_model_loads(capsys, tmp_path, photo, command, model_never_loads):
    argv = [str(photo) if a == "IMAGE" else str(tmp_path / "k.png") if a == "OUT" else a for a in command]
    error = cli_error(capsys, *argv, "--model", "tiny", "--option", "hired.select_layer=99")
    assert error == "select_layer=99 is out of range: the vision tower has 3 layers"

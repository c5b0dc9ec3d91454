"""The README's method table follows the registry."""

from pathlib import Path

import tokendrop

README = (Path(__file__).parents[1] / "README.md").read_text()


def test_readme_lists_every_method_with_its_defaults():
    table = {line.split("|")[1].strip(" `"): line for line in README.splitlines() if line.startswith("| `")}
    for name, options in tokendrop.methods().items():
        assert name in table, f"README's method table lacks {name}"
        for option, default in options.items():
            shown = f'"{default}"' if isinstance(default, str) else repr(default)
            if option != "budget":
                assert f"`{option}={shown}`" in table[name], f"README: {name} option {option}={shown}"


def test_quickstart_example_runs_offline():
    import subprocess
    import sys

    example = Path(__file__).parents[1] / "examples" / "quickstart.py"
    result = subprocess.run([sys.executable, str(example)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "budget 1.0: kept 180/180 visual tokens" in result.stdout
    assert "budget 0.2: kept 36/180 visual tokens" in result.stdout


def test_readme_first_snippet_runs_as_written(tmp_path):
    """The README's first code block, run as it is written, with two literals replaced: the hub
    id by a checkpoint of the tiny preset saved here, the image URL by a local image."""
    import re

    from tokendrop.presets import build_preset, synthetic_image

    snippet = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    model, processor = build_preset("tiny")
    model.save_pretrained(tmp_path / "checkpoint")
    processor.save_pretrained(tmp_path / "checkpoint")
    synthetic_image(200, 150).save(tmp_path / "view.jpg")
    (hub_id,) = re.findall(r'model_id = "([^"]+)"', snippet)
    (url,) = re.findall(r'load_image\("([^"]+)"\)', snippet)
    snippet = snippet.replace(hub_id, str(tmp_path / "checkpoint")).replace(url, str(tmp_path / "view.jpg"))
    scope = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    assert len(scope["answers"]) == 1 and isinstance(scope["answers"][0], str)
    assert scope["handle"].last[0].n_kept == int(0.2 * scope["handle"].last[0].n_before)
    assert not hasattr(scope["model"], "_tokendrop_handle")  # unpatched at the end

"""The documentation runs and follows the code: the README's first snippet runs as written, the
hub snippet runs with two literals swapped, and the methods, presets and commands the docs list
are the registered ones, with every relative link pointing at a file (and heading) that exists."""

import math
import re
from pathlib import Path

import pytest

import tokendrop

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def prose(text: str) -> str:
    """The text outside fenced code blocks and inline code spans."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def table_names(text: str) -> list[str]:
    """The first column of every table row that starts with a code span: | `name` | ..."""
    return [line.split("|")[1].strip(" `") for line in text.splitlines() if line.startswith("| `")]


def test_readme_first_snippet_runs_as_written(capsys):
    """The README's first code block, exactly as written: offline, on the trained testbed model.
    It prints an answer per question and the handle's records, which keep what the budget says."""
    from tokendrop.eval.shapes import COLOURS

    snippet = python_blocks(README)[0]
    (budget,) = re.findall(r"tokendrop\.patch\(model, .*budget=([0-9.]+)\)", snippet)
    scope = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    printed = capsys.readouterr().out

    answers = re.findall(r"\? (\S*) \(truth: (\w+)\)$", printed, re.M)
    assert len(answers) == len(scope["samples"]) == 4, printed
    assert all(answer in COLOURS for answer, _ in answers), f"not a colour word: {answers}"
    right = sum(answer == truth for answer, truth in answers)
    assert right >= 3, f"the testbed model answered {right} of 4 right at budget {budget}: {answers}"

    counts = [(int(b), int(k)) for b, k in re.findall(r"n_before=(\d+), n_kept=(\d+)", printed)]
    assert len(counts) == 4, printed
    for before, kept in counts:
        assert kept == max(1, math.floor(float(budget) * before)), (budget, before, kept)
    assert counts == [(r.n_before, r.n_kept) for r in scope["handle"].last]
    assert tokendrop.handle_of(scope["model"]) is None  # unpatched at the end


def test_readme_hub_snippet_runs_with_a_local_checkpoint(tmp_path):
    """The README's hub snippet, run as it is written with two literals replaced: the hub id by a
    checkpoint of the tiny preset saved here, the image URL by a local image."""
    from tokendrop.presets import build_preset, synthetic_image

    (snippet,) = [block for block in python_blocks(README) if "model_id = " in block]
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
    assert tokendrop.handle_of(scope["model"]) is None  # unpatched at the end


def test_quickstart_example_runs_offline():
    import subprocess
    import sys

    example = ROOT / "examples" / "quickstart.py"
    result = subprocess.run([sys.executable, str(example)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "budget 1.0: kept 180/180 visual tokens" in result.stdout
    assert "budget 0.2: kept 36/180 visual tokens" in result.stdout


def test_methods_page_lists_every_method_with_its_defaults():
    from tokendrop.method import METHODS

    page = (DOCS / "methods.md").read_text()
    rows = {line.split("|")[1].strip(" `"): line for line in page.splitlines() if line.startswith("| `")}
    assert sorted(rows) == sorted(METHODS.names()), "docs/methods.md's table and the registry differ"
    for name, options in tokendrop.methods().items():
        for option, default in options.items():
            shown = f'"{default}"' if isinstance(default, str) else repr(default)
            if option != "budget":
                assert f"`{option}={shown}`" in rows[name], f"docs/methods.md: {name} option {option}={shown}"


def test_readme_methods_table_is_the_registry():
    from tokendrop.method import METHODS

    assert sorted(table_names(README)) == sorted(METHODS.names()), "README's method table and the registry differ"


def test_models_page_names_every_preset():
    from tokendrop.preset_specs import PRESETS

    page = (DOCS / "models.md").read_text()
    missing = [name for name in PRESETS.names() if f"`{name}`" not in page]
    assert not missing, f"docs/models.md lacks the presets {missing}"
    assert sorted(table_names(page.split("## Presets", 1)[1])) == sorted(PRESETS.names())


def test_cli_page_names_every_command():
    from tokendrop.cli import build_parser

    (subcommands,) = build_parser()._subparsers._group_actions
    page = (DOCS / "cli.md").read_text()
    missing = [name for name in subcommands.choices if f"`tokendrop {name}`" not in page]
    assert not missing, f"docs/cli.md lacks the commands {missing}"


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found, seen = set(), {}
    for heading in re.findall(r"^#{1,6} (.+)$", prose_keep_code_spans(page.read_text()), re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def prose_keep_code_spans(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(page):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"

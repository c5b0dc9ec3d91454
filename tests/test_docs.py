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

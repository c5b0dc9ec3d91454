"""The offline serving example runs as written, in the serving venv."""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

EXAMPLE = Path(__file__).parents[2] / "examples" / "serve_vllm.py"


def test_serve_example_answers_at_three_budgets():
    result = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line.split() for line in result.stdout.splitlines() if "prompt of" in line]
    assert len(lines) == 12  # 4 questions x (budget 1.0, the server's router 10%, a request's 5%)
    lengths = {" ".join(line[:2]): int(line[-2]) for line in lines}
    assert lengths == {"budget 1.0": 202, "router 10%": 40, "router 5%": 31}

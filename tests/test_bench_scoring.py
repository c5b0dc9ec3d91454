"""The scoring-overhead benchmark runs end to end (tiny preset) and its hook scores agree
with eager attention."""

import json

from tokendrop.eval import bench_scoring


def test_benchmark_runs_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench_scoring.main(["--preset", "tiny", "--repeats", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    assert set(result["variants"]) == {"plain", "hooks:hired", "hooks:globalcom2", "eager_attentions"}
    assert set(result["ratios"]) == {"hooks:hired/plain", "hooks:globalcom2/plain", "eager_attentions/plain"}
    assert result["scored_layers"] == {"hired": {"0": "probs", "1": "probs"}, "globalcom2": {"2": "logits"}}
    assert all(diff < 1e-5 for diff in result["score_max_abs_diff"]["hired"].values())
    assert {"date", "git", "versions", "device", "model", "config"} <= result["provenance"].keys()
    assert result["provenance"]["config"]["repeats"] == 1
    assert "hooks:hired/plain: time x" in capsys.readouterr().out

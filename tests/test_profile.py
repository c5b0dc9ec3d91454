"""`tokendrop profile` / `demo` and the measurement helpers, on the tiny preset."""

import json
import time

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

import tokendrop
from tokendrop import profile_grid
from tokendrop.cli import main
from tokendrop.harness import chat_prompt
from tokendrop.presets import synthetic_image
from tokendrop.profile_grid import REFERENCE, ProfileConfig, format_table, profile
from tokendrop.profiling import measure_generate, peak_memory


@pytest.fixture(scope="module")
def one_image(tiny):
    _, processor = tiny
    return processor(
        images=synthetic_image(672, 672), text=chat_prompt(processor, "Describe the image."), return_tensors="pt"
    )


def test_profile_records_are_complete_and_consistent(tiny, tmp_path):
    model, processor = tiny
    images = [synthetic_image(672, 672), synthetic_image(100, 60, seed=1)]
    rows = profile(
        model,
        processor,
        images,
        ProfileConfig(
            ["hired", "uniform"],
            [1.0, 0.25],
            [1, 2],
            max_new_tokens=3,
            repeats=2,
            warmup=0,
            out=tmp_path,
            progress=False,
        ),
    )
    assert [(r["method"], r["budget"], r["batch_size"]) for r in rows] == [
        (REFERENCE, None, 1),
        (REFERENCE, None, 2),
        *[(m, b, n) for n in (1, 2) for m in ("hired", "uniform") for b in (1.0, 0.25)],
    ]
    for row in rows:
        assert row["status"] == "ok"
        assert row["ttft_s_min"] <= row["ttft_s"] <= row["ttft_s_max"]
        assert 0 < row["ttft_s"] <= row["generate_s"]
        assert row["vision_s"] < row["ttft_s"] and row["llm_prefill_s"] < row["ttft_s"]
        assert row["new_tokens"] == 3 and row["peak_memory_bytes"] > 0 and row["kv_cache_bytes"] > 0
        assert row["visual_tokens_before"] >= row["visual_tokens_after"]
        # the LLM's prompt is the processor's minus the dropped visual tokens (equal-length rows here
        # only at batch 1; with two different images the longest row sets the padded length)
        if row["batch_size"] == 1:
            dropped = row["visual_tokens_before"] - row["visual_tokens_after"]
            assert row["llm_prompt_len"] == row["prompt_len"] - dropped
        if row["method"] == REFERENCE or row["budget"] == 1.0:
            assert row["visual_tokens_after"] == row["visual_tokens_before"]
            assert row["prefill_speedup_ideal"] == pytest.approx(1.0)
        else:
            assert row["prefill_speedup_ideal"] > 1.5
            assert row["kv_cache_bytes"] < next(
                r["kv_cache_bytes"] for r in rows if r["method"] == REFERENCE and r["batch_size"] == row["batch_size"]
            )
    saved = json.loads((tmp_path / "profile.json").read_text())
    assert saved["cells"] == json.loads(json.dumps(rows))
    assert {"date", "git", "device", "versions", "model", "config", "images"} <= saved["provenance"].keys()
    assert {"dtype", "quantization", "attn_implementation"} <= saved["provenance"]["model"].keys()
    assert saved["provenance"]["config"]["budgets"] == [1.0, 0.25]
    assert saved["provenance"]["images"][0]["grid"] == [2, 2]
    assert (tmp_path / "profile.csv").read_text().count("\n") == len(rows) + 1
    assert (tmp_path / "profile.png").stat().st_size > 10_000


def test_kv_cache_bytes_are_exact(tiny, one_image):
    model, _ = tiny
    config = model.config.get_text_config()
    with tokendrop.patched(model, "hired", budget=0.2):
        measured = measure_generate(model, one_image, max_new_tokens=1)
    head_dim = config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 4  # keys + values, fp32
    assert measured["kv_cache_bytes"] == measured["llm_prompt_len"] * per_token


def test_oom_and_errors_are_recorded_and_the_grid_goes_on(tiny, monkeypatch):
    model, processor = tiny
    real = profile_grid.patched

    def failing(model, method, budget, **options):
        if budget == 0.5:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if method == "random":
            raise RuntimeError("something else broke")
        return real(model, method, budget=budget, **options)

    monkeypatch.setattr(profile_grid, "patched", failing)
    rows = profile(
        model,
        processor,
        [synthetic_image(90, 60)],
        ProfileConfig(["hired", "random"], [0.5, 0.2], [1], max_new_tokens=2, repeats=1, warmup=0, progress=False),
    )
    status = {(r["method"], r["budget"]): (r["status"], r["error"]) for r in rows}
    assert status[("hired", 0.5)] == ("oom", "CUDA out of memory. Tried to allocate 2.00 GiB")
    assert status[("random", 0.2)] == ("error", "RuntimeError: something else broke")
    assert status[("hired", 0.2)][0] == "ok" and status[(REFERENCE, None)][0] == "ok"
    table = format_table(rows)
    assert "OOM: CUDA out of memory" in table and "ERROR: RuntimeError" in table


def table_rows(output: str) -> list[list[str]]:
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == ["method"]) + 1
    return [line.split() for line in lines[start:] if line.split() and line.split()[0] in ("none", "hired")]


def test_demo_of_a_random_preset_is_a_profile(capsys, tmp_path):
    assert (
        main(
            [
                "demo",
                "--preset",
                "tiny",
                "--methods",
                "hired",
                "--budgets",
                "1.0",
                "0.4",
                "0.1",
                "16",
                "--max-new-tokens",
                "2",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    assert (tmp_path / "profile" / "profile.json").is_file()
    output = capsys.readouterr().out
    assert "random weights" in output
    rows = table_rows(output)
    assert [row[1] for row in rows] == ["-", "1.0", "0.4", "0.1", "16"]
    after = [int(row[3].split("->")[1]) for row in rows]
    prompt = [int(row[4]) for row in rows]
    assert after[0] == after[1] > after[2] > after[3] and prompt[1] > prompt[2] > prompt[3]


@pytest.mark.parametrize("bad", [["--budgets", "0"], ["--budgets", "1.5"], ["--image-size", "672"], ["--methods", "x"]])
def test_demo_rejects_bad_arguments(bad, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--preset", "tiny", "--out", str(tmp_path), *bad])
    assert exit_info.value.code == 2


class SlowDecode(LogitsProcessor):
    """Every step after the first (prefill) takes an extra 0.5 s."""

    def __init__(self):
        self.calls = 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls > 1:
            time.sleep(0.5)
        return scores


def test_slow_decode_steps_do_not_inflate_time_to_first_token(tiny, one_image):
    model, _ = tiny
    fast = measure_generate(model, one_image, max_new_tokens=4, min_new_tokens=4)
    slow = measure_generate(
        model, one_image, max_new_tokens=4, min_new_tokens=4, logits_processor=LogitsProcessorList([SlowDecode()])
    )
    assert slow["new_tokens"] == 4
    assert slow["generate_s"] - slow["ttft_s"] >= 1.5  # the three slow steps come after the first token
    assert slow["ttft_s"] < fast["ttft_s"] + 0.3
    assert slow["decode_tok_per_s"] <= 3 / 1.5


def test_peak_memory_sees_an_allocation():
    with peak_memory("cpu") as small:
        torch.ones(1)
    with peak_memory("cpu") as large:
        block = torch.ones(64 * 2**20 // 4)
        block += 1
    assert large.added_bytes - small.added_bytes > 50 * 2**20

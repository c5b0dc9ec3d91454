"""`tokendrop demo` and the measurement helpers it relies on, on the tiny preset."""

import time
from pathlib import Path

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

import tokendrop
from tokendrop.cli import PROMPT, main
from tokendrop.presets import build_preset, synthetic_image
from tokendrop.profiling import measure_generate, peak_memory


@pytest.fixture(scope="module")
def tiny():
    model, processor = build_preset("tiny")
    text = processor.apply_chat_template(PROMPT, add_generation_prompt=True)
    return model, processor(images=synthetic_image(672, 672), text=text, return_tensors="pt")


def table_rows(output: str) -> list[list[str]]:
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == ["budget"]) + 1
    return [line.split() for line in lines[start:] if line and line.split()[0][0].isdigit()]


def test_demo_prints_one_row_per_budget_with_shrinking_counts(capsys):
    assert main(["demo", "--preset", "tiny", "--budgets", "1.0", "0.4", "0.1", "16", "--max-new-tokens", "2"]) == 0
    output = capsys.readouterr().out
    assert "random weights" in output
    rows = table_rows(output)
    assert [row[0] for row in rows] == ["1.0", "0.4", "0.1", "16"]
    kept = [int(row[1]) for row in rows]
    prompt = [int(row[3]) for row in rows]
    assert kept[0] > kept[1] > kept[2] and prompt[0] > prompt[1] > prompt[2]
    assert rows[0][2] == "180/180" and rows[3][2] == "16/180"  # 16 without a dot is a token count


@pytest.mark.parametrize("bad", [["--budgets", "0"], ["--budgets", "1.5"], ["--image-size", "672"], ["--method", "x"]])
def test_demo_rejects_bad_arguments(bad):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--preset", "tiny", *bad])
    assert exit_info.value.code == 2


class SlowDecode(LogitsProcessor):
    """Every step after the first (prefill) takes an extra 0.2 s."""

    def __init__(self):
        self.calls = 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls > 1:
            time.sleep(0.2)
        return scores


def test_slow_decode_steps_do_not_inflate_time_to_first_token(tiny):
    model, inputs = tiny
    measured = measure_generate(
        model, inputs, max_new_tokens=4, min_new_tokens=4, logits_processor=LogitsProcessorList([SlowDecode()])
    )
    assert measured["new_tokens"] == 4
    assert measured["generate_s"] - measured["ttft_s"] >= 0.6  # the three slow steps come after the first token
    assert measured["decode_tok_per_s"] <= 3 / 0.6
    assert measured["llm_prompt_len"] == inputs["input_ids"].shape[1]


def test_llm_prompt_length_is_the_pruned_prompt(tiny):
    model, inputs = tiny
    with tokendrop.patched(model, "hired", budget=0.2) as handle:
        measured = measure_generate(model, inputs, max_new_tokens=1)
    (record,) = handle.last
    rows = handle.adapter.layout(inputs["image_sizes"][0]).newline_positions.numel()
    dropped = record.n_before - record.n_kept + rows - record.n_newlines
    assert measured["llm_prompt_len"] == inputs["input_ids"].shape[1] - dropped


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="CPU peak memory is read from Linux /proc")
def test_peak_memory_sees_an_allocation():
    with peak_memory("cpu") as memory:
        block = torch.ones(16 * 2**20)  # 64 MB, every page touched
    del block
    assert memory.kind == "cpu_peak_rss"
    assert memory.peak_bytes > 0
    assert memory.added_bytes >= 48 * 2**20

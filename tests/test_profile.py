"""`tokendrop profile` / `demo` and the measurement helpers, on the tiny preset."""

import json
import time

import matplotlib
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

import tokendrop
from tokendrop import profiler
from tokendrop.cli import main
from tokendrop.harness import chat_prompt
from tokendrop.measure import measure_generate, peak_memory
from tokendrop.patch import ATTRIBUTE
from tokendrop.presets import synthetic_image
from tokendrop.profiler import REFERENCE, ProfileConfig, ThroughputConfig, format_table, profile, throughput


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
    real = profiler.patched

    def failing(model, method, budget, **options):
        if budget == 0.5:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if method == "random":
            raise RuntimeError("something else broke")
        return real(model, method, budget=budget, **options)

    monkeypatch.setattr(profiler, "patched", failing)
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


# --- honest numbers: spread, error bars, memory panels ---------------------------------------


def synthetic_rows(spreads: dict) -> list[dict]:
    """Profile rows of two methods at two batch sizes and the unpatched model, made from
    Cells: `spreads` maps (method, batch) to the TTFT's (min, max) around a median of 1.0."""
    rows = []
    for batch in (1, 4):
        for method, budget, kept in (
            (REFERENCE, None, 100),
            ("hired", 0.5, 50),
            ("hired", 0.2, 20),
            ("random", 0.2, 20),
        ):
            low, high = spreads.get((method, batch), (0.95, 1.05))
            cell = profiler.Cell(method, budget, batch)
            cell.figures = {
                key: {"median": 1.0, "min": 0.95, "max": 1.05} for key in ("generate_s", "added_memory_bytes")
            }
            cell.figures["ttft_s"] = {"median": 1.0, "min": low, "max": high}
            cell.tokens = {
                "visual_tokens_before": 100,
                "visual_tokens_after": kept,
                "features_before": 100,
                "features_kept": kept,
                "llm_prompt_len": 10 + kept,
                "kv_cache_bytes": kept * 2**20,
                "memory_kind": "cpu_peak_rss",
            }
            rows.append(cell.row())
    return rows


def test_a_cell_whose_spread_exceeds_a_fifth_of_the_median_is_flagged():
    rows = synthetic_rows({("hired", 4): (0.7, 1.4)})  # TTFT spread 70% of the median
    flagged = [(r["method"], r["budget"], r["batch_size"]) for r in rows if r["wide_spread"]]
    assert flagged == [("hired", 0.5, 4), ("hired", 0.2, 4)]
    table = format_table(rows, wide=True)
    assert "warning: hired 0.5 batch 4: spread (max - min) over 20% of the median: TTFT s 70%" in table
    assert "warning: hired 0.2 batch 4" in table and "warning: hired 0.5 batch 1" not in table
    assert "1.000 (0.700-1.400) !" in table  # median, min-max, flag
    assert "1.000 (0.950-1.050) " in table and "1.000 (0.950-1.050) !" not in table
    assert "warning" not in format_table(synthetic_rows({}))


def widest_rows(throughput: bool = False) -> list[dict]:
    """Rows as wide as a real profile's get: long method names, large figures, every spread
    flagged, and a failed cell with a long message."""
    rows = []
    for method, budget in ((REFERENCE, None), ("globalcom2", 0.05), ("divprune", 1024)):
        cell = profiler.Cell(method, budget, 64)
        cell.figures = {key: {"median": 123.4567, "min": 12.345, "max": 999.999} for key in profiler.TIMED}
        cell.tokens = {
            "visual_tokens_before": 28800,
            "visual_tokens_after": 28800 if budget is None else 1440,
            "llm_prompt_len": 29000,
            "kv_cache_bytes": 123456 * 2**20,
            "memory_kind": "cuda_max_allocated",
        }
        if throughput:
            cell.tried = [[1, True], [2, True], [4, True], [8, True], [16, True], [32, True], [64, True], [128, False]]
        rows.append(cell.row() | {"memory_limit": "80GB"})
        for key in ("prefill_speedup_ideal", "prefill_speedup_measured", "ttft_speedup", "batch_ratio"):
            rows[-1][key] = 123.45
        rows[-1]["throughput_speedup"] = 123.45
    failed = profiler.Cell("visionzip", 0.05, 64, status="error", error="RuntimeError: " + "x" * 300)
    return rows + [failed.row()]


@pytest.mark.parametrize("throughput", [False, True])
def test_the_printed_table_fits_120_columns_and_wide_shows_every_figure(throughput):
    table = profiler.format_throughput_table if throughput else format_table
    rows = widest_rows(throughput)
    narrow = table(rows)
    assert max(map(len, narrow.splitlines())) <= 120, narrow
    assert "TTFT s" in narrow and "123.457 !" in narrow and "(12.345-" not in narrow
    assert "visionzip 0.05 batch 64: ERROR: RuntimeError: xxx" in narrow  # the message, below the table
    wide = table(rows, wide=True)
    assert max(map(len, wide.splitlines())) > 120 and "123.457 (12.345-999.999) !" in wide
    columns = profiler.THROUGHPUT_COLUMNS if throughput else profiler.PROFILE_COLUMNS
    assert all(header in wide for header, _, _ in columns)


def test_the_profile_plot_has_error_bars_colours_per_method_and_styles_per_batch():
    from matplotlib.container import ErrorbarContainer

    figure = profiler.profile_figure(synthetic_rows({("hired", 1): (0.5, 2.0)}), "title")
    ttft, latency, added, kv = figure.axes
    assert [ax.get_ylabel() for ax in figure.axes] == [
        "time to first token (s)",
        "end-to-end latency (s)",
        "memory added over the loaded model (MB)",
        "KV cache after prefill (MB)",
    ]
    bars = [c for c in ttft.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 4  # hired and random at batch 1 and 4
    hired_1 = next(c for c in bars if c.get_label() == "hired, batch 1")
    segments = hired_1.lines[2][0].get_segments()  # one vertical bar per point, min to max
    assert sorted((s[0][1], s[1][1]) for s in segments) == [(0.5, 2.0), (0.5, 2.0)]
    colour = {c.get_label(): c.lines[0].get_color() for c in bars}
    style = {c.get_label(): c.lines[0].get_linestyle() for c in bars}
    assert colour["hired, batch 1"] == colour["hired, batch 4"] != colour["random, batch 1"]
    assert style["hired, batch 1"] == style["random, batch 1"] != style["hired, batch 4"]
    assert not any(isinstance(c, ErrorbarContainer) for c in kv.containers)  # a count, not a repeated figure
    kv_hired = next(line for line in kv.lines if line.get_label() == "hired, batch 1")
    assert sorted(kv_hired.get_ydata()) == [20, 50]


def test_peak_cpu_memory_is_unavailable_off_linux_not_an_error(tiny, one_image, monkeypatch, tmp_path):
    from tokendrop import measure

    monkeypatch.setattr(measure, "PROC_CLEAR_REFS", tmp_path / "no-such-file")
    model, processor = tiny
    measured = measure_generate(model, one_image, max_new_tokens=1)
    assert measured["memory_kind"] == "unavailable" and measured["peak_memory_bytes"] is None
    rows = profile(
        model,
        processor,
        [synthetic_image(90, 60)],
        ProfileConfig(["hired"], [0.5], max_new_tokens=1, repeats=1, warmup=0, progress=False),
    )
    assert [r["status"] for r in rows] == ["ok", "ok"] and rows[1].get("peak_memory_bytes") is None
    assert rows[1]["memory_kind"] == "unavailable" and "unavailable" in format_table(rows, wide=True)
    with pytest.raises(ValueError, match="Linux reports in /proc/self"):
        profile(model, processor, [synthetic_image(90, 60)], ProfileConfig(["hired"], [0.5], memory_limit=8))


def test_profile_reads_the_cache_by_the_releases_name_without_a_deprecation_warning(tiny, one_image):
    """Reading `output.past_key_values` on transformers 5.2x logs "`past_key_values`/...
    deprecated" (once per process: its memo is cleared here so that any read shows)."""
    import logging

    model, _ = tiny
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    if hasattr(logging.Logger.warning_once, "cache_clear"):
        logging.Logger.warning_once.cache_clear()
    try:
        with tokendrop.patched(model, "hired", budget=0.5):
            measured = measure_generate(model, one_image, max_new_tokens=2)
        measure_generate(model, one_image, max_new_tokens=2)
    finally:
        logger.removeHandler(handler)
    assert measured["kv_cache_bytes"] > 0
    assert not [message for message in seen if "past_key_values" in message], seen


# --- throughput: the largest batch that fits --------------------------------------------------


@pytest.mark.parametrize("fits_up_to", [0, 1, 2, 3, 5, 8, 13, 16, 31, 32])
def test_doubling_then_bisecting_finds_exactly_the_largest_batch(fits_up_to):
    def fits_at(batch):
        if batch > fits_up_to:
            raise torch.OutOfMemoryError(f"batch {batch}")

    found, tried = profiler.largest_batch(fits_at, max_batch=32)
    assert found == fits_up_to
    assert all(fits == (batch <= fits_up_to) for batch, fits in tried)
    assert len({batch for batch, _ in tried}) == len(tried)  # no batch run twice
    assert len(tried) <= 2 * max(1, fits_up_to).bit_length() + 1
    if 0 < fits_up_to < 32:
        assert (fits_up_to, True) in tried and (fits_up_to + 1, False) in tried


@pytest.mark.parametrize(
    "max_batch, expected_path", [(1, [(1, True)]), (6, [(1, True), (2, True), (4, True), (5, True), (6, True)])]
)
def test_the_search_stops_at_the_largest_batch_asked_for(max_batch, expected_path):
    assert profiler.largest_batch(lambda batch: None, max_batch) == (max_batch, expected_path)


@pytest.fixture
def users_backend():
    """A backend the user chose, which library plots must leave as it is."""
    before = matplotlib.get_backend()
    matplotlib.use("pdf")
    yield "pdf"
    matplotlib.use(before)


def test_throughput_finds_each_cells_largest_batch_with_a_fake_memory_model(tiny, monkeypatch, tmp_path, users_backend):
    """A fake memory model: a batch runs out of memory above 3 rows unpatched and above 12
    at budget 0.25 (measure_generate raises as a capped allocator would)."""
    model, processor = tiny
    real = profiler.measure_generate
    limits = {None: 3, 0.25: 12}
    seen_batches = []

    def fake_memory(model, inputs, **settings):
        handle = model.__dict__.get(ATTRIBUTE)
        batch = inputs["input_ids"].shape[0]
        seen_batches.append(batch)
        if batch > limits[handle.method.budget if handle else None]:
            raise torch.OutOfMemoryError(f"fake: batch {batch}")
        return real(model, inputs, **settings)

    monkeypatch.setattr(profiler, "measure_generate", fake_memory)
    monkeypatch.setattr(ThroughputConfig, "check_device", lambda self, device: None)  # the fake is the limit
    config = ThroughputConfig(
        ["hired"],
        [0.25],
        max_new_tokens=2,
        repeats=2,
        max_batch_size=16,
        memory_limit="64GB",
        out=tmp_path,
        progress=False,
    )
    rows = throughput(model, processor, [synthetic_image(90, 60)], config)
    assert [(r["method"], r["budget"], r["batch_size"], r["status"]) for r in rows] == [
        (REFERENCE, None, 3, "ok"),
        ("hired", 0.25, 12, "ok"),
    ]
    assert rows[0]["batches_tried"] == "1 2 4x 3" and rows[1]["batches_tried"] == "1 2 4 8 16x 12 14x 13x"
    assert rows[1]["batch_ratio"] == 4.0
    for row in rows:
        assert row["new_tokens"] == 2
        assert row["requests_per_s_min"] <= row["requests_per_s"] <= row["requests_per_s_max"]
        assert row["tokens_per_s"] == pytest.approx(2 * row["requests_per_s"])
        assert row["requests_per_s_min"] == pytest.approx(row["batch_size"] / row["generate_s_max"])
        assert row["memory_limit"] == "64GB"
    saved = json.loads((tmp_path / "throughput.json").read_text())
    assert saved["cells"] == json.loads(json.dumps(rows)) and saved["provenance"]["config"]["memory_limit"] == "64GB"
    assert (tmp_path / "throughput.png").stat().st_size > 10_000 and matplotlib.get_backend() == users_backend
    table = profiler.format_throughput_table(rows, wide=True)
    assert "1 2 4 8 16x 12 14x 13x" in table and "memory limit 64GB" in table


def test_throughput_under_a_cpu_memory_limit_end_to_end(tiny):
    """The tool's own RSS cap on the tiny preset: a limit a little above what the process
    holds now stops the unpatched search below the largest batch asked for, and no measured
    run peaks above it."""
    from tokendrop.measure import proc_status_bytes

    model, processor = tiny
    image = synthetic_image(672, 672)
    measure_generate(model, batch_inputs(processor, [image], 1, model), max_new_tokens=1)  # first-run allocations
    limit = proc_status_bytes("VmRSS") + 24 * 2**20
    config = ThroughputConfig(
        ["hired"],
        [0.1],
        max_new_tokens=1,
        repeats=1,
        max_batch_size=256,
        memory_limit=f"{limit / 2**20}MB",
        progress=False,
    )
    rows = throughput(model, processor, [image], config)
    for row in rows:
        assert row["status"] == "ok", row["error"]
        assert row["peak_memory_bytes_max"] <= limit
        batch, path = row["batch_size"], row["batches_tried"].split()
        assert 1 <= batch < 256 and str(batch) in path and f"{batch + 1}x" in path
    assert not any(b._forward_pre_hooks for b in model.modules())  # the cap's hooks are gone


def batch_inputs(processor, images, batch, model):
    return profiler.batch_inputs(processor, images, "Describe the image.", batch, model)


def test_a_run_past_the_cpu_limit_is_out_of_memory(tiny, one_image):
    from tokendrop.measure import proc_status_bytes

    model, _ = tiny
    with pytest.raises(torch.OutOfMemoryError, match="CPU memory limit exceeded: peak RSS"):
        measure_generate(model, one_image, max_new_tokens=1, memory_limit_bytes=proc_status_bytes("VmRSS") // 2)
    assert not any(b._forward_pre_hooks for b in model.modules())


def test_the_cuda_cap_sets_the_allocators_fraction_and_restores_it(monkeypatch):
    from tokendrop import measure

    calls = []
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda d: type("P", (), {"total_memory": 96 * 2**30, "name": "GPU96"})
    )
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda d: 0.9)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: calls.append((f, d)))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    device = torch.device("cuda", 0)
    with measure._cuda_cap([device], 24 * 2**30):
        assert calls == [(0.25, device)]
    assert calls == [(0.25, device), (0.9, device)]
    with pytest.raises(ValueError, match="memory limit 100.0 GiB exceeds GPU96.s 96.0 GiB"):
        with measure._cuda_cap([device], 100 * 2**30):
            pass


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--throughput", "--memory-limit", "0"], "memory limit must be a positive size"),
        (["--throughput", "--memory-limit", "-2"], "memory limit must be a positive size"),
        (["--throughput", "--memory-limit", "24TB"], "memory limit '24TB': unknown unit 'tb'; use GB or MB"),
        (["--throughput", "--memory-limit", "lots"], "memory limit must be a number with an optional unit"),
        (["--throughput", "--memory-limit", "nan"], "memory limit must be a number with an optional unit"),
        (["--memory-limit", "0GB"], "memory limit must be a positive size"),
        (["--throughput", "--batch-sizes", "2"], "--throughput searches the batch size: drop --batch-sizes"),
        (["--throughput"], "the throughput search on a CPU needs a memory limit (--memory-limit, e.g. 8GB)"),
        (["--max-batch-size", "8"], "--max-batch-size bounds the search of --throughput: add --throughput"),
    ],
)
def test_throughput_flags_are_checked_before_a_model_loads(capsys, monkeypatch, flags, message):
    from tokendrop import loading

    def fail(*args, **kwargs):
        raise AssertionError("a model was loaded before the error was found")

    monkeypatch.setattr(loading, "load_model", fail)
    monkeypatch.setattr(loading, "load_processor", fail)
    with pytest.raises(SystemExit) as exit_info:
        main(["profile", "--model", "tiny", "--image-size", "90x60", *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"tokendrop profile: error: {message}")


@pytest.mark.parametrize("kwargs", [dict(max_batch_size=0), dict(memory_limit=True), dict(memory_limit=[24])])
def test_throughput_config_refuses_bad_values(kwargs):
    with pytest.raises((TypeError, ValueError), match="max_batch_size|memory limit"):
        ThroughputConfig(**kwargs)


def test_profile_command_throughput_prints_the_table(capsys, tmp_path):
    from tokendrop.measure import proc_status_bytes

    limit = f"{(proc_status_bytes('VmRSS') + 2**30) / 2**30:.2f}GB"
    argv = ["profile", "--model", "tiny", "--throughput", "--memory-limit", limit, "--max-batch-size", "2"]
    argv += ["--budgets", "0.5", "--max-new-tokens", "1", "--image-size", "90x60", "--out", str(tmp_path)]
    assert main([*argv, "--no-progress"]) == 0
    output = capsys.readouterr().out
    assert f"memory limit {limit}" in output and "max batch" in output
    assert (tmp_path / "throughput.csv").read_text().count("\n") == 3


def test_demo_times_with_at_least_three_repeats(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--preset", "tiny", "--repeats", "2", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "tokendrop demo: error: the timing demo runs at least 3 repeats" in capsys.readouterr().err


def test_a_memory_limit_is_asked_for_or_refused_by_device():
    ThroughputConfig().check_device("cuda")  # a GPU's own memory is the limit
    ThroughputConfig(memory_limit="1GB").check_device("cpu")
    with pytest.raises(ValueError, match="the throughput search on a CPU needs a memory limit"):
        ThroughputConfig().check_device("cpu")
    with pytest.raises(ValueError, match="not mps's: drop the limit"):
        ThroughputConfig(memory_limit="1GB").check_device("mps")
    ProfileConfig().check_device("cpu")  # the grid needs none


def test_a_cpu_memory_limit_above_the_machines_memory_is_refused(capsys, monkeypatch):
    from tokendrop import loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(ValueError, match="above this machine's memory .* pick a smaller --memory-limit"):
        ThroughputConfig(memory_limit="100000GB").check_device("cpu")
    with pytest.raises(SystemExit) as exit_info:
        main(["profile", "--model", "tiny", "--image-size", "90x60", "--throughput", "--memory-limit", "100000GB"])
    assert exit_info.value.code == 2 and "above this machine's memory" in capsys.readouterr().err


def test_throughput_reports_the_largest_batch_that_fits_in_every_repeat(tiny, monkeypatch):
    """The CPU allocator's own failure (a RuntimeError, where CUDA's is OutOfMemoryError) is
    out of memory too: batches above 12 never fit, and 12 fits in the search but not in its
    second run, a repeat; every repeat fits at 11, so 11 is the largest batch."""
    from tokendrop.adapters import adapter_for

    model, processor = tiny
    prefills = {}

    def allocator(module, args, kwargs):
        batch, length = kwargs["inputs_embeds"].shape[:2]
        if length == 1:  # a decode step
            return
        if batch == 1:  # a cell's search begins
            prefills.clear()
        prefills[batch] = prefills.get(batch, 0) + 1
        if batch > 12 or (batch == 12 and prefills[batch] == 2):
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")

    hook = adapter_for(model).language_model.register_forward_pre_hook(allocator, with_kwargs=True)
    try:
        config = ThroughputConfig(["hired"], [0.5], max_new_tokens=1, repeats=2, max_batch_size=16, progress=False)
        monkeypatch.setattr(ThroughputConfig, "check_device", lambda self, device: None)  # no limit: the fake's
        rows = throughput(model, processor, [synthetic_image(90, 60)], config)
    finally:
        hook.remove()
    for row in rows:
        assert (row["status"], row["batch_size"]) == ("ok", 11), row["error"]
        assert row["batches_tried"] == "1 2 4 8 16x 12 14x 13x 12x 11"


def test_profile_inside_the_vision_tower_reports_the_vision_time_per_row(tiny, tmp_path, capsys):
    model, processor = tiny
    config = profiler.ProfileConfig(
        ["hired", "cls"], [1.0, 0.2], vision_prune_layer=0, max_new_tokens=2, repeats=1, warmup=0, progress=False
    )
    rows = profiler.profile(model, processor, [synthetic_image(200, 150)], config)
    for row in rows:
        assert row["status"] == "ok" and 0 < row["vision_s_min"] <= row["vision_s"] < row["ttft_s"]
        assert row["vision_prune_layer"] == (None if row["method"] == REFERENCE else 0)
    assert "inside the vision tower at layer 0" in profiler.format_table(rows)
    with pytest.raises(ValueError, match="not below the feature layer"):  # checked before the grid runs
        profiler.profile(model, processor, [synthetic_image(200, 150)], profiler.ProfileConfig(vision_prune_layer=1))
    with pytest.raises(TypeError, match="vision_prune_layer must be an int"):
        profiler.ProfileConfig(vision_prune_layer="0")
    argv = ["profile", "--model", "tiny", "--methods", "hired", "--budgets", "0.2", "--vision-prune-layer", "0"]
    assert main([*argv, "--repeats", "1", "--max-new-tokens", "1", "--no-progress", "--out", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "profile.json").read_text())
    assert saved["provenance"]["config"]["vision_prune_layer"] == 0
    assert all(row["vision_s"] > 0 for row in saved["cells"])

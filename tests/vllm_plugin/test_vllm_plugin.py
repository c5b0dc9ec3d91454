"""The vLLM plugin against stock vLLM and against tokendrop on the HF model (issue 16).

Runs only where vLLM is installed (`make test-vllm` makes that venv); skipped elsewhere.
Engines run offline and in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0), eager, fp32, with a
64 MiB KV cache, on the trained testbed model saved to a temporary directory. Each engine is
built once per module, used, and dropped before the next, to keep memory and time small."""

import gc
import json
import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import pytest  # noqa: E402

vllm = pytest.importorskip("vllm")

import torch  # noqa: E402
from random_presets import tiny_random  # noqa: E402

import tokendrop  # noqa: E402
from tokendrop.adapters import LlavaNextAdapter  # noqa: E402
from tokendrop.eval import shapes  # noqa: E402
from tokendrop.eval.vllm_bench import answer, engine, hf_answers  # noqa: E402
from tokendrop.harness import chat_prompt  # noqa: E402
from tokendrop.integrations import vllm as vllm_plugin  # noqa: E402
from tokendrop.integrations.vllm import save_for_vllm  # noqa: E402
from tokendrop.integrations.vllm.llava_next import layout as vllm_layout  # noqa: E402
from tokendrop.presets import build_preset, synthetic_image  # noqa: E402
from tokendrop.selection import keep_count  # noqa: E402

N_ANSWERS = int(os.environ.get("TOKENDROP_VLLM_TEST_SAMPLES", "50"))  # the eval script runs 200
N_INDICES = 8
BUDGET = 0.25
OPTIONS = {"newlines": "all"}
# (h, w): a 2x2 grid unpadded, a 1x2 and a 2x1 exact, and padded 2x2 / 1x2 canvases
MIXED = [(96, 96), (48, 96), (96, 48), (60, 100), (38, 96)]


@pytest.fixture(scope="module")
def testbed():
    return build_preset("testbed")


@pytest.fixture(scope="module")
def model_dir(testbed, tmp_path_factory):
    return save_for_vllm(*testbed, tmp_path_factory.mktemp("testbed"))


@pytest.fixture(scope="module")
def samples():
    return list(shapes.shapes_samples("test", N_ANSWERS))


@pytest.fixture(scope="module")
def mixed():
    return [
        dict(image=synthetic_image(w, h, seed=i), question="What colour is the circle?")
        for i, (h, w) in enumerate(MIXED)
    ]


def run(model_dir, processor, tokendrop_options, batches, record_path=None):
    """{name: (answers, outputs)} for each batch of samples, on one engine, dropped afterwards."""
    llm = engine(model_dir, tokendrop_options)
    try:
        results = {}
        for name, batch in batches.items():
            if record_path is not None:
                os.environ[vllm_plugin.RECORD_ENV] = str(record_path(name))
            answers, outputs, _ = answer(llm, processor, batch)
            results[name] = (answers, outputs)
        return results
    finally:
        os.environ.pop(vllm_plugin.RECORD_ENV, None)
        del llm
        gc.collect()


@pytest.fixture(scope="module")
def stock(model_dir, testbed, samples, mixed):
    return run(model_dir, testbed[1], None, {"samples": samples, "mixed": mixed})


@pytest.fixture(scope="module")
def full(model_dir, testbed, samples, mixed):
    return run(model_dir, testbed[1], {"method": "hired", "budget": 1.0}, {"samples": samples, "mixed": mixed})


@pytest.fixture(scope="module")
def pruned(model_dir, testbed, samples, mixed, tmp_path_factory):
    """hired at 0.25: the answers, the mixed batch, and each of the first samples alone with its record."""
    where = tmp_path_factory.mktemp("records")
    # each of the first samples alone first: later requests for the same image hit vLLM's encoder cache
    batches = {f"one-{i}": [s] for i, s in enumerate(samples[:N_INDICES])} | {"samples": samples, "mixed": mixed}
    results = run(
        model_dir,
        testbed[1],
        {"method": "hired", "budget": BUDGET, **OPTIONS},
        batches,
        record_path=lambda name: where / f"{name}.jsonl",
    )
    records = {
        name: [json.loads(line) for line in (where / f"{name}.jsonl").read_text().splitlines()]
        for name in batches
        if (where / f"{name}.jsonl").exists()
    }
    return results, records


# --- without an engine ------------------------------------------------------------------


def test_plugin_is_an_entry_point_and_registers_the_model():
    from importlib.metadata import entry_points

    from vllm import ModelRegistry

    names = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert names.get("tokendrop") == "tokendrop.integrations.vllm:register"
    vllm_plugin.register()
    assert vllm_plugin.ARCHITECTURE in ModelRegistry.get_supported_archs()


@pytest.mark.parametrize("preset", ["testbed", "tiny"])
def test_vllm_packing_gives_tokendrops_layout(preset):
    model, _ = build_preset(preset)
    adapter = LlavaNextAdapter(model)
    for size in [(96, 96), (48, 96), (96, 48), (60, 100), (38, 96), (96, 38), (20, 200)]:
        ours, theirs = vllm_layout(model.config, size), adapter.layout(size)
        assert ours.grid == theirs.grid and torch.equal(ours.packed_source, theirs.packed_source), size


@pytest.mark.parametrize(
    "options, message",
    [
        ({"method": "text", "budget": 0.25}, "reads the question"),
        ({"method": "router", "budget": 0.25}, "reads the question"),
        ({"method": "dpp", "budget": 0.25, "allocation": "global"}, "reads the question"),
        ({"method": "hired", "budget": 0.25, "threshold": 0.5}, "threshold"),
        ({"method": "hired", "budget": 0.25, "newlines": "rows"}, "newlines='rows'"),
        ({"method": "hird", "budget": 0.25}, "Did you mean 'hired'"),
        ({"method": "hired", "budget": 1.5}, "budget"),
    ],
)
def test_refused_configurations(testbed, options, message):
    from tokendrop.integrations.vllm.llava_next import FAMILY

    config = testbed[0].config
    config.tokendrop = options
    try:
        with pytest.raises((ValueError, TypeError), match=message):
            FAMILY.method(config)
    finally:
        del config.tokendrop


@pytest.mark.parametrize(
    "options",
    [
        {"method": "dpp", "budget": 0.25, "relevance": "cls"},
        {"method": "uniform", "budget": 0.25, "newlines": "rows"},
        {"method": "pool", "budget": 0.1, "newlines": "rows"},
        {"method": "globalcom2", "budget": 0.1, "newlines": "drop"},
    ],
)
def test_accepted_configurations_count_as_the_hf_patch_keeps(testbed, options):
    """The placeholder count equals the tokens the HF patch feeds the LLM, image by image."""
    from tokendrop.integrations.vllm.llava_next import FAMILY

    model, processor = testbed
    model.config.tokendrop = options
    try:
        method = FAMILY.method(model.config)
    finally:
        del model.config.tokendrop
    images = [synthetic_image(w, h, seed=i) for i, (h, w) in enumerate(MIXED)]
    texts = [chat_prompt(processor, "What colour is the circle?")] * len(images)
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    rest = {k: v for k, v in options.items() if k not in ("method", "budget")} | {"newlines": method.newlines}
    with tokendrop.patched(model, options["method"], budget=options["budget"], **rest) as handle:
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
        for (h, w), rec in zip(MIXED, handle.last):
            assert (
                vllm_plugin.placeholder_count(method, vllm_layout(model.config, (h, w))) == rec.n_kept + rec.n_newlines
            )


# --- on engines -------------------------------------------------------------------------


def test_budget_one_is_stock_vllm(stock, full):
    for name in ("samples", "mixed"):
        (stock_answers, stock_out), (full_answers, full_out) = stock[name], full[name]
        assert full_answers == stock_answers
        assert [o.outputs[0].token_ids for o in full_out] == [o.outputs[0].token_ids for o in stock_out]
        assert [len(o.prompt_token_ids) for o in full_out] == [len(o.prompt_token_ids) for o in stock_out]


def test_kept_indices_are_tokendrops_hf_selection(pruned, testbed, samples):
    _, records = pruned
    model, processor = testbed
    _, hf_records = hf_answers(model, processor, samples[:N_INDICES], "hired", BUDGET, OPTIONS)
    for i, hf in enumerate(hf_records):
        (ours,) = records[f"one-{i}"]
        assert ours["n_kept"] == hf.n_kept and ours["n_newlines"] == hf.n_newlines
        assert ours["indices"] == hf.indices, f"sample {i}"


def test_mixed_sizes_prompt_counts(pruned, stock, testbed, mixed):
    """A batch of different sizes and grids: vLLM's prompt = text tokens + n_kept + kept newlines."""
    (results, records), (model, processor) = pruned, testbed
    adapter = LlavaNextAdapter(model)
    _, outputs = results["mixed"]
    _, stock_outputs = stock["mixed"]
    for (h, w), out, stock_out in zip(MIXED, outputs, stock_outputs):
        text_tokens = len(processor.tokenizer(chat_prompt(processor, "What colour is the circle?"))["input_ids"]) - 1
        image = adapter.layout((h, w))
        expected = text_tokens + keep_count(BUDGET, image.n_features) + image.newline_positions.numel()
        assert len(out.prompt_token_ids) == expected
        assert len(stock_out.prompt_token_ids) == text_tokens + image.packed_source.numel()
        assert out.outputs[0].token_ids  # it answered
    assert sorted(tuple(r["image_size"]) for r in records["mixed"]) == sorted(MIXED)


def test_answers_match_hf_patched(pruned, testbed, samples):
    (results, _), (model, processor) = pruned, testbed
    ours, _ = results["samples"]
    hf, _ = hf_answers(model, processor, samples, "hired", BUDGET, OPTIONS)
    agreement = sum(a == b for a, b in zip(ours, hf)) / len(samples)
    assert agreement >= 0.98, list(zip(ours, hf))


# --- a tiny random LLaVA-NeXT: other grids (1x3, 3x1), other methods --------------------

TINY_MIXED = [(96, 96), (48, 144), (144, 48), (60, 100), (30, 140), (96, 38)]


@pytest.mark.parametrize(
    "options",
    [
        {"method": "globalcom2", "budget": 0.1},  # CLS logits, its own allocation
        {"method": "pool", "budget": 0.25, "newlines": "rows"},  # merged tokens, newline rows counted up front
    ],
)
def test_tiny_random_mixed_batch_keeps_what_the_hf_patch_keeps(options, tmp_path):
    model, processor = tiny_random("tiny")
    path = save_for_vllm(model, processor, tmp_path / "tiny")
    batch = [
        dict(image=synthetic_image(w, h, seed=10 + i), question="What is red?") for i, (h, w) in enumerate(TINY_MIXED)
    ]
    record = tmp_path / "record.jsonl"
    results = run(path, processor, options, {"mixed": batch}, record_path=lambda _: record)
    _, outputs = results["mixed"]
    ours = {tuple(r["image_size"]): r for r in map(json.loads, record.read_text().splitlines())}
    rest = (
        {k: v for k, v in options.items() if k not in ("method", "budget")}
        | {"newlines": "all"}
        | {k: v for k, v in options.items() if k == "newlines"}
    )
    texts = [chat_prompt(processor, s["question"]) for s in batch]
    text_tokens = len(processor.tokenizer(texts[0])["input_ids"]) - 1
    with tokendrop.patched(model, options["method"], budget=options["budget"], **rest) as handle:
        for sample, out in zip(batch, outputs):  # one by one: the HF records are per call
            inputs = processor(images=[sample["image"]], text=texts[:1], return_tensors="pt")
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
            (hf,) = handle.last
            size = (sample["image"].height, sample["image"].width)
            assert ours[size]["indices"] == hf.indices, size
            assert len(out.prompt_token_ids) == text_tokens + hf.n_kept + hf.n_newlines, size


def test_deeper_tower_for_scores_leaves_the_llm_input_as_stock(tmp_path):
    """globalcom2 scores at the last layer, which vLLM does not build; the plugin's deeper
    tower must still hand the LLM the feature layer: at budget 1.0, stock vLLM's tokens."""
    model, processor = tiny_random("tiny")
    path = save_for_vllm(model, processor, tmp_path / "tiny")
    batch = [
        dict(image=synthetic_image(w, h, seed=20 + i), question="What is red?") for i, (h, w) in enumerate(TINY_MIXED)
    ]
    stock_out = run(path, processor, None, {"mixed": batch})["mixed"][1]
    ours = run(path, processor, {"method": "globalcom2", "budget": 1.0}, {"mixed": batch})["mixed"][1]
    assert [o.outputs[0].token_ids for o in ours] == [o.outputs[0].token_ids for o in stock_out]
    assert [len(o.prompt_token_ids) for o in ours] == [len(o.prompt_token_ids) for o in stock_out]


# --- question-aware methods, per-request options, multi-turn chats -----------------------------


QUESTIONS = ["What colour is the circle?", "What colour is the square?"]


@pytest.fixture(scope="module")
def router_engine(model_dir):
    """The trained router at 0.1 as the server's method, every cache on (vLLM's defaults)."""
    llm = engine(model_dir, {"method": "router", "budget": 0.1, "router": "testbed"})
    yield llm
    del llm
    gc.collect()


def served(llm, processor, requests: list[dict], tmp_path) -> tuple[list[dict], list]:
    """(the records of the images whose vision pass ran, vLLM's outputs) of one generate call
    with `requests` ({image, question or prompt, mm_processor_kwargs?})."""
    from vllm import SamplingParams

    record = tmp_path / f"record-{len(list(tmp_path.iterdir()))}.jsonl"
    os.environ[vllm_plugin.RECORD_ENV] = str(record)
    try:
        prompts = [
            {
                "prompt": r.get("prompt") or chat_prompt(processor, r["question"]),
                "multi_modal_data": {"image": r["image"]},
            }
            | ({"mm_processor_kwargs": r["mm_processor_kwargs"]} if "mm_processor_kwargs" in r else {})
            for r in requests
        ]
        outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=3), use_tqdm=False)
    finally:
        os.environ.pop(vllm_plugin.RECORD_ENV, None)
    return ([json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []), outputs


def hf_kept(testbed, image, question, method="router", budget=0.1, **options) -> list[int]:
    model, processor = testbed
    options = {"router": "testbed"} if method == "router" else options
    inputs = processor(images=[image], text=[chat_prompt(processor, question)], return_tensors="pt")
    with tokendrop.patched(model, method, budget=budget, processor=processor, newlines="all", **options) as handle:
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
    return handle.last[0].indices


def test_two_questions_one_image_get_their_own_selections_with_caches_on(router_engine, testbed, samples, tmp_path):
    """The same image with another question is another cache entry: its selection is computed,
    and it is the one the HF patch makes for that question; the same question again is served
    from the cache."""
    processor, image = testbed[1], samples[0]["image"]
    first, out_first = served(router_engine, processor, [dict(image=image, question=QUESTIONS[0])], tmp_path)
    second, _ = served(router_engine, processor, [dict(image=image, question=QUESTIONS[1])], tmp_path)
    again, out_again = served(router_engine, processor, [dict(image=image, question=QUESTIONS[0])], tmp_path)
    assert [r["indices"] for r in first] == [hf_kept(testbed, image, QUESTIONS[0])]
    assert [r["indices"] for r in second] == [hf_kept(testbed, image, QUESTIONS[1])]
    assert first[0]["indices"] != second[0]["indices"]
    assert again == [] and out_again[0].outputs[0].token_ids == out_first[0].outputs[0].token_ids
    image = samples[1]["image"]  # both questions in one batch
    together, _ = served(router_engine, processor, [dict(image=image, question=q) for q in QUESTIONS], tmp_path)
    assert sorted(r["indices"] for r in together) == sorted(hf_kept(testbed, image, q) for q in QUESTIONS)


def test_per_request_options_in_one_batch(router_engine, testbed, samples, tmp_path):
    """A request's mm_processor_kwargs change its budget, or its method; the batch mixes them,
    each image's prompt holds its own count, and each selection is the HF patch's."""
    processor, image = testbed[1], samples[2]["image"]
    requests = [
        dict(image=image, question=QUESTIONS[0], mm_processor_kwargs={"tokendrop": {"budget": 0.05}}),
        dict(image=image, question=QUESTIONS[0]),
        dict(
            image=image, question=QUESTIONS[0], mm_processor_kwargs={"tokendrop": {"method": "hired", "budget": 0.25}}
        ),
    ]
    records, outputs = served(router_engine, processor, requests, tmp_path)
    assert sorted((r["method"], r["budget"], r["n_kept"]) for r in records) == sorted(
        [("router", 0.05, 9), ("router", 0.1, 18), ("hired", 0.25, 45)]
    )
    lengths = [len(o.prompt_token_ids) for o in outputs]
    assert lengths[0] - lengths[1] == 9 - 18 and lengths[2] - lengths[1] == 45 - 18
    by_method = {(r["method"], r["budget"]): r["indices"] for r in records}
    assert by_method[("hired", 0.25)] == hf_kept(testbed, image, QUESTIONS[0], "hired", 0.25)
    assert by_method[("router", 0.05)] == hf_kept(testbed, image, QUESTIONS[0], budget=0.05)
    with pytest.raises(ValueError, match="tokendrop"):
        served(
            router_engine,
            processor,
            [dict(image=image, question="?", mm_processor_kwargs={"tokendrop": "{"})],
            tmp_path,
        )


def test_a_second_turn_selects_as_its_question_alone(router_engine, testbed, samples, tmp_path):
    processor, image = testbed[1], samples[3]["image"]
    turns = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[0]}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        {"role": "user", "content": [{"type": "text", "text": QUESTIONS[1]}]},
    ]
    chat = processor.apply_chat_template(turns, add_generation_prompt=True)
    (record,), _ = served(router_engine, processor, [dict(image=image, prompt=chat)], tmp_path)
    assert record["indices"] == hf_kept(testbed, image, QUESTIONS[1])

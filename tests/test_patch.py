"""The patch end to end on the tiny preset, for every registered method."""

import copy
import dataclasses

import pytest
import torch

import reference
import tokendrop
from conftest import QUESTIONS, greedy, prompt
from tokendrop.adapters import adapter_for
from tokendrop.method import METHODS

ALL = METHODS.names()


@pytest.mark.parametrize("method", ALL)
def test_full_budget_is_identical(tiny, batch, method):
    model, processor = tiny
    expected = greedy(model, batch)
    with torch.no_grad():
        expected_logits = model(**batch).logits
    for budget in (1.0, 10**6):  # an int budget above every image's token count is full too
        with tokendrop.patched(model, method, budget=budget, processor=processor) as handle:
            assert torch.equal(greedy(model, batch), expected)
            assert [r.n_kept for r in handle.last] == [r.n_before for r in handle.last]
            with torch.no_grad():
                assert torch.equal(model(**batch).logits, expected_logits)


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def half(request, tiny, images):
    """The tiny model and a batch in half precision, as on a GPU (CPU kernels here)."""
    model, processor = tiny
    texts = [prompt(processor, q) for q in QUESTIONS]
    inputs = processor(images=list(images.values()), text=texts, return_tensors="pt", padding=True)
    inputs = {k: v.to(request.param) if v.is_floating_point() else v for k, v in inputs.items()}
    return copy.deepcopy(model).to(request.param), inputs


@pytest.mark.parametrize("method", ALL)
def test_half_precision_full_budget_is_identical_and_pruning_runs(tiny, half, method):
    _, processor = tiny
    model, inputs = half
    expected = greedy(model, inputs, n=3)
    with torch.no_grad():
        expected_logits = model(**inputs).logits
    with tokendrop.patched(model, method, budget=1.0, processor=processor):
        assert torch.equal(greedy(model, inputs, n=3), expected)
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, expected_logits)
    with tokendrop.patched(model, method, budget=0.2, processor=processor) as handle:
        out = greedy(model, inputs, n=3)
    assert out.shape[0] == expected.shape[0]
    assert all(record.n_kept < record.n_before for record in handle.last)


def test_unpatch_restores_exactly(tiny, batch):
    model, _ = tiny
    before = dict(model.__dict__)
    expected = greedy(model, batch)
    handle = tokendrop.patch(model, "hired", budget=0.2)
    assert not torch.equal(greedy(model, batch), expected)
    tokendrop.unpatch(model)
    assert model.__dict__.keys() == before.keys()
    assert all(model.__dict__[k] is v for k, v in before.items())
    assert torch.equal(greedy(model, batch), expected)
    handle.remove()  # removing twice is harmless
    assert model.__dict__.keys() == before.keys()


def test_repatch_replaces_and_context_manager_restores(tiny, batch):
    model, _ = tiny
    outer = tokendrop.patch(model, "uniform", budget=0.5)
    inner_wrapped = model.__dict__["generate"]
    second = tokendrop.patch(model, "hired", budget=0.2)
    assert model.__dict__["_tokendrop_handle"] is second
    assert model.__dict__["generate"].__wrapped__ is not inner_wrapped  # wraps the original, never stacks
    greedy(model, batch)
    assert second.last and not outer.last
    with tokendrop.patched(model, "random", budget=0.3) as third:
        greedy(model, batch)
        assert third.last[0].n_kept == int(0.3 * third.last[0].n_before)
    assert model.__dict__["_tokendrop_handle"] is second
    tokendrop.unpatch(model)
    assert "generate" not in model.__dict__ and "forward" not in model.__dict__


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("budget", [0.5, 0.1, 17])
def test_exact_counts_and_records(tiny, batch, method, budget):
    model, processor = tiny
    handle = tokendrop.patch(model, method, budget=budget, processor=processor)
    out = greedy(model, batch, n=2)
    assert len(handle.last) == 3
    for (height, width), record in zip(batch["image_sizes"].tolist(), handle.last):
        feats, packed = reference.features(model, height, width)
        assert record.n_before == len(feats)
        # the text router's default scope keeps the base view whole and budgets the crops
        whole = sum(1 for p, _ in feats if p == 0) if getattr(handle.method, "scope", "all") == "crops" else 0
        expected = reference.keep_count(budget, len(feats) - whole)
        if method == "base" and expected < len(feats):  # the base view only: at most its size
            expected = min(expected, sum(1 for p, _ in feats if p == 0))
        assert record.n_kept == whole + expected == len(record.indices)
        assert (
            record.indices == sorted(set(record.indices)) and 0 <= record.indices[0] and record.indices[-1] < len(feats)
        )
        assert record.partitions == [
            sum(1 for i in record.indices if feats[i][0] == p) for p in range(len(record.partitions))
        ]
        mask = reference.keep_mask(model, height, width, record.indices, "rows")
        assert record.n_newlines == int(mask.sum()) - record.n_kept
    # the caller's prompt comes back in front of the new tokens
    assert torch.equal(out[:, : batch["input_ids"].shape[1]], batch["input_ids"])


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("budget", [0.3, 0.05])
def test_batched_equals_one_by_one(tiny, batch, singles, method, budget):
    model, processor = tiny
    handle = tokendrop.patch(model, method, budget=budget, processor=processor)
    together = greedy(model, batch)
    records = handle.last
    for row, single in enumerate(singles):
        alone = greedy(model, single)
        assert torch.equal(together[row, -6:], alone[0, -6:])
        assert handle.last[0] == records[row]


@pytest.mark.parametrize("newlines", ["rows", "all", "drop"])
def test_pruned_generation_equals_manual_reference(tiny, batch, newlines):
    """Greedy generation equals decoding by hand, without cache, from inputs_embeds built from
    the unpatched model's features and the recorded selection."""
    model, _ = tiny
    with torch.no_grad():
        packed = adapter_for(model).image_features(batch["pixel_values"], batch["image_sizes"])
    handle = tokendrop.patch(model, "hired", budget=0.25, newlines=newlines)
    out = greedy(model, batch, n=5)
    token = model.config.image_token_id
    for row, ((height, width), record, features) in enumerate(zip(batch["image_sizes"].tolist(), handle.last, packed)):
        mask = reference.keep_mask(model, height, width, record.indices, newlines)
        assert record.n_newlines == int(mask.sum()) - record.n_kept
        valid = batch["input_ids"][row][batch["attention_mask"][row] == 1]
        slots = (valid == token).nonzero().flatten()
        drop = slots[~mask]
        keep = torch.ones_like(valid, dtype=torch.bool)
        keep[drop] = False
        ids = valid[keep][None]
        embeds = reference.embed_prompt(model, ids, [features[mask]])
        assert reference.greedy_no_cache(model, embeds, 5) == out[row, -5:].tolist()


@pytest.mark.parametrize(
    "options",
    [
        dict(do_sample=True, top_k=20),
        dict(num_beams=3),
        dict(num_beams=3, num_return_sequences=2),
        dict(do_sample=True, num_return_sequences=2),
    ],
    ids=["sample", "beam", "beam-nrs", "sample-nrs"],
)
def test_generation_modes_equal_stock_generate_on_reference_embeds(tiny, batch, options):
    """Beam search, sampling and num_return_sequences of the patched model equal stock
    generate (unpatched) run on inputs_embeds built by hand from the same selection."""
    model, _ = tiny
    handle = tokendrop.patch(model, "hired", budget=0.3)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=4, return_dict_in_generate=True, **options)
    records = handle.last
    tokendrop.unpatch(model)
    ref = reference.compact_batch(model, batch, records)
    embeds = reference.embed_prompt(model, ref["input_ids"], ref["features"])
    torch.manual_seed(0)
    with torch.no_grad():
        expected = model.generate(
            inputs_embeds=embeds, attention_mask=ref["attention_mask"], max_new_tokens=4, **options
        )
    n = options.get("num_return_sequences", 1)
    assert out.sequences.shape[0] == 3 * n
    assert torch.equal(out.sequences[:, : batch["input_ids"].shape[1]], batch["input_ids"].repeat_interleave(n, 0))
    assert torch.equal(out.sequences[:, batch["input_ids"].shape[1] :], expected)


def test_use_cache_false_matches_cached(tiny, batch):
    model, _ = tiny
    tokendrop.patch(model, "hired", budget=0.3)
    assert torch.equal(greedy(model, batch, use_cache=False), greedy(model, batch))


def test_text_only_and_mixed_batches(tiny, images):
    model, processor = tiny
    text_only = processor(text=["USER: hello there ASSISTANT:"], return_tensors="pt")
    expected = greedy(model, text_only)
    handle = tokendrop.patch(model, "hired", budget=0.2)
    assert torch.equal(greedy(model, text_only), expected)
    assert handle.last == []
    # a prompt with two images next to a text-only prompt and a one-image prompt
    wide, tall, square = images.values()
    texts = [
        prompt(processor, "Compare them.", n_images=2),
        "USER: no picture here ASSISTANT:",
        prompt(processor, "And this?"),
    ]
    mixed = processor(images=[wide, tall, square], text=texts, return_tensors="pt", padding=True)
    out = greedy(model, mixed)
    assert len(handle.last) == 3
    two = processor(images=[wide, tall], text=[texts[0]], return_tensors="pt")
    assert torch.equal(greedy(model, two)[0, -6:], out[0, -6:])
    assert torch.equal(greedy(model, processor(text=[texts[1]], return_tensors="pt"))[0, -6:], out[1, -6:])
    tokendrop.unpatch(model)
    alone = greedy(model, processor(text=[texts[1]], return_tensors="pt"))
    assert torch.equal(alone[0, -6:], out[1, -6:])


def test_forward_with_labels(tiny, batch):
    """model(**inputs, labels=...) compacts labels with input_ids: at full budget the loss is
    the unpatched loss; pruned, it equals the loss of the compacted sequence computed by hand."""
    model, _ = tiny
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        expected = model(**batch, labels=labels).loss
        with tokendrop.patched(model, "uniform", budget=1.0):
            assert torch.equal(model(**batch, labels=labels).loss, expected)
        handle = tokendrop.patch(model, "uniform", budget=0.2)
        out = model(**batch, labels=labels)
    tokendrop.unpatch(model)
    ref = reference.compact_batch(model, batch, handle.last, labels=labels)
    embeds = reference.embed_prompt(model, ref["input_ids"], ref["features"])
    with torch.no_grad():
        hidden = model.model.language_model(
            inputs_embeds=embeds, attention_mask=ref["attention_mask"]
        ).last_hidden_state
        logits = model.lm_head(hidden)
    assert out.logits.shape == logits.shape
    assert torch.allclose(out.logits, logits, atol=1e-5)
    shifted = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), ref["labels"][:, 1:].flatten(), ignore_index=-100
    )
    assert torch.allclose(out.loss, shifted, atol=1e-6)


def test_training_the_projector_through_a_patched_forward(tiny, batch):
    """A loss from a patched forward reaches the projector's weights, as unpatched: at budget
    1.0 its gradient is the unpatched gradient exactly; pruned, it is a real, different one."""
    model, _ = tiny
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    projector = model.model.multi_modal_projector.linear_1.weight

    def projector_grad():
        model.zero_grad(set_to_none=True)
        model(**batch, labels=labels).loss.backward()
        return projector.grad.clone()

    expected = projector_grad()
    with tokendrop.patched(model, "hired", budget=1.0):
        assert torch.equal(projector_grad(), expected)
    with tokendrop.patched(model, "hired", budget=0.2):
        pruned = projector_grad()
    assert pruned.abs().sum() > 0 and not torch.equal(pruned, expected)
    model.zero_grad(set_to_none=True)


def test_right_padding_forward_matches_single_rows(tiny, images):
    """A right-padded batch (the training layout) keeps its padding side and each row's
    logits equal that row alone."""
    model, processor = tiny
    processor.tokenizer.padding_side = "right"
    try:
        texts = [prompt(processor, q) for q in QUESTIONS]
        inputs = processor(images=list(images.values()), text=texts, return_tensors="pt", padding=True)
        singles = [processor(images=[im], text=[t], return_tensors="pt") for im, t in zip(images.values(), texts)]
    finally:
        processor.tokenizer.padding_side = "left"
    tokendrop.patch(model, "hired", budget=0.3)
    with torch.no_grad():
        together = model(**inputs).logits
        for row, single in enumerate(singles):
            alone = model(**single).logits[0]
            assert torch.allclose(together[row, : alone.shape[0]], alone, atol=1e-5)


def test_generate_builds_no_autograd_graph(tiny, batch):
    """Like stock generate, the patched one runs the vision pass without autograd, even when
    the caller did not disable gradients."""
    model, _ = tiny
    seen = []
    hook = model.model.vision_tower.register_forward_hook(
        lambda module, args, output: seen.append(output.last_hidden_state.requires_grad)
    )
    try:
        tokendrop.patch(model, "hired", budget=0.3)
        model.generate(**batch, max_new_tokens=2)
    finally:
        hook.remove()
    assert seen and not any(seen)


def test_forward_reports_the_vectors_the_llm_received(tiny, batch):
    """The output's image-feature field (5.x `image_outputs`, 4.x `image_hidden_states`) holds
    what the LLM received: every vector at budget 1.0, as the stock model; the kept ones below."""
    model, _ = tiny
    with torch.no_grad():
        stock = model(**batch)
        field = "image_outputs" if "image_outputs" in type(stock).__dataclass_fields__ else "image_hidden_states"

        def vectors(output):
            value = output[field]
            return torch.cat(value.pooler_output) if field == "image_outputs" else value

        with tokendrop.patched(model, "hired", budget=1.0):
            assert torch.equal(vectors(model(**batch)), vectors(stock))
        with tokendrop.patched(model, "hired", budget=0.3) as handle:
            kept = vectors(model(**batch))
    assert kept.shape[0] == sum(record.n_kept + record.n_newlines for record in handle.last) < vectors(stock).shape[0]


# --- issue 27: the front door: method objects, a budget always given, help that lists methods ---


def test_a_patch_without_a_budget_is_refused_not_a_silent_no_op(tiny):
    model, processor = tiny
    for method in ("hired", tokendrop.HiRED(alpha=0.3)):
        with pytest.raises(tokendrop.UsageError, match=r"needs a budget.*budget=0\.2"):
            tokendrop.patch(model, method)
        assert tokendrop.handle_of(model) is None  # refused before the model was touched
    # text and router select by threshold= without one
    with tokendrop.patched(model, "text", threshold=0.5, processor=processor) as handle:
        assert handle.method.budget is None


def test_a_method_object_patches_as_its_name_and_options_do(tiny, batch):
    model, processor = tiny
    with tokendrop.patched(model, "hired", budget=0.3, alpha=0.25) as by_name:
        expected = greedy(model, batch)
        kept = [r.indices for r in by_name.last]
    with tokendrop.patched(model, tokendrop.HiRED(budget=0.3, alpha=0.25)) as by_object:
        assert torch.equal(greedy(model, batch), expected)
        assert [r.indices for r in by_object.last] == kept
    for given in ({"budget": 0.2}, {"alpha": 0.5}, {"processor": processor}):
        with pytest.raises(TypeError, match=f"{next(iter(given))}= cannot be given beside it"):
            tokendrop.patch(model, tokendrop.HiRED(budget=0.3), **given)


def test_every_method_class_is_exported_and_documents_its_options():
    for name, cls in METHODS.items():
        assert getattr(tokendrop, cls.__name__) is cls and cls.__name__ in dir(tokendrop)
        for field in dataclasses.fields(cls):
            if field.init:
                assert f"    {field.name} (default {field.default!r}): " in cls.__doc__, (name, field.name)
    # patch's docstring lists the registry, each method by name and class
    for name, cls in METHODS.items():
        assert f"'{name}' (tokendrop.{cls.__name__}): {cls.summary}"[:60] in " ".join(tokendrop.patch.__doc__.split())
    assert "help(tokendrop.HiRED)" in tokendrop.patch.__doc__


def test_the_package_ships_its_type_annotations():
    import configparser
    from pathlib import Path

    root = Path(tokendrop.__file__).parent
    assert (root / "py.typed").is_file()
    config = configparser.ConfigParser()
    config.read(root.parent / "setup.cfg")
    assert "py.typed" in config["options.package_data"]["tokendrop"]

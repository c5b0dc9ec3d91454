"""Selection batched over the images of one layout: equal to selecting image by image, for
every method, in a call that mixes sizes; and free of host syncs between the vision pass and
the one read-back that sizes the shortened prompt."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

import reference
import tokendrop
from conftest import prompt
from tokendrop import selection
from tokendrop.adapters import adapter_for
from tokendrop.layout import members_of
from tokendrop.method import build as build_method
from tokendrop.method.base import Merged
from tokendrop.presets import synthetic_image
from tokendrop.pruning import select_images

# sizes (h, w) in an order that interleaves layouts; three share one, two another
SIZES = [(38, 96), (60, 100), (38, 96), (96, 38), (60, 100), (38, 96)]
QUESTIONS = ["What is red?", "Describe it.", "Where is the small blue square?", "Which colour?", "Count them.", "Hi?"]
VARIANTS = [(name, {}) for name in tokendrop.methods()] + [
    ("text", {"scope": "all"}),
    ("text", {"threshold": 0.3, "budget": 1.0}),
    ("hired", {"allocation": "count"}),
    ("dpp", {"relevance": "cls", "allocation": "partition"}),
    ("dpp", {"relevance": "text", "allocation": "hired"}),
    ("dpp", {"allocation": "globalcom2"}),
    ("dpp", {"relevance": "none", "allocation": "global"}),
]


@pytest.fixture(scope="module")
def mixed(tiny):
    model, processor = tiny
    images = [synthetic_image(w, h, seed=10 + i) for i, (h, w) in enumerate(SIZES)]
    texts = [prompt(processor, q) for q in QUESTIONS]
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


def encoded(model, method, inputs):
    adapter = adapter_for(model)
    with torch.no_grad():
        return adapter.read(
            inputs["input_ids"],
            inputs["attention_mask"],
            inputs["pixel_values"],
            inputs["image_sizes"],
            None,
            method.signals(),
            {},
        )


@pytest.mark.parametrize("path", ["host", "device"])
@pytest.mark.parametrize("budget", [0.25, 0.1, 7])
@pytest.mark.parametrize("name, options", VARIANTS, ids=[f"{n}{o or ''}" for n, o in VARIANTS])
def test_batched_equals_one_by_one(tiny, mixed, name, options, budget, path, monkeypatch):
    """On the CPU's own path (host shortcuts: early stops, dpp image by image and set by set)
    and on the device path a GPU takes."""
    if path == "device":
        monkeypatch.setattr(selection, "HOST_DEVICES", frozenset())
    model, processor = tiny
    options = {"budget": budget, **options}
    method = build_method(name, processor=processor, **options).resolve(adapter_for(model))
    images = encoded(model, method, mixed)
    with torch.no_grad():
        together, packed = select_images(method, images)
        assert len({id(image.layout) for image in images}) < len(images)  # something was batched
        for image, selected, vectors in zip(images, together, packed):
            [alone], [alone_vectors] = select_images(method, [image])
            assert selected.record() == alone.record()
            assert torch.equal(selected.keep_mask, alone.keep_mask)
            assert torch.equal(vectors, alone_vectors)
            # and `select`, the one-image entry point, agrees with both
            chosen = method.select(image)
            if isinstance(chosen, Merged):
                assert [g.tolist() for g in chosen.groups] == selected.record().groups
                chosen = chosen.indices
            assert chosen.tolist() == selected.record().indices


# Operations that read a value back to the host (or, for `tensor`, copy host data to the
# device), and so wait for every queued kernel on an accelerator. The machine has no GPU:
# counting calls to them, through a TorchFunctionMode that sees every torch call, is the CPU
# proxy for torch.cuda.set_sync_debug_mode. A boolean-mask index is counted too (it sizes its
# result from the mask's contents).
SYNCING = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.__bool__,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__index__,
    torch.Tensor.nonzero,
    torch.nonzero,
    torch.Tensor.cpu,
    torch.Tensor.numpy,
    torch.Tensor.unique,
    torch.unique,
    torch.Tensor.bincount,
    torch.bincount,
    torch.masked_select,
    torch.Tensor.masked_select,
    torch.repeat_interleave,
    torch.Tensor.repeat_interleave,
    torch.tensor,
    torch.as_tensor,
}


class SyncCounter(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        index = args[1] if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) else None
        indices = index if isinstance(index, tuple) else (index,)
        if func in SYNCING or any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
            self.calls.append(getattr(func, "__name__", str(func)))
        return func(*args, **kwargs)


def test_the_counter_sees_syncs():
    t = torch.arange(5)
    with SyncCounter() as counter:
        int(t.sum()), t[t > 2], t.nonzero(), bool(t.any()), t.tolist()
        t[torch.tensor([1, 2])]  # an index tensor: a host copy (counted as torch.tensor), no read-back
    assert counter.calls == ["__int__", "__getitem__", "nonzero", "__bool__", "tolist", "tensor"]


def test_the_partition_table_is_built_without_reading_back():
    partition = torch.tensor([0, 1, 0, 2, 1])
    with SyncCounter() as counter:
        members = members_of(partition, (2, 2, 1))
    assert counter.calls == []
    assert members.tolist() == [[0, 2], [1, 4], [3, -1]]


# every method that batches and reads no question (the question's tokens are host text)
NO_SYNC = ["hired", "globalcom2", "cls", "base", "random", "uniform", "pool", "divprune"]
NO_SYNC_VARIANTS = [(n, {}) for n in NO_SYNC] + [
    ("hired", {"allocation": "count"}),
    ("dpp", {"relevance": "cls", "allocation": "global"}),
    ("dpp", {"relevance": "cls", "allocation": "partition"}),
    ("dpp", {"allocation": "hired"}),
    ("dpp", {"allocation": "globalcom2"}),
]


@pytest.mark.parametrize("name, options", NO_SYNC_VARIANTS, ids=[f"{n}{o or ''}" for n, o in NO_SYNC_VARIANTS])
def test_selection_and_compaction_read_back_once(tiny, mixed, name, options, monkeypatch):
    monkeypatch.setattr(selection, "HOST_DEVICES", frozenset())  # dpp's device path, as on a GPU
    model, processor = tiny
    adapter = adapter_for(model)
    method = build_method(name, budget=0.2, processor=processor, **options).resolve(adapter)
    images = encoded(model, method, mixed)

    def call():
        selected, packed = select_images(method, images)
        masks = [s.keep_mask for s in selected]
        return adapter.feed(mixed["input_ids"], mixed["attention_mask"], None, masks, packed, "left", 0)

    with torch.no_grad():
        call()  # the first call fills the caches: layouts on the device, fixed selections
        with SyncCounter() as counter:
            ids, llm_inputs, kept = call()
    # the images' offsets go to the device just before the one read-back (the new prompt
    # lengths and where the images land), so even a copy that waited would share its wait
    assert counter.calls == ["tensor", "tolist"], counter.calls
    assert len(kept) == len(images) and llm_inputs["inputs_embeds"].shape[:2] == ids.shape


def test_reading_the_images_leaves_the_prompts_on_the_device(tiny, mixed):
    # each image's prompt row without its padding is sized by the mask: made only when a
    # question-reading method asks for it, not once per image in every call
    model, processor = tiny
    method = build_method("hired", budget=0.2).resolve(adapter_for(model))
    with SyncCounter() as counter:
        images = encoded(model, method, mixed)
    assert "__getitem__" not in counter.calls, counter.calls
    for image, row in zip(images, [0, 1, 2, 3, 4, 5]):
        assert torch.equal(image.prompt_row, mixed["input_ids"][row])
        assert torch.equal(image.prompt_mask, mixed["attention_mask"][row])


# the question-reading methods, on their device path
QUESTION_VARIANTS = [("text", {}), ("router", {}), ("dpp", {"relevance": "text"})]


@pytest.mark.parametrize("name, options", QUESTION_VARIANTS, ids=[n for n, _ in QUESTION_VARIANTS])
def test_questions_are_read_back_once_per_call(tiny, mixed, name, options, monkeypatch):
    # the question is host text: all the images' prompts come back in one read (then their
    # tokens go to the device in one copy), not a mask index, a max and a decode per image
    monkeypatch.setattr(selection, "HOST_DEVICES", frozenset())
    model, processor = tiny
    adapter = adapter_for(model)
    method = build_method(name, budget=0.2, processor=processor, **options).resolve(adapter)
    images = encoded(model, method, mixed)
    with torch.no_grad():
        select_images(method, images)
        with SyncCounter() as counter:
            select_images(method, images)
    n_layouts = len(set(SIZES))  # images of one layout are selected together
    assert counter.calls == ["tolist", "tensor"] * n_layouts, counter.calls


def test_each_images_question_is_the_text_after_its_last_image(tiny, mixed):
    # the rule written out on the host, row by row: padding removed, the tokens after the
    # row's last <image>, decoded, the question found where the chat template puts it
    model, processor = tiny
    method = build_method("text", budget=0.2, processor=processor).resolve(adapter_for(model))
    images = encoded(model, method, mixed)
    image_token = method.image_token_id
    special = set(processor.tokenizer.all_special_ids)
    for image, ids, mask, question in zip(
        images, mixed["input_ids"].tolist(), mixed["attention_mask"].tolist(), QUESTIONS
    ):
        row = [t for t, m in zip(ids, mask) if m == 1]
        after = row[max(i for i, t in enumerate(row) if t == image_token) + 1 :]
        text = method.template.question(processor.tokenizer.decode(after))
        assert text == question
        expected = [t for t in processor.tokenizer(text, add_special_tokens=False).input_ids if t not in special]
        assert method.question_ids([image]) == [expected]
    assert method.question_ids(images) == [method.question_ids([image])[0] for image in images]


def test_questions_given_by_the_caller_need_no_prompt(tiny):
    # an image without a prompt row takes its question from the caller, and says so when none is given
    model, processor = tiny
    method = build_method("text", budget=0.2, processor=processor).resolve(adapter_for(model))
    image = encoded(
        model, method, processor(images=[synthetic_image(40, 40)], text=[prompt(processor, "Hi?")], return_tensors="pt")
    )[0]
    image.prompt_row = image.prompt_mask = None
    with pytest.raises(ValueError, match="pass questions="):
        method.question_ids([image])
    image.question = "What is red?"
    expected = processor.tokenizer("What is red?", add_special_tokens=False).input_ids
    assert method.question_ids([image, image]) == [expected, expected]


def test_records_are_read_back_on_first_access(tiny, mixed):
    model, _ = tiny
    handle = tokendrop.patch(model, "hired", budget=0.2)
    with torch.no_grad():
        model(**mixed)
    assert isinstance(handle._last, tuple)  # device tensors, not yet records
    records = handle.last
    assert [r.n_kept for r in records] == [tokendrop.selection.keep_count(0.2, r.n_before) for r in records]
    assert handle.last is records  # built once


def feed_by_hand(model, input_ids, attention_mask, keep_masks, packed):
    """The shortened, left-padded prompt and its inputs_embeds, one position at a time: the
    placeholders numbered in (row, position) order and dropped where their image's keep mask
    drops them, the kept vectors written over the remaining ones in order."""
    token = model.config.image_token_id
    kept_flags = iter(torch.cat(keep_masks).tolist())
    rows = []
    for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
        rows.append([(t, m) for t, m in zip(ids, mask) if t != token or next(kept_flags)])
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(row)) + [t for t, _ in row] for row in rows])
    mask = torch.tensor([[0] * (width - len(row)) + [m for _, m in row] for row in rows])
    vectors = [vectors[keep].float() for vectors, keep in zip(packed, keep_masks)]
    return ids, mask, reference.embed_prompt(model, ids, vectors)


@pytest.mark.parametrize("case", ["processor", "split placeholders", "float64 vectors"])
def test_feed_places_the_kept_vectors_as_the_model_does(tiny, images, case):
    """Rows with two images, none and one; with an image's placeholders split by a text token
    (placed by position); with vectors of another dtype than the embeddings (gathered, then
    cast). Where an image's placeholders are one run, its vectors are gathered straight into
    inputs_embeds: what `kept` returns is a view of it."""
    model, processor = tiny
    adapter = adapter_for(model)
    texts = [
        prompt(processor, "Compare them.", n_images=2),
        "USER: no picture here ASSISTANT:",
        prompt(processor, "Hi?"),
    ]
    inputs = processor(images=list(images.values()), text=texts, return_tensors="pt", padding=True)
    method = build_method("hired", budget=0.25).resolve(adapter)
    with torch.no_grad():
        selected, packed = select_images(method, encoded(model, method, inputs))
    masks = [s.keep_mask for s in selected]
    ids, attention = inputs["input_ids"], inputs["attention_mask"]
    if case == "split placeholders":  # a text column through the middle of the last row's image
        placeholders = (ids[2] == adapter.image_token_id).nonzero().flatten()
        middle = int(placeholders[len(placeholders) // 2])
        column = torch.full((len(ids), 1), 100)
        ids = torch.cat([ids[:, :middle], column, ids[:, middle:]], 1)
        attention = torch.cat([attention[:, :middle], torch.ones_like(column), attention[:, middle:]], 1)
    if case == "float64 vectors":
        packed = [vectors.double() for vectors in packed]
    with torch.no_grad():
        short, llm_inputs, kept = adapter.feed(ids, attention, None, masks, packed, "left", 0)
    expected_ids, expected_mask, expected_embeds = feed_by_hand(model, ids, attention, masks, packed)
    assert torch.equal(short, expected_ids)
    assert torch.equal(llm_inputs["attention_mask"], expected_mask)
    assert torch.equal(llm_inputs["inputs_embeds"], expected_embeds)
    runs = one_run(ids, adapter.image_token_id, [keep.numel() for keep in masks])
    assert all(runs) == (case != "split placeholders")
    embeds = llm_inputs["inputs_embeds"].untyped_storage().data_ptr()
    for vectors, keep, image_kept, run in zip(packed, masks, kept, runs):
        assert torch.equal(image_kept, vectors[keep])
        in_place = run and case != "float64 vectors"
        assert (image_kept.untyped_storage().data_ptr() == embeds) == in_place


def one_run(input_ids, token: int, sizes: list[int]) -> list[bool]:
    """Whether each image's placeholders (sizes[i] of them, in (row, position) order) are one run."""
    positions = [(r, c) for r, row in enumerate(input_ids.tolist()) for c, t in enumerate(row) if t == token]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [
        all((r, c + 1) == after for (r, c), after in zip(part, part[1:]))
        for part in (positions[start : start + size] for start, size in zip(starts, sizes))
    ]

"""Selection batched over the images of one layout: equal to selecting image by image, for
every method, in a call that mixes sizes; and free of host syncs between the vision pass and
the one read-back that sizes the shortened prompt."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

import tokendrop
from conftest import prompt
from tokendrop import selection
from tokendrop.adapters import adapter_for
from tokendrop.layout import members_of
from tokendrop.method import build as build_method
from tokendrop.method.base import Merged
from tokendrop.patch import select_images
from tokendrop.presets import synthetic_image

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
    ("dpp", {"relevance": "none"}),
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
    ("dpp", {"relevance": "cls"}),
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
    assert counter.calls == ["tolist"], counter.calls  # the new prompt lengths, once
    assert len(kept) == len(images) and llm_inputs["inputs_embeds"].shape[:2] == ids.shape


def test_records_are_read_back_on_first_access(tiny, mixed):
    model, _ = tiny
    handle = tokendrop.patch(model, "hired", budget=0.2)
    with torch.no_grad():
        model(**mixed)
    assert isinstance(handle._last, tuple)  # device tensors, not yet records
    records = handle.last
    assert [r.n_kept for r in records] == [tokendrop.selection.keep_count(0.2, r.n_before) for r in records]
    assert handle.last is records  # built once

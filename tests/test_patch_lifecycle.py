"""The handle's lifecycle: stale handles, context managers, copies, pickling, accelerate hooks,
torch.compile, threads and `handle.last` (issue 13)."""

import copy
import pickle
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
import torch
from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

import tokendrop
from conftest import greedy
from tokendrop.presets import build_preset

ATTRIBUTE = "_tokendrop_handle"


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


# --- stale handles and the context manager ----------------------------------------------


def test_stale_handle_remove_does_nothing(tiny, batch):
    model, _ = tiny
    first = tokendrop.patch(model, "uniform", budget=0.5)
    second = tokendrop.patch(model, "hired", budget=0.2)
    first.remove()
    assert model.__dict__[ATTRIBUTE] is second
    greedy(model, batch, n=1)
    assert len(second.last) == 3 and [r.n_kept for r in second.last] == [int(0.2 * r.n_before) for r in second.last]


def test_patched_block_restores_the_state_before_it(tiny, batch):
    model, _ = tiny
    before = dict(model.__dict__)
    with tokendrop.patched(model, "uniform", budget=0.5):
        tokendrop.patch(model, "hired", budget=0.2)  # re-patching inside the block
    assert model.__dict__ == before
    outer = tokendrop.patch(model, "uniform", budget=0.5)
    with tokendrop.patched(model, "random", budget=0.3):
        tokendrop.patch(model, "hired", budget=0.2)
    assert model.__dict__[ATTRIBUTE] is outer
    greedy(model, batch, n=1)
    assert [r.n_kept for r in outer.last] == [int(0.5 * r.n_before) for r in outer.last]


# --- copies ------------------------------------------------------------------------------


def test_deepcopy_carries_its_own_patch(tiny, batch):
    model, _ = tiny
    handle = tokendrop.patch(model, "hired", budget=0.2)
    expected = logits(model, batch)
    twin = copy.deepcopy(model)
    twin_handle = twin.__dict__[ATTRIBUTE]
    assert twin_handle is not handle and twin_handle.model is twin
    with torch.no_grad():
        for parameter in twin.parameters():
            parameter.zero_()
    handle.last = []
    assert not torch.equal(logits(twin, batch), expected)
    assert handle.last == [] and len(twin_handle.last) == 3
    twin_handle.last = []
    greedy(twin, batch, n=1)
    assert handle.last == [] and [r.n_kept for r in twin_handle.last] == [
        int(0.2 * r.n_before) for r in twin_handle.last
    ]
    assert torch.equal(logits(model, batch), expected)
    tokendrop.unpatch(twin)
    assert ATTRIBUTE not in twin.__dict__ and "forward" not in twin.__dict__
    assert model.__dict__[ATTRIBUTE] is handle


def test_pickle_round_trip_keeps_the_patch(batch):
    # a fresh model: after its first call, transformers' own output hooks make any model unpicklable
    model, _ = build_preset("tiny")
    handle = tokendrop.patch(model, "hired", budget=0.2)
    loaded = pickle.loads(pickle.dumps(model))
    expected = logits(model, batch)
    loaded_handle = loaded.__dict__[ATTRIBUTE]
    assert loaded_handle is not handle and loaded_handle.model is loaded
    handle.last = []
    assert torch.equal(logits(loaded, batch), expected)
    assert handle.last == [] and [r.n_kept for r in loaded_handle.last] == [
        int(0.2 * r.n_before) for r in loaded_handle.last
    ]
    tokendrop.unpatch(loaded)
    assert ATTRIBUTE not in loaded.__dict__ and "forward" not in loaded.__dict__


# --- accelerate hooks (what device_map="auto" installs) -----------------------------------


class Counting(ModelHook):
    def __init__(self):
        self.calls = 0

    def pre_forward(self, module, *args, **kwargs):
        self.calls += 1
        return args, kwargs


@pytest.fixture
def clean(tiny):
    """Whatever a test leaves of accelerate's bookkeeping on the shared model goes."""
    yield
    tokendrop.unpatch(tiny[0])
    remove_hook_from_module(tiny[0])
    tiny[0].__dict__.pop("forward", None)


def test_patch_then_accelerate_hook_then_unpatch(tiny, batch, clean):
    model, _ = tiny
    expected = logits(model, batch)
    handle = tokendrop.patch(model, "hired", budget=0.2)
    pruned = logits(model, batch)
    hook = Counting()
    add_hook_to_module(model, hook)
    assert torch.equal(logits(model, batch), pruned) and hook.calls == 1
    tokendrop.unpatch(model)
    assert torch.equal(logits(model, batch), expected) and hook.calls == 2
    remove_hook_from_module(model)
    assert torch.equal(logits(model, batch), expected) and hook.calls == 2
    handle.last = []
    greedy(model, batch, n=1)
    assert handle.last == []


def test_accelerate_hook_then_patch_then_remove_hook(tiny, batch, clean):
    model, _ = tiny
    expected = logits(model, batch)
    hook = Counting()
    add_hook_to_module(model, hook)
    handle = tokendrop.patch(model, "hired", budget=0.2)
    pruned = logits(model, batch)
    assert hook.calls == 1 and len(handle.last) == 3 and pruned.shape[1] < expected.shape[1]
    remove_hook_from_module(model)
    handle.last = []
    assert torch.equal(logits(model, batch), pruned) and hook.calls == 1 and len(handle.last) == 3
    tokendrop.unpatch(model)
    assert torch.equal(logits(model, batch), expected)


# --- torch.compile -------------------------------------------------------------------------


def test_patching_a_compiled_model_says_what_to_patch(tiny):
    model, _ = tiny
    with pytest.raises(TypeError, match="_orig_mod"):
        tokendrop.patch(torch.compile(model, backend="eager"), "hired", budget=0.2)
    assert ATTRIBUTE not in model.__dict__


def test_compile_then_patch_then_call_the_compiled_module(tiny, batch):
    model, _ = tiny
    compiled = torch.compile(model, backend="eager")
    logits(compiled, batch)  # compiled before the patch: dynamo does not guard on hooks added later
    handle = tokendrop.patch(model, "hired", budget=0.2)
    expected = logits(model, batch)
    handle.last = []
    assert torch.equal(logits(compiled, batch), expected) and len(handle.last) == 3


# --- threads and handle.last -----------------------------------------------------------------


def test_concurrent_calls_equal_single_threaded(tiny, singles):
    model, _ = tiny
    tokendrop.patch(model, "hired", budget=0.3)
    expected = [greedy(model, single, n=3) for single in singles]

    def run(thread):
        order = [(thread + i) % len(singles) for i in range(6)]
        return [(i, greedy(model, singles[i], n=3)) for i in order]

    with ThreadPoolExecutor(4) as pool:
        results = [r for rs in pool.map(run, range(4)) for r in rs]
    assert len(results) == 24
    assert all(torch.equal(out, expected[i]) for i, out in results)


def test_last_is_reset_when_a_call_fails(tiny, batch):
    model, _ = tiny
    handle = tokendrop.patch(model, "hired", budget=0.2)
    greedy(model, batch, n=1)
    assert len(handle.last) == 3
    with pytest.raises(ValueError, match="questions="):
        greedy(model, batch, n=1, questions=["only one"])
    assert handle.last == []


# --- the handle's surface for tools -------------------------------------------------------


def test_handle_of_and_install_put_a_handle_back(tiny, batch):
    model, _ = tiny
    assert tokendrop.handle_of(model) is None
    first = tokendrop.patch(model, "hired", budget=0.5)
    kept_first = (greedy(model, batch), [r.n_kept for r in first.last])
    second = tokendrop.patch(model, "cls", budget=0.2)
    assert tokendrop.handle_of(model) is second and not first.in_force
    first.install()
    assert tokendrop.handle_of(model) is first and not second.in_force
    first.install()  # the handle in force, installed again: still one patch, not two stacked
    assert model.__dict__["forward"].handle is first and model.__dict__["generate"].handle is first
    out = greedy(model, batch)
    assert torch.equal(out, kept_first[0]) and [r.n_kept for r in first.last] == kept_first[1]
    tokendrop.unpatch(model)
    assert tokendrop.handle_of(model) is None and "forward" not in model.__dict__ and ATTRIBUTE not in model.__dict__


def test_observers_wrap_each_pruning_step_vision_pass_included(tiny, batch):
    model, _ = tiny
    events = []

    @contextmanager
    def watch():
        events.append("enter")
        yield
        events.append("exit")

    tower = tokendrop.patch(model, "hired", budget=0.5).adapter.vision_tower
    hook = tower.register_forward_hook(lambda *args: events.append("tower"))
    handle = tokendrop.handle_of(model)
    try:
        with handle.observed(watch):
            greedy(model, batch, n=3)
        greedy(model, batch, n=1)  # after the block: observed no more
    finally:
        hook.remove()
    assert events == ["enter", "tower", "exit", "tower"]
    assert handle._observers == []


def test_decode_steps_never_enter_the_patch(tiny, batch, monkeypatch):
    model, _ = tiny
    entered = []
    original = tokendrop.Handle._call

    def counting(self, name, args, kwargs):
        entered.append(name)
        return original(self, name, args, kwargs)

    monkeypatch.setattr(tokendrop.Handle, "_call", counting)
    handle = tokendrop.patch(model, "hired", budget=0.5)
    greedy(model, batch, n=5)
    assert entered == ["generate"]  # the prefill and the decode steps go straight to the model
    model(**batch)
    assert entered == ["generate", "forward"] and len(handle.last) == 3

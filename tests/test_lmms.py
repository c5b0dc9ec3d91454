"""The lmms-eval model `llava_hf_tokendrop`: its entry point, and generate calls on the tiny
preset. Without lmms-eval installed (it pulls its own torch), a minimal stand-in for the parts
of its API the model uses (the `lmms` base, `Instance`, `ModelManifest`, as in lmms-eval 0.6+)
takes its place; with lmms-eval installed the real ones are used."""

import abc
import importlib
import math
import sys
import types
from dataclasses import dataclass, field
from importlib.metadata import entry_points

import pytest

import tokendrop
from tokendrop.eval.generation import generate_answers
from tokendrop.loading import load_model, load_processor
from tokendrop.presets import synthetic_image

SIZES = [(96, 38), (38, 96), (100, 60), (64, 64), (120, 50)]


def stand_in_modules() -> dict[str, types.ModuleType]:
    class CacheHook:
        def add_partial(self, attr, request, response):
            pass

    class lmms(abc.ABC):
        is_simple = True

        def __init__(self):
            self._rank, self._world_size = 0, 1
            self.cache_hook = CacheHook()
            self.task_dict = {}

        @property
        def rank(self):
            return self._rank

        @property
        def world_size(self):
            return self._world_size

        @abc.abstractmethod
        def loglikelihood(self, requests): ...

        @abc.abstractmethod
        def generate_until(self, requests): ...

        @abc.abstractmethod
        def generate_until_multi_round(self, requests): ...

    @dataclass
    class Instance:
        request_type: str
        arguments: tuple
        idx: int
        metadata: dict = field(default_factory=dict)

        @property
        def args(self):
            return self.arguments

    @dataclass(frozen=True)
    class ModelManifest:
        model_id: str
        simple_class_path: str | None = None
        chat_class_path: str | None = None
        aliases: tuple = ()

    modules = {
        name: types.ModuleType(name)
        for name in (
            "lmms_eval",
            "lmms_eval.api",
            "lmms_eval.api.model",
            "lmms_eval.api.instance",
            "lmms_eval.models",
            "lmms_eval.models.registry_v2",
        )
    }
    modules["lmms_eval.api.model"].lmms = lmms
    modules["lmms_eval.api.instance"].Instance = Instance
    modules["lmms_eval.models.registry_v2"].ModelManifest = ModelManifest
    return modules


@pytest.fixture
def api(monkeypatch):
    """(lmms base, Instance, real lmms-eval?), with tokendrop.eval.lmms imported against them."""
    monkeypatch.delitem(sys.modules, "tokendrop.eval.lmms", raising=False)
    try:
        from lmms_eval.api.instance import Instance
        from lmms_eval.api.model import lmms

        real = True
    except ImportError:
        modules = stand_in_modules()
        for name, module in modules.items():
            monkeypatch.setitem(sys.modules, name, module)
        lmms, Instance, real = modules["lmms_eval.api.model"].lmms, modules["lmms_eval.api.instance"].Instance, False
    yield lmms, Instance, real
    sys.modules.pop("tokendrop.eval.lmms", None)  # imported against this test's lmms_eval


def test_the_entry_point_registers_the_model(api):
    lmms, _, real = api
    (entry,) = [e for e in entry_points(group="lmms_eval.models") if e.name == "llava_hf_tokendrop"]
    manifest = entry.load()()
    assert manifest.model_id == "llava_hf_tokendrop"
    module, name = manifest.simple_class_path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, lmms) and cls.is_simple
    if real:  # lmms-eval's own registry finds it through the entry point
        from lmms_eval.models import get_model

        assert get_model("llava_hf_tokendrop") is cls


def requests(Instance, gen_kwargs_of):
    docs = [
        {"image": synthetic_image(w, h, seed=i), "question": f"What is shape {i}?"} for i, (w, h) in enumerate(SIZES)
    ]
    made = [
        Instance(
            "generate_until",
            (
                f"{d['question']}\nAnswer the question using a single word or phrase.",
                gen_kwargs_of(i),
                lambda doc: [doc["image"]],
                i,
                "shapes",
                "test",
            ),
            idx=0,
            metadata={"task": "shapes", "doc_id": i, "repeats": 1},
        )
        for i, d in enumerate(docs)
    ]
    return {"shapes": {"test": docs}}, made


def test_generate_until_answers_in_batches_as_one_by_one(api):
    from tokendrop.eval.lmms import LlavaHfTokendrop

    _, Instance, _ = api
    # two generation settings interleaved: batched per setting, answered in request order
    task_dict, reqs = requests(
        Instance, lambda i: {"until": ["ASSISTANT:"], "max_new_tokens": 2 + i % 2, "temperature": 0, "do_sample": False}
    )
    answers = {}
    for batch_size in ("1", "3"):  # lmms-eval passes its --batch_size as given
        lm = LlavaHfTokendrop(
            pretrained="tiny", method="hired", budget=0.25, alpha=0.25, batch_size=batch_size, device="cpu"
        )
        lm.task_dict = task_dict
        answers[batch_size] = lm.generate_until(reqs)
        assert [r.n_kept for r in lm.handle.last] == [max(1, math.floor(0.25 * r.n_before)) for r in lm.handle.last]
    assert answers["1"] == answers["3"]

    # the same as tokendrop.patch + generate on the model by hand, one request at a time
    model, processor = load_model("tiny"), load_processor("tiny")
    expected = []
    with tokendrop.patched(model, "hired", budget=0.25, alpha=0.25):
        for i, request in enumerate(reqs):
            doc = task_dict["shapes"]["test"][i]
            expected += generate_answers(
                model, processor, [[doc["image"]]], [request.args[0]], 2 + i % 2, stop_strings=["ASSISTANT:"]
            )
    assert answers["1"] == expected


def test_method_none_is_the_unpatched_model(api):
    from tokendrop.eval.lmms import LlavaHfTokendrop

    _, Instance, _ = api
    task_dict, reqs = requests(Instance, lambda i: {"max_new_tokens": 2})
    lm = LlavaHfTokendrop(pretrained="tiny", method="none", batch_size=2)
    lm.task_dict = task_dict
    assert lm.handle is None and not hasattr(lm.model, "_tokendrop_handle")
    model, processor = load_model("tiny"), load_processor("tiny")
    expected = generate_answers(
        model, processor, [[d["image"]] for d in task_dict["shapes"]["test"]], [r.args[0] for r in reqs], 2
    )
    assert lm.generate_until(reqs) == expected


def test_bad_model_args_fail_before_the_model_loads(api):
    from tokendrop.eval.generation import cut
    from tokendrop.eval.lmms import LlavaHfTokendrop

    for kwargs, message in [
        (dict(method="hired", alpah=0.5), "no option 'alpah'"),
        (dict(method="hird"), "Did you mean 'hired'"),
        (dict(method="hired", budget=0), "budget"),
        (dict(method="none", alpha=0.5), "takes no method options"),
        (dict(batch_size="auto"), "fixed batch size"),
    ]:
        with pytest.raises(ValueError, match=message):
            LlavaHfTokendrop(pretrained="tiny", **kwargs)
    lm = LlavaHfTokendrop(pretrained="tiny", method="random", budget=4)
    with pytest.raises(NotImplementedError, match="generation tasks"):
        lm.loglikelihood([])
    assert cut("yes ASSISTANT: no", ["ASSISTANT:"]) == "yes " and cut("yes", []) == "yes"


def test_until_stops_generation_and_requests_are_batched_longest_first(api, monkeypatch):
    """lmms-eval's `until` reaches `generate` as stop_strings (with the tokenizer), instead of
    a long generation cut afterwards; each batch holds prompts of similar length."""
    from tokendrop.eval.lmms import LlavaHfTokendrop

    _, Instance, _ = api
    task_dict, reqs = requests(Instance, lambda i: {"until": ["\n\n", "ASSISTANT:"], "max_new_tokens": 3})
    reqs = [Instance("generate_until", ("Q" * (10 * i + 1),) + r.args[1:], i) for i, r in enumerate(reqs)]
    lm = LlavaHfTokendrop(pretrained="tiny", method="random", budget=4, batch_size=2)
    lm.task_dict = task_dict
    calls, real = [], lm.model.generate

    def spy(*args, **kwargs):
        calls.append((kwargs["input_ids"].shape[0], kwargs.get("stop_strings"), kwargs.get("tokenizer")))
        return real(*args, **kwargs)

    monkeypatch.setattr(lm.model, "generate", spy)
    answers = lm.generate_until(reqs)
    assert len(answers) == len(reqs) and all(isinstance(a, str) for a in answers)
    assert all(stops == ["\n\n", "ASSISTANT:"] and tokenizer is lm.processor.tokenizer for _, stops, tokenizer in calls)
    assert [n for n, _, _ in calls] == [2, 2, 1]


def test_a_broken_lmms_eval_shows_its_own_import_error(monkeypatch, tmp_path):
    """lmms-eval installed, one of its dependencies missing: the message names that dependency."""
    package = tmp_path / "lmms_eval"
    (package / "api").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "api" / "__init__.py").write_text("")
    (package / "api" / "model.py").write_text("import a_dependency_that_is_missing\n")
    for name in [m for m in sys.modules if m == "lmms_eval" or m.startswith("lmms_eval.")] + ["tokendrop.eval.lmms"]:
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(
        ImportError,
        match="lmms-eval is installed, but importing it failed: No module named 'a_dependency_that_is_missing'",
    ) as info:
        importlib.import_module("tokendrop.eval.lmms")
    assert info.value.__cause__.name == "a_dependency_that_is_missing"
    for name in [m for m in sys.modules if m == "lmms_eval" or m.startswith("lmms_eval.")]:
        monkeypatch.delitem(sys.modules, name, raising=False)

"""The learned router: untrained it is `text`; trained, its selections follow its formula;
training touches nothing but the router, resumes exactly, and its files fail loudly."""

import hashlib
import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import BitsAndBytesConfig, LlavaNextForConditionalGeneration

import reference
import tokendrop
from conftest import QUESTIONS, greedy, prompt, without_hanging
from tokendrop import training
from tokendrop.adapters import adapter_for
from tokendrop.cli import main, task_examples
from tokendrop.eval import shapes
from tokendrop.method.router import SHIPPED, read_router
from tokendrop.presets import build_preset, synthetic_image
from tokendrop.selection import keep_count


def toy_examples(n, split="train", start=0):
    samples = (shapes.shapes_sample(split, i) for i in range(start, start + n))
    return [training.Example(s["image"], s["question"], s["answer"]) for s in samples]


def config(out, **overrides):
    settings = dict(out=out, steps=4, batch_size=2, samples=2, checkpoint_every=2, validate_every=100, progress=False)
    return training.RouterTraining(**(settings | overrides))


@pytest.fixture(scope="module")
def bed():
    return build_preset("testbed")


@pytest.fixture(scope="module")
def trained_router(bed, tmp_path_factory):
    """A router trained briefly on the testbed model (its learned term is no longer zero)."""
    out = tmp_path_factory.mktemp("router")
    model, processor = bed
    training.train_router(model, processor, toy_examples(24), config(out, steps=6, lr=0.05))
    return out


@pytest.fixture
def odd_batch(tiny):
    _, processor = tiny
    sizes = [(38, 96), (96, 38), (60, 100), (20, 140)]
    images = [synthetic_image(w, h, seed=10 + i) for i, (h, w) in enumerate(sizes)]
    questions = QUESTIONS + ["Is there a green circle?"]
    inputs = processor(images=images, text=[prompt(processor, q) for q in questions], return_tensors="pt", padding=True)
    return inputs, questions


def kept(model, inputs, method, **options):
    with tokendrop.patched(model, method, **options) as handle:
        greedy(model, inputs, n=1)
    return [r.indices for r in handle.last]


@pytest.mark.parametrize("scope", ["crops", "all"])
@pytest.mark.parametrize("budget", [0.5, 0.1, 0.02, 7])
def test_untrained_router_selects_what_text_selects(tiny, odd_batch, scope, budget):
    model, processor = tiny
    inputs, _ = odd_batch
    expected = kept(model, inputs, "text", budget=budget, scope=scope, processor=processor)
    assert kept(model, inputs, "router", budget=budget, scope=scope, processor=processor) == expected
    assert kept(model, inputs, "router", budget=budget, scope=scope, processor=processor, rank=3) == expected


def test_untrained_router_threshold_mode_is_text(tiny, odd_batch):
    model, processor = tiny
    inputs, _ = odd_batch
    expected = kept(model, inputs, "text", threshold=0.5, processor=processor)
    assert kept(model, inputs, "router", threshold=0.5, scope="crops", processor=processor) == expected


def test_router_at_full_budget_is_the_unpatched_model(bed, trained_router):
    model, processor = bed
    sample = shapes.shapes_sample("test", 3)
    inputs = processor(images=[sample["image"]], text=[prompt(processor, sample["question"])], return_tensors="pt")
    with tokendrop.patched(model, "router", budget=1.0, router=trained_router, processor=processor):
        patched_out = greedy(model, inputs, n=3)
    assert torch.equal(patched_out, greedy(model, inputs, n=3))


def router_reference(model, processor, inputs, questions, folder, budget):
    """Top-k of s_i = sum_j cos(v_i, x_j) + (v_i/|v_i| A) . (sum_j x_j/|x_j| B) + v_i/|v_i| . u,
    written from the formula with the saved tensors."""
    _, weights = read_router(folder)
    a, b, u = weights.visual.detach(), weights.question.detach(), weights.salience.detach()
    table = model.get_input_embeddings().weight.detach().float()
    tokenizer = processor.tokenizer
    with torch.no_grad():
        packed = adapter_for(model).image_features(inputs["pixel_values"], inputs["image_sizes"])
    result = []
    for (height, width), vectors, question in zip(inputs["image_sizes"].tolist(), packed, questions):
        _, layout = reference.features(model, height, width)
        visual = torch.stack([vectors[pos] for pos, (kind, _) in enumerate(layout) if kind == "f"]).float()
        ids = [i for i in tokenizer(question, add_special_tokens=False).input_ids if i not in tokenizer.all_special_ids]
        words = F.normalize(table[ids], dim=-1)
        cosine = torch.tensor(reference.text_scores(model, processor, visual, question))
        unit = F.normalize(visual, dim=-1)
        scores = cosine + (unit @ a) @ (words.sum(0) @ b) + unit @ u
        count = keep_count(budget, len(scores))
        result.append(sorted(sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))[:count]))
    return result


@pytest.mark.parametrize("budget", [0.25, 0.05, 3])
def test_trained_router_equals_its_formula(bed, trained_router, budget):
    model, processor = bed
    samples = [shapes.shapes_sample("test", i) for i in range(3)]
    questions = [s["question"] for s in samples]
    inputs = processor(
        images=[s["image"] for s in samples],
        text=[prompt(processor, q) for q in questions],
        return_tensors="pt",
        padding=True,
    )
    _, weights = read_router(trained_router)
    assert weights.question.abs().sum() > 0 and weights.salience.abs().sum() > 0  # it did learn
    selected = kept(model, inputs, "router", budget=budget, router=trained_router, processor=processor)
    assert selected == router_reference(model, processor, inputs, questions, trained_router, budget)
    text = kept(model, inputs, "text", budget=budget, scope="all", processor=processor)
    assert selected != text


def test_save_then_load_selects_the_same(bed, tmp_path):
    model, processor = bed
    out = tmp_path / "router"
    examples = toy_examples(8)
    weights = {}

    def keep_weights(w, folder, model, training_record):
        weights["trained"] = {k: v.detach().clone() for k, v in w.state_dict().items()}
        return save(w, folder, model, training_record)

    save = training.save_router
    training.save_router = keep_weights
    try:
        training.train_router(model, processor, examples, config(out, steps=3, lr=0.05))
    finally:
        training.save_router = save
    method = tokendrop.method.router.Router(budget=0.05, processor=processor)
    method.weights = tokendrop.method.router.RouterWeights(128, 8)
    method.weights.load_state_dict(weights["trained"])
    sample = shapes.shapes_sample("test", 5)
    inputs = processor(images=[sample["image"]], text=[prompt(processor, sample["question"])], return_tensors="pt")
    in_memory = kept(model, inputs, method)
    assert kept(model, inputs, "router", budget=0.05, router=out, processor=processor) == in_memory
    saved = json.loads((out / "router.json").read_text())
    assert saved["rank"] == 8 and saved["training"]["budget"] == 0.05 and saved["training"]["loss"] == "kl"
    assert saved["base_model"]["vocab_size"] == model.config.text_config.vocab_size
    assert saved["tokendrop_version"] == tokendrop.__version__


def test_training_changes_only_the_router(bed, tmp_path):
    model, processor = bed
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    model_params = [p for p in model.parameters() if p.requires_grad]
    assert model_params  # the fixture's model would learn if the loss reached it
    reached = []
    original = training.SelectionTrainer.loss

    def spy(self, router, examples, generator):
        loss, reward = original(self, router, examples, generator)
        grads = torch.autograd.grad(loss, model_params, allow_unused=True, retain_graph=True)
        reached.append((loss.requires_grad, sum(g is not None for g in grads)))
        return loss, reward

    training.SelectionTrainer.loss = spy
    try:
        training.train_router(model, processor, toy_examples(8), config(tmp_path / "r", steps=2, lr=0.05))
    finally:
        training.SelectionTrainer.loss = original
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert reached and all(has_grad and n == 0 for has_grad, n in reached)  # the loss reaches the router only
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags  # the user's model is left as it was


def test_a_short_run_improves_the_objective(bed, tmp_path):
    """The greedy (top-k) selection's KL to the unpruned answer falls on the training set."""
    model, processor = bed
    examples = toy_examples(16)
    untrained = training.objective(model, processor, None, examples, config(tmp_path / "a"))
    training.train_router(
        model, processor, examples, config(tmp_path / "b", steps=30, batch_size=8, samples=8, lr=0.03)
    )
    _, weights = read_router(tmp_path / "b")
    learned = training.objective(model, processor, weights, examples, config(tmp_path / "b"))
    assert learned < 0.5 * untrained  # 2.01 -> 0.19 to 0.43 over seeds 0, 1 and 2


def test_kill_and_resume_ends_with_the_same_weights(bed, tmp_path):
    model, processor = bed
    examples = toy_examples(10)
    training.train_router(model, processor, examples, config(tmp_path / "whole", steps=5, lr=0.05))

    original, calls = training.SelectionTrainer.loss, []

    def dies_at_step_four(self, *args):
        calls.append(1)
        if len(calls) == 4:  # after the checkpoint of step 2, before step 4 is done
            raise KeyboardInterrupt
        return original(self, *args)

    training.SelectionTrainer.loss = dies_at_step_four
    try:
        with pytest.raises(KeyboardInterrupt):
            training.train_router(model, processor, examples, config(tmp_path / "killed", steps=5, lr=0.05))
    finally:
        training.SelectionTrainer.loss = original
    assert json.loads((tmp_path / "killed" / "checkpoint" / "state.json").read_text())["step"] == 2
    training.train_router(model, processor, examples, config(tmp_path / "killed", steps=5, lr=0.05))
    _, whole = read_router(tmp_path / "whole")
    _, resumed = read_router(tmp_path / "killed")
    for name, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name])
    with pytest.raises(ValueError, match="other settings.*lr"):
        training.train_router(model, processor, examples, config(tmp_path / "killed", steps=5, lr=0.01))


def test_ce_loss_trains_from_answers_and_needs_them(bed, tmp_path):
    model, processor = bed
    out = training.train_router(model, processor, toy_examples(4), config(tmp_path / "ce", steps=2, loss="ce"))
    assert json.loads((out / "router.json").read_text())["training"]["loss"] == "ce"
    unlabelled = [training.Example(e.image, e.question) for e in toy_examples(4)]
    with pytest.raises(ValueError, match="needs reference answers"):
        training.train_router(model, processor, unlabelled, config(tmp_path / "x", steps=1, loss="mix"))


def test_bad_router_files_fail_clearly(bed, tiny, trained_router, tmp_path):
    model, processor = bed
    with pytest.raises(ValueError, match="trained on another model: text_hidden_size is 128 in the router, 64"):
        tokendrop.patch(tiny[0], "router", budget=0.1, router=trained_router, processor=tiny[1])
    other, _ = build_preset("tiny", seed=1)
    folder = tmp_path / "tiny-router"
    shutil.copytree(trained_router, folder)
    config_file = json.loads((folder / "router.json").read_text())
    config_file["base_model"] = tokendrop.method.router.fingerprint(adapter_for(tiny[0]))
    (folder / "router.json").write_text(json.dumps(config_file))
    with pytest.raises(ValueError, match="input-embedding rows differ"):
        tokendrop.patch(other, "router", budget=0.1, router=folder, processor=tiny[1])
    with pytest.raises(ValueError, match="rank=4 was given, but .* has rank 8"):
        tokendrop.patch(model, "router", budget=0.1, router=trained_router, rank=4, processor=processor)
    truncated = tmp_path / "truncated"
    shutil.copytree(trained_router, truncated)
    data = (truncated / "router.safetensors").read_bytes()
    (truncated / "router.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot be read .* damaged or truncated"):
        tokendrop.patch(model, "router", budget=0.1, router=truncated, processor=processor)
    reranked = tmp_path / "reranked"
    shutil.copytree(trained_router, reranked)
    config_file = json.loads((reranked / "router.json").read_text())
    config_file["rank"] = 4
    (reranked / "router.json").write_text(json.dumps(config_file))
    with pytest.raises(ValueError, match="do not belong together"):
        tokendrop.patch(model, "router", budget=0.1, router=reranked, processor=processor)
    (reranked / "router.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        tokendrop.patch(model, "router", budget=0.1, router=reranked, processor=processor)
    with pytest.raises(FileNotFoundError, match="router.json is missing"):
        tokendrop.patch(model, "router", budget=0.1, router=tmp_path / "nowhere", processor=processor)


def test_bad_training_settings_fail_before_loading(tmp_path):
    with pytest.raises(ValueError, match="loss must be one of kl, ce, mix"):
        training.RouterTraining(out=tmp_path, loss="mse")
    with pytest.raises(ValueError, match="samples must be an int >= 2"):
        training.RouterTraining(out=tmp_path, samples=1)
    with pytest.raises(ValueError, match="must contain"):
        training.RouterTraining(out=tmp_path, prompt_template="no placeholder")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.png", "question": "q"}\n["list"]\n')
    with pytest.raises(ValueError, match="line 2: expected an object"):
        training.read_jsonl(bad)
    bad.write_text('{"image": "a.png"}\n')
    with pytest.raises(ValueError, match="line 1: `question` must be a non-empty string"):
        training.read_jsonl(bad)


def test_router_runs_in_fp32_beside_a_bf16_model(tiny, odd_batch):
    model, processor = tiny
    half = build_preset("tiny", dtype=torch.bfloat16)[0]
    inputs, _ = odd_batch
    inputs = dict(inputs) | {"pixel_values": inputs["pixel_values"].to(torch.bfloat16)}
    expected = kept(half, inputs, "text", budget=0.2, scope="all", processor=processor)
    assert kept(half, inputs, "router", budget=0.2, processor=processor) == expected


def test_trains_on_a_4bit_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    model, processor = build_preset("tiny")
    model.save_pretrained(tmp_path / "tiny")
    quantized = LlavaNextForConditionalGeneration.from_pretrained(
        tmp_path / "tiny",
        device_map="cpu",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32),
    )
    examples = [training.Example(synthetic_image(96, 60, seed=i), "What is red?") for i in range(4)]
    out = training.train_router(quantized, processor, examples, config(tmp_path / "r", steps=2))
    _, weights = read_router(out)
    assert weights.question.abs().sum() > 0
    kept(
        quantized,
        processor(images=[examples[0].load_image()], text=[prompt(processor, "What is red?")], return_tensors="pt"),
        "router",
        budget=0.2,
        router=out,
        processor=processor,
    )


def test_train_router_command_and_the_shipped_router(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    lines = []
    for i, sample in enumerate(shapes.shapes_samples("train", 4)):
        sample["image"].save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "question": sample["question"], "answer": sample["answer"]}))
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "router"
    arguments = [
        "train-router",
        "--model",
        "testbed",
        "--data",
        str(data),
        "--out",
        str(out),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--samples",
        "2",
        "--validation",
        "shapes=validation",
        "--validation-samples",
        "4",
        "--validate-every",
        "2",
        "--no-progress",
    ]
    assert main(arguments) == 0
    assert "router.router=" in capsys.readouterr().out
    saved = json.loads((out / "router.json").read_text())
    assert saved["training"]["validation"] is not None and saved["training"]["examples"] == 4
    assert main(arguments) == 0  # finished: resumes at the last step and rewrites the same router
    assert json.loads((out / "router.json").read_text())["training"] == saved["training"]
    assert (
        main(
            [
                "train-router",
                "--model",
                "testbed",
                "--data",
                "shapes",
                "--out",
                str(tmp_path / "task"),
                "--steps",
                "1",
                "--batch-size",
                "2",
                "--samples",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # a usage error, not a traceback
        main(["train-router", "--model", "testbed", "--data", "nothing.jsonl", "--out", str(out), "--no-progress"])
    assert exit_info.value.code == 2 and "neither a file nor a task" in capsys.readouterr().err
    assert (SHIPPED["testbed"] / "router.json").is_file()
    shipped = json.loads((SHIPPED["testbed"] / "router.json").read_text())
    assert shipped["training"]["budget"] == 0.05


# --- what a router file must prove before it loads (issue 26) ---------------------------------


def copy_router(source, folder):
    shutil.copytree(source, folder)
    return folder


def rewrite_config(folder, change):
    config_file = json.loads((folder / "router.json").read_text())
    change(config_file)
    (folder / "router.json").write_text(json.dumps(config_file))


def test_a_byte_flipped_router_is_refused(bed, trained_router, tmp_path):
    model, processor = bed
    flipped = copy_router(trained_router, tmp_path / "flipped")
    data = bytearray((flipped / "router.safetensors").read_bytes())
    data[-3] ^= 0x10  # a bit of the last weight: the file still parses
    (flipped / "router.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match the checksum in .*router.json"):
        tokendrop.patch(model, "router", budget=0.1, router=flipped, processor=processor)


def test_non_finite_router_weights_are_refused_at_save_and_at_load(bed, trained_router, tmp_path):
    from safetensors.torch import save_file

    from tokendrop.method.router import save_router

    model, processor = bed
    _, weights = read_router(trained_router)
    with torch.no_grad():
        weights.salience[3] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        save_router(weights, tmp_path / "nan", {}, {})
    assert not (tmp_path / "nan" / "router.safetensors").exists()
    # written by other means, its checksum made to match: still refused
    folder = copy_router(trained_router, tmp_path / "nan-on-disk")
    save_file({k: v.contiguous() for k, v in weights.state_dict().items()}, folder / "router.safetensors")
    digest = hashlib.sha256((folder / "router.safetensors").read_bytes()).hexdigest()
    rewrite_config(folder, lambda c: c.update(weights_sha256=digest))
    with pytest.raises(ValueError, match="not finite"):
        tokendrop.patch(model, "router", budget=0.1, router=folder, processor=processor)


def test_non_finite_training_settings_are_refused(tmp_path, capsys, monkeypatch):
    from tokendrop import loading

    for lr in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="lr must be a finite number > 0"):
            training.RouterTraining(out=tmp_path, lr=lr)
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(SystemExit) as exit_info:
        main(["train-router", "--model", "testbed", "--data", "shapes", "--out", str(tmp_path / "r"), "--lr", "inf"])
    assert exit_info.value.code == 2 and "lr must be a finite number" in capsys.readouterr().err


def test_training_stops_when_the_loss_becomes_non_finite(bed, tmp_path, monkeypatch):
    model, processor = bed
    out = tmp_path / "diverged"
    rewards, calls = training.SelectionTrainer.rewards, []

    def nan_from_step_three(self, *args):
        calls.append(1)
        reward = rewards(self, *args)
        return reward if len(calls) < 3 else torch.full_like(reward, float("nan"))

    monkeypatch.setattr(training.SelectionTrainer, "rewards", nan_from_step_three)
    with pytest.raises(ValueError, match="loss became non-finite at step 3 .* lower learning rate than 0.05"):
        training.train_router(model, processor, toy_examples(8), config(out, steps=6, lr=0.05, checkpoint_every=1))
    assert not (out / "router.safetensors").exists()
    state = load_file(out / "checkpoint" / "state.safetensors")  # step 2's, untouched
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 2
    assert all(bool(torch.isfinite(t).all()) for t in state.values())


@pytest.mark.parametrize("part", ["vision tower", "projector"])
def test_a_router_refuses_a_model_with_another_vision_side(bed, trained_router, part):
    _, processor = bed
    other, _ = build_preset("testbed")
    module = adapter_for(other).vision_tower if part == "vision tower" else other.model.multi_modal_projector
    with torch.no_grad():
        for parameter in module.parameters():  # re-initialised; the language model untouched
            parameter.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="trained on another model: the vision tower or projector differs"):
        tokendrop.patch(other, "router", budget=0.1, router=trained_router, processor=processor)


@pytest.mark.parametrize(
    "drop, named",
    [
        (lambda c: c.pop("base_model"), "base_model"),
        (lambda c: c["base_model"].pop("embedding_sample"), "base_model.embedding_sample"),
        (lambda c: c.pop("weights_sha256"), "weights_sha256"),
        (lambda c: c["base_model"].pop("vision_sample"), "base_model.vision_sample"),
    ],
)
def test_a_router_json_missing_a_field_names_it(bed, trained_router, tmp_path, drop, named):
    model, processor = bed
    folder = copy_router(trained_router, tmp_path / "incomplete")
    rewrite_config(folder, drop)
    with pytest.raises(ValueError, match=f"router.json lacks {named}"):
        tokendrop.patch(model, "router", budget=0.1, router=folder, processor=processor)


def test_a_shipped_name_and_a_local_folder_are_never_confused(bed, trained_router, tmp_path, monkeypatch):
    from tokendrop.method.router import Router

    _, processor = bed
    monkeypatch.chdir(tmp_path)
    copy_router(trained_router, tmp_path / "testbed")
    with pytest.raises(ValueError, match="both the router shipped with tokendrop and the folder"):
        Router(router="testbed", processor=processor)
    local = Router(router="./testbed", processor=processor).weights.state_dict()
    shipped = Router(router="tokendrop:testbed", processor=processor).weights.state_dict()
    assert all(torch.equal(local[k], read_router(trained_router)[1].state_dict()[k]) for k in local)
    assert all(torch.equal(shipped[k], read_router(SHIPPED["testbed"])[1].state_dict()[k]) for k in shipped)
    assert not torch.equal(local["salience"], shipped["salience"])


def test_train_router_prints_a_path_no_shipped_name_can_shadow(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    arguments = ["train-router", "--model", "testbed", "--data", "shapes", "--out", "testbed"]
    assert main([*arguments, "--steps", "1", "--batch-size", "2", "--samples", "2", "--no-progress"]) == 0
    assert "--option router.router=./testbed" in capsys.readouterr().out


# --- a training run: one process per --out, its identity, its data (issue 26) -------------------


def write_jsonl(folder, n=4, answers=True, start=0):
    """A JSONL of shapes samples whose images are PNG files beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(start, start + n):
        sample = shapes.shapes_sample("train", i)
        sample["image"].save(folder / f"{i}.png")
        row = {"image": f"{i}.png", "question": sample["question"]}
        lines.append(json.dumps(row | ({"answer": sample["answer"]} if answers else {})))
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "data.jsonl"


@pytest.fixture
def model_never_loads(monkeypatch):
    from tokendrop import loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model loaded"))


def train_router_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["train-router", "--model", "testbed", "--no-progress", *argv])
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_two_runs_into_one_out_are_refused(bed, tmp_path, monkeypatch):
    import threading

    model, processor = bed
    out = tmp_path / "router"
    inside, release = threading.Event(), threading.Event()
    loss = training.SelectionTrainer.loss

    def waits_in_the_first_step(self, *args):
        if threading.current_thread() is first:
            inside.set()
            release.wait(60)
        return loss(self, *args)

    monkeypatch.setattr(training.SelectionTrainer, "loss", waits_in_the_first_step)
    first = threading.Thread(
        target=lambda: training.train_router(model, processor, toy_examples(4), config(out, steps=1, budget=0.05))
    )
    first.start()
    assert inside.wait(60)
    try:
        with pytest.raises(ValueError, match=f"another train-router is writing {out} now"):
            training.train_router(model, processor, toy_examples(4), config(out, steps=1, budget=0.2))
    finally:
        release.set()
        first.join()
    assert json.loads((out / "router.json").read_text())["training"]["budget"] == 0.05


def test_resume_tells_budget_1_from_budget_1_0(bed, tmp_path):
    model, processor = bed
    training.train_router(model, processor, toy_examples(4), config(tmp_path / "r", steps=2, budget=1))
    with pytest.raises(ValueError, match="other settings \\(budget\\)"):
        training.train_router(model, processor, toy_examples(4), config(tmp_path / "r", steps=2, budget=1.0))


def test_resume_refuses_changed_images(bed, tmp_path):
    model, processor = bed
    data = write_jsonl(tmp_path / "data")
    training.train_router(model, processor, data, config(tmp_path / "r", steps=2))
    before = task_examples(f"custom={data}", "train").identity
    shapes.shapes_sample("train", 9)["image"].save(tmp_path / "data" / "1.png")  # same name, other pixels
    with pytest.raises(ValueError, match="other settings \\(data\\)"):
        training.train_router(model, processor, data, config(tmp_path / "r", steps=2))
    assert task_examples(f"custom={data}", "train").identity != before  # --data custom=FILE too


def test_empty_answers_are_refused(tmp_path):
    data = write_jsonl(tmp_path / "data")
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    rows[2]["answer"] = ""
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="line 3: `answer` must be a non-empty string"):
        training.read_jsonl(data)
    with pytest.raises(ValueError, match="validation examples need answers"):
        training.check_run(config(tmp_path / "r"), toy_examples(2), [training.Example(synthetic_image(9, 9), "q?", "")])


@pytest.mark.parametrize(
    "template", ["USER: <image>\n{question} {answer} ASSISTANT:", "<image> {0} {question}", "<image>{question} }"]
)
def test_a_prompt_template_with_other_fields_is_refused_when_made(tmp_path, template):
    with pytest.raises(ValueError, match="prompt_template may hold \\{question\\} and nothing else in braces"):
        training.RouterTraining(out=tmp_path, prompt_template=template)


def test_a_damaged_checkpoint_names_its_file(bed, tmp_path):
    model, processor = bed
    out = tmp_path / "r"
    training.train_router(model, processor, toy_examples(4), config(out, steps=2))
    state = out / "checkpoint" / "state.json"
    for damage in ("", state.read_text()[:40]):
        state.write_text(damage)
        with pytest.raises(ValueError, match=f"{state} cannot be read .*delete {out / 'checkpoint'}"):
            training.train_router(model, processor, toy_examples(4), config(out, steps=2))
    training.train_router(model, processor, toy_examples(4), config(tmp_path / "s", steps=2))
    tensors = tmp_path / "s" / "checkpoint" / "state.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"{tensors} cannot be read .*delete"):
        training.train_router(model, processor, toy_examples(4), config(tmp_path / "s", steps=2))


def test_an_image_that_is_a_fifo_is_refused_before_the_model_loads(tmp_path, capsys, model_never_loads):
    data = write_jsonl(tmp_path / "data")
    fifo = tmp_path / "data" / "2.png"
    fifo.unlink()
    os.mkfifo(fifo)
    error = without_hanging(lambda: train_router_error(capsys, "--data", str(data), "--out", str(tmp_path / "r")), fifo)
    assert f"{data}, line 3: {fifo} is not a regular file" in error


def test_train_router_checks_out_and_answers_before_the_model_loads(tmp_path, capsys, model_never_loads):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    labelled, unlabelled = write_jsonl(tmp_path / "with"), write_jsonl(tmp_path / "without", answers=False)
    for out in (a_file, a_file / "below"):
        error = train_router_error(capsys, "--data", str(labelled), "--out", str(out))
        assert (
            error.startswith(f"tokendrop train-router: error: cannot write to {out}: ")
            and "pick a folder you can write" in error
        )
    error = train_router_error(capsys, "--data", str(unlabelled), "--out", str(tmp_path / "r"), "--loss", "ce")
    assert "loss 'ce' needs reference answers" in error
    error = train_router_error(
        capsys, "--data", str(labelled), "--validation", str(unlabelled), "--out", str(tmp_path / "r")
    )
    assert "validation examples need answers" in error


def test_an_out_holding_another_run_is_refused_before_the_model_loads(bed, tmp_path, capsys, monkeypatch):
    model, processor = bed
    data = write_jsonl(tmp_path / "data")
    training.train_router(model, processor, data, config(tmp_path / "r", steps=1, lr=0.05))
    from tokendrop import loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    error = train_router_error(capsys, "--data", str(data), "--out", str(tmp_path / "r"), "--lr", "0.01")
    assert f"{tmp_path / 'r' / 'checkpoint'} belongs to a run with other settings (" in error and "lr" in error

"""Training the learned router (`method="router"`) with the model frozen.

    tokendrop.train_router(model, processor, "train.jsonl", RouterTraining(out="my-router"))
    tokendrop.patch(model, "router", budget=0.05, router="my-router", processor=processor)

The objective is the one the router serves: the pruned model should answer as the unpruned
model does. For each training prompt the unpruned model runs once (the teacher). Then
`samples` selections of the training budget's size are drawn from the router's scores
(Gumbel top-k, i.e. Plackett-Luce sampling without replacement), each pruned prompt runs
through the same compaction path as a patched `generate`, and each earns a reward:
- `loss="kl"` (default, label-free): minus KL(unpruned || pruned) of the first answer
  token's distribution;
- `loss="ce"`: the log-likelihood of the data's reference answer (every answer token);
- `loss="mix"`: both added.
The router's scores get the policy gradient of that reward (REINFORCE: each sample's reward
minus the mean of the prompt's other samples, times the gradient of the sample's log
probability). This optimises the real, discrete selection at the budget it will run at, needs
no differentiable relaxation of the LLM, and keeps its attention kernel (sdpa, flash) as it is.
Distilling the unpruned model's own relevance (gradient saliency of its answer) was tried
first: on the testbed it ranked the queried object's tokens far worse (see the README).

Only the router's parameters train, in fp32; the model's weights never change: its passes run
without autograd, the router sees detached features, and the optimizer holds the router alone. `accelerate` places the
router and, under `accelerate launch`, splits each batch across processes (data parallel).
Every `checkpoint_every` steps the router and optimizer state are written to
`out/checkpoint/`; running again with the same arguments resumes there and ends with the same
weights as an uninterrupted run (the data order and the sampling noise are functions of the
seed and the step).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import shutil
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .adapters import adapter_for
from .checks import MissingInputError, UsageError, is_int, is_number
from .family import Request
from .files import image_digest, locked, open_image, regular_file, writable_folder
from .harness import chat_prompt, differences
from .method.router import Router, RouterWeights, fingerprint, save_router
from .patch import patched
from .selection import check_budget, keep_count, packed_keep_mask

LOSSES = ("kl", "ce", "mix")
CHECKPOINT = "checkpoint"
LOCK = "train-router.rank{}.lock"  # held by each process of a run while it trains into its --out


@dataclass(frozen=True)
class Example:
    """One training prompt: an image (a PIL image, a path, or a function that returns one), the
    question asked about it, and optionally the reference answer."""

    image: Image.Image | str | Path | Callable[[], Image.Image]
    question: str
    answer: str | None = None

    def load_image(self) -> Image.Image:
        image = self.image() if callable(self.image) else self.image
        if isinstance(image, (str, Path)):
            return open_image(image)  # never a FIFO, never a decompression bomb
        return image.convert("RGB")


@dataclass
class RouterTraining:
    """How to train a router. `budget` is the one it is trained and validated at (recorded in
    router.json). `batch_size` prompts per process and step, times `accumulate` steps of
    gradient accumulation per optimizer update; `steps` counts updates."""

    out: str | Path
    budget: float | int = 0.05
    loss: str = "kl"
    steps: int = 1000
    batch_size: int = 8
    accumulate: int = 1
    samples: int = 8  # selections drawn per prompt and step
    lr: float = 1e-2
    rank: int = 8
    scope: str = "all"
    seed: int = 0
    checkpoint_every: int = 100
    validate_every: int = 100
    prompt_template: str | None = None  # "... {question} ..." for a processor without a chat template
    progress: bool = True

    def __post_init__(self):
        self.budget = check_budget(self.budget)
        if self.loss not in LOSSES:
            raise UsageError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if not is_int(self.samples) or self.samples < 2:
            raise UsageError(
                f"samples must be an int >= 2 (each sample's baseline is the others' mean), got {self.samples!r}"
            )
        for name in ("steps", "batch_size", "accumulate", "rank", "checkpoint_every", "validate_every"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise UsageError(f"{name} must be an int >= 1, got {value!r}")
        if not is_number(self.lr) or not math.isfinite(self.lr) or not self.lr > 0:
            raise UsageError(f"lr must be a finite number > 0, got {self.lr!r}")
        if self.scope not in ("all", "crops"):
            raise UsageError(f"scope must be 'all' or 'crops', got {self.scope!r}")
        if self.prompt_template is not None:
            check_template(self.prompt_template)
        self.out = Path(self.out)

    def identity(self) -> dict:
        """The settings that decide the final weights (a resumed run must match them)."""
        fields = dataclasses.asdict(self)
        return {k: v for k, v in fields.items() if k not in ("out", "checkpoint_every", "validate_every", "progress")}


def check_template(template: str) -> None:
    """A prompt template fills in {question} alone: any other field (or a lone brace) would
    fail only when the first batch is made, after the model loaded."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError:  # a lone { or }
        fields = {None}
    if fields - {"question"}:
        raise UsageError(
            "prompt_template may hold {question} and nothing else in braces (write {{ or }} for a brace), "
            f"got {template!r}"
        )
    if not fields:
        raise UsageError(f"prompt_template must contain {{question}}, got {template!r}")


def read_jsonl(path: str | Path) -> list[Example]:
    """Examples from a JSONL file of {"image": path, "question": str, "answer": str?} lines;
    image paths are relative to the file. Every line is checked, then every image is checked
    to be a regular file (never read here: a FIFO would wait for ever)."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"training data {path} does not exist")
    rows = [
        (number, json_row(path, number, line)) for number, line in enumerate(path.read_text("utf-8").splitlines(), 1)
    ]
    rows = [(number, row) for number, row in rows if row is not None]
    if not rows:
        raise UsageError(f"training data {path} holds no examples")
    examples = []
    for number, row in rows:
        try:
            image = regular_file(path.parent / row["image"])
        except (OSError, ValueError) as error:
            raise UsageError(f"{path}, line {number}: {error}") from None
        examples.append(Example(image, row["question"], row.get("answer")))
    return examples


def json_row(path: Path, number: int, line: str) -> dict | None:
    """One line of a training JSONL, checked (None for a blank line)."""
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise UsageError(f"{path}, line {number}: not JSON ({error})") from None
    if not isinstance(row, dict):
        raise UsageError(f"{path}, line {number}: expected an object with image, question and answer")
    for name in ("image", "question"):
        if not isinstance(row.get(name), str) or not row[name]:
            raise UsageError(f"{path}, line {number}: `{name}` must be a non-empty string")
    answer = row.get("answer")
    if answer is not None and not (isinstance(answer, str) and answer.strip()):
        # an empty answer scores 0 whatever the model says
        raise UsageError(f"{path}, line {number}: `answer` must be a non-empty string (or left out), got {answer!r}")
    return row


def prompt_for(processor, question: str, template: str | None) -> str:
    """The user turn holding one image and the question, as the model expects it."""
    if template is not None:
        return template.format(question=question)
    if getattr(processor, "chat_template", None) is None:
        raise UsageError(
            "the processor has no chat template: give a prompt template with {question} in it "
            "(--prompt-template 'USER: <image>\\n{question} ASSISTANT:')"
        )
    return chat_prompt(processor, question)


def answer_text(processor, question: str, answer: str, template: str | None) -> str:
    """The text that follows the prompt when the model gives `answer`, end of turn included."""
    if template is not None:
        return " " + answer
    prompt = prompt_for(processor, question, None)
    full = chat_prompt(processor, question, answer=answer)
    if not full.startswith(prompt):
        raise UsageError(
            "the chat template renders an answered turn that does not start with the generation "
            "prompt; give --prompt-template to train with answers"
        )
    return full[len(prompt) :]


# --- one step -----------------------------------------------------------------------------


class SelectionTrainer:
    """The frozen model, its adapter, and the pieces of one training step."""

    def __init__(self, model, processor, config: RouterTraining):
        self.model, self.processor, self.config = model, processor, config
        self.adapter = adapter_for(model)
        self.tokenizer = getattr(processor, "tokenizer", processor)
        # the question rule (the chat template's parts, image token) exactly as the method applies it
        self.question_rule = Router(processor=processor, scope=config.scope)
        self.pad_token_id = self.tokenizer.pad_token_id or 0

    def batch(self, examples: list[Example]):
        """(model inputs, labels, answer width): the prompts, with the reference answers
        appended (right-padded to one width, labels on their tokens) when the loss uses them."""
        texts = [prompt_for(self.processor, e.question, self.config.prompt_template) for e in examples]
        inputs = self.processor(
            images=[e.load_image() for e in examples], text=texts, return_tensors="pt", padding=True
        )
        inputs = dict(inputs.to(self.model.device, self.model.dtype))
        if self.config.loss == "kl":
            return inputs, None, 0
        missing = [i for i, e in enumerate(examples) if e.answer is None]
        if missing:
            raise UsageError(
                f"loss {self.config.loss!r} needs reference answers; example {missing[0]} of the batch "
                "has none (use loss='kl', which needs no labels)"
            )
        answers = [
            self.tokenizer(
                answer_text(self.processor, e.question, e.answer, self.config.prompt_template), add_special_tokens=False
            ).input_ids
            for e in examples
        ]
        width = max(map(len, answers))
        ids = torch.tensor([a + [self.pad_token_id] * (width - len(a)) for a in answers], device=self.model.device)
        known = torch.tensor([[1] * len(a) + [0] * (width - len(a)) for a in answers], device=self.model.device)
        inputs["input_ids"] = torch.cat([inputs["input_ids"], ids], 1)
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"], known], 1)
        if "mm_token_type_ids" in inputs:  # a Qwen-VL processor's modality per position: text for the answer
            inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(ids)], 1)
        labels = torch.full_like(inputs["input_ids"], -100)
        labels[:, -width:] = torch.where(known.bool(), ids, -100)
        return inputs, labels, width

    def loss(self, router: nn.Module, examples: list[Example], generator: torch.Generator):
        """(policy-gradient loss, mean reward) of one batch: `samples` selections drawn per prompt."""
        samples = self.config.samples
        inputs, labels, width = self.batch(examples)
        images, unpruned = self.encode(inputs, examples, width)
        log_probs, keep_masks, kept = [], [], []
        for image in images:
            scores, candidates, fixed, k = self.candidate_scores(router, image)
            for _ in range(samples):
                order, log_prob = sample_top_k(scores, k, generator)
                log_probs.append(log_prob)
                self.keep(image, torch.cat([fixed, candidates[order.cpu()]]), keep_masks, kept)
        rewards = self.rewards(inputs, labels, width, keep_masks, kept, unpruned, samples).view(len(examples), samples)
        others = (rewards.sum(1, keepdim=True) - rewards) / (samples - 1)
        advantage = (rewards - others).flatten()
        loss = -(advantage.to(log_probs[0].device) * torch.stack(log_probs)).mean()
        return loss, rewards.mean().item()

    def greedy_loss(self, router: nn.Module, examples: list[Example]) -> float:
        """Minus the mean reward of the router's own top-k selection: what training lowers."""
        inputs, labels, width = self.batch(examples)
        images, unpruned = self.encode(inputs, examples, width)
        keep_masks, kept = [], []
        with torch.no_grad():
            for image in images:
                scores, candidates, fixed, k = self.candidate_scores(router, image)
                order = torch.sort(-scores, stable=True).indices[:k]
                self.keep(image, torch.cat([fixed, candidates[order.cpu()]]), keep_masks, kept)
        return -self.rewards(inputs, labels, width, keep_masks, kept, unpruned, 1).mean().item()

    def encode(self, inputs, examples, width):
        """The encoded images, each with its question, and the unpruned model's log
        probabilities at the first answer position (None when the loss does not use them)."""
        pixels, geometry = self.adapter.image_inputs
        options = {name: inputs[name] for name in self.adapter.call_options if name in inputs}
        with torch.no_grad():
            checked = self.adapter.check_images(inputs[pixels], inputs[geometry], **options)
            images = self.adapter.encode(inputs[pixels], checked, {}, **options)
            unpruned = None
            if self.config.loss != "ce":
                # the rewards' own path (`feed`), every vector kept
                keep_all = [
                    torch.ones(len(image.packed), dtype=torch.bool, device=image.packed.device) for image in images
                ]
                logits = self.pruned_logits(inputs, keep_all, images, 1)
                unpruned = logits[:, -width - 1].float().log_softmax(-1)
        for image, example in zip(images, examples):
            image.question = example.question
        return images, unpruned

    def candidate_scores(self, router: nn.Module, image):
        """(router scores of the tokens in scope, their indices, the indices always kept, how
        many of the scope to keep)."""
        in_scope = self.in_scope(image)
        candidates, fixed = torch.nonzero(in_scope).flatten(), torch.nonzero(~in_scope).flatten()
        with torch.no_grad():  # the model's embeddings stay out of the router's graph
            question = self.question_rule.questions([image])[0].to(image.packed.device)
        scores = router(image.features, question)
        return (
            scores[candidates.to(scores.device)],
            candidates,
            fixed,
            keep_count(self.config.budget, candidates.numel()),
        )

    @staticmethod
    def keep(image, chosen: torch.Tensor, keep_masks: list, kept: list) -> None:
        """Append the packed keep mask of `chosen` feature indices and the image it selects from."""
        keep_masks.append(packed_keep_mask(image.layout, torch.sort(chosen).values, "rows"))
        kept.append(image)

    def pruned_logits(self, inputs, keep_masks, images, repeat: int) -> torch.Tensor:
        """The model's logits on the prompts (each repeated `repeat` times: one image per prompt,
        so the images and their inputs too) with image i keeping `keep_masks[i]`, through the
        path a patched forward takes (`feed`, the family's `llm_call`)."""
        repeated = {name: value.repeat_interleave(repeat, 0) for name, value in inputs.items()}
        names = (*self.adapter.image_inputs, *self.adapter.call_options)
        request = Request(
            repeated["input_ids"], repeated["attention_mask"], {n: repeated[n] for n in names if n in repeated}, images
        )
        _, llm_inputs, _ = self.adapter.feed(
            request.input_ids,
            request.attention_mask,
            None,
            keep_masks,
            [image.packed for image in images],
            "left",
            self.pad_token_id,
            request,
        )
        with self.adapter.llm_call(llm_inputs, generating=False):
            return self.model(**llm_inputs).logits

    def rewards(self, inputs, labels, width, keep_masks, kept, unpruned, repeat: int) -> torch.Tensor:
        """(B * repeat,) reward of every selection, in (prompt, selection) order; `kept`: the
        image each selection keeps from."""
        with torch.no_grad():
            # the answer ends every row, whatever was dropped before it: its labels are the prompt's own
            targets = None if labels is None else labels.repeat_interleave(repeat, 0)
            logits = self.pruned_logits(inputs, keep_masks, kept, repeat).float()
            reward = torch.zeros(logits.shape[0], device=logits.device)
            if unpruned is not None:
                teacher = unpruned.repeat_interleave(repeat, 0)
                pruned = logits[:, -width - 1].log_softmax(-1)
                reward -= (teacher.exp() * (teacher - pruned)).sum(-1)
            if targets is not None:
                answer_logits = logits[:, -width - 1 : -1]
                answer = targets[:, -width:]
                ce = nn.functional.cross_entropy(
                    answer_logits.flatten(0, 1), answer.flatten(), ignore_index=-100, reduction="none"
                ).view(answer.shape)
                reward -= ce.sum(-1)
        return reward

    def in_scope(self, image) -> torch.Tensor:
        partition = image.layout.partition
        return partition > 0 if self.config.scope == "crops" else torch.ones_like(partition, dtype=torch.bool)


def sample_top_k(scores: torch.Tensor, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """k indices drawn without replacement from softmax(scores) (Gumbel top-k), in draw order,
    and the log probability of that ordered draw under Plackett-Luce (differentiable in scores)."""
    gumbel = -torch.log(-torch.log(torch.rand(scores.shape, generator=generator).clamp(min=1e-20)))
    order = torch.topk(scores.detach() + gumbel.to(scores.device), k).indices
    shifted = scores - scores.detach().max()
    weights = shifted.exp()
    drawn_before = torch.cumsum(weights[order], 0) - weights[order]
    remaining = (weights.sum() - drawn_before).clamp(min=1e-30)
    return order, shifted[order].sum() - remaining.log().sum()


# --- the loop -------------------------------------------------------------------------------


def example_order(n: int, seed: int, position: int) -> int:
    """The example at `position` of the training stream: epochs, each a seeded permutation."""
    epoch, offset = divmod(position, n)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return int(torch.randperm(n, generator=generator)[offset])


def hash_seed(*parts: int) -> int:
    """A seed for one micro-step's sampling noise, from the run's seed and where it is."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def learning_rate(config: RouterTraining, step: int) -> float:
    """Linear warm-up over the first 5% of the steps, then cosine decay to zero."""
    warmup = max(1, config.steps // 20)
    if step < warmup:
        return config.lr * (step + 1) / warmup
    return config.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, config.steps - warmup)))


def check_run(config: RouterTraining, examples: Sequence[Example], validation: Sequence[Example] | None = None) -> dict:
    """What can be checked of a run before its model loads, so that the command line fails
    at once: examples (with answers where the loss or validation reads them), an output
    folder that can be written, and no checkpoint of a run with other settings in it. Returns
    the run's identity without the model's fingerprint (`train_router` adds it)."""
    if not len(examples):
        raise UsageError("train_router needs at least one training example")
    if validation is not None:
        missing_answers(validation, "validation examples need answers (validation scores them)")
    if config.loss != "kl" and getattr(examples, "identity", None) is None:  # a task's rows always have them
        missing_answers(
            examples, f"loss {config.loss!r} needs reference answers (use loss 'kl', which needs no labels)"
        )
    writable_folder(config.out)
    identity = dict(config.identity(), data=data_hash(examples))
    meta = checkpoint_meta(config.out)
    if meta is not None:
        check_same_run(config.out, meta, identity, ignored=("model",))
    return identity


def missing_answers(examples: Sequence[Example], message: str) -> None:
    for index, example in enumerate(examples):
        if not (isinstance(example.answer, str) and example.answer.strip()):
            raise UsageError(f"{message}; example {index} has {example.answer!r}")


def train_router(
    model,
    processor,
    data: Sequence[Example] | str | Path,
    config: RouterTraining,
    validation: Sequence[Example] | None = None,
    checked: dict | None = None,
) -> Path:
    """Train a router for `model` on `data` (examples, or a JSONL path) and save it in
    `config.out` (router.safetensors + router.json); returns that folder. `validation`:
    examples with answers, scored (exact match) at the training budget every
    `config.validate_every` steps and at the end. One run at a time per `config.out`: a
    second fails at once. `checked`: what `check_run` returned for these arguments, where the
    caller ran it before loading the model (the command line)."""
    examples = read_jsonl(data) if isinstance(data, (str, Path)) else data
    checked = check_run(config, examples, validation) if checked is None else checked
    busy = f"another train-router is writing {config.out} now: wait for it to end, or train into another --out"
    # a lock per process, as `accelerate launch` starts them (RANK): every run has a process 0
    with locked(config.out / LOCK.format(os.environ.get("RANK", "0")), busy):
        return _train(model, processor, examples, config, validation, checked)


def _train(model, processor, examples, config: RouterTraining, validation, checked: dict) -> Path:
    from accelerate import Accelerator

    trainer = SelectionTrainer(model, processor, config)
    accelerator = Accelerator(gradient_accumulation_steps=config.accumulate, cpu=model.device.type == "cpu")
    hidden = model.config.get_text_config().hidden_size
    router = RouterWeights(hidden, config.rank, seed=config.seed)
    optimizer = torch.optim.AdamW(router.parameters(), lr=config.lr, weight_decay=0.0)
    identity = dict(checked, model=fingerprint(trainer.adapter))
    start, history = resume(config.out, identity, router, optimizer)
    router, optimizer = accelerator.prepare(router, optimizer)
    model.eval()

    bar = tqdm(
        total=config.steps,
        initial=start,
        desc="train-router",
        disable=not (config.progress and accelerator.is_main_process),
    )
    per_update = config.batch_size * config.accumulate * accelerator.num_processes
    for step in range(start, config.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        reward = 0.0
        for micro in range(config.accumulate):
            first = step * per_update + micro * config.batch_size * accelerator.num_processes
            first += accelerator.process_index * config.batch_size
            batch = [examples[example_order(len(examples), config.seed, first + i)] for i in range(config.batch_size)]
            generator = torch.Generator().manual_seed(hash_seed(config.seed, step, micro, accelerator.process_index))
            with accelerator.accumulate(router):
                loss, mean_reward = trainer.loss(router, batch, generator)
                check_finite(step + 1, "loss", [loss.detach()], config.lr)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            check_finite(step + 1, "router", list(router.parameters()), config.lr)
            reward += mean_reward / config.accumulate
        bar.update(1)
        bar.set_postfix(reward=f"{reward:.4f}")
        done = step + 1
        entry = {"step": done, "reward": reward}
        if validation and (done % config.validate_every == 0 or done == config.steps):
            entry["validation"] = validate(model, processor, accelerator.unwrap_model(router), config, validation)
            bar.write(f"step {done}: validation {entry['validation']:.1f}% at budget {config.budget}")
        history.append(entry)
        if accelerator.is_main_process and (done % config.checkpoint_every == 0 or done == config.steps):
            save_checkpoint(config.out, identity, accelerator.unwrap_model(router), optimizer, history)
    bar.close()
    accelerator.wait_for_everyone()
    weights = accelerator.unwrap_model(router)
    if accelerator.is_main_process:
        training = dict(
            config.identity(),
            examples=len(examples),
            final_reward=history[-1]["reward"] if history else None,
            validation=next((h["validation"] for h in reversed(history) if "validation" in h), None),
        )
        save_router(weights, config.out, identity["model"], training)
    return config.out


def check_finite(step: int, what: str, tensors: list[torch.Tensor], lr: float) -> None:
    """Stop a diverged run before it writes anything: a non-finite loss or router would be
    checkpointed, and its selections arbitrary."""
    if not all(bool(t.isfinite().all()) for t in tensors):
        raise UsageError(
            f"training diverged: the {what} became non-finite at step {step} (NaN or inf); nothing of this "
            f"step was saved. Train again with a lower learning rate than {lr}"
        )


def validate(model, processor, weights: RouterWeights, config: RouterTraining, examples) -> float:
    """Exact-match accuracy (case, spaces and end punctuation ignored) of greedy answers with
    the router at the training budget, in percent."""
    method = Router(budget=config.budget, scope=config.scope, processor=processor)
    method.weights = copy.deepcopy(weights)
    tokenizer = getattr(processor, "tokenizer", processor)
    right = 0
    with patched(model, method):
        for start in range(0, len(examples), config.batch_size):
            batch = examples[start : start + config.batch_size]
            texts = [prompt_for(processor, e.question, config.prompt_template) for e in batch]
            inputs = processor(
                images=[e.load_image() for e in batch], text=texts, return_tensors="pt", padding=True
            ).to(model.device, model.dtype)
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
            answers = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            right += sum(normalized(a) == normalized(e.answer) for a, e in zip(answers, batch))
    return 100 * right / len(examples)


def objective(
    model, processor, weights: RouterWeights | None, examples: Sequence[Example], config: RouterTraining
) -> float:
    """The training objective (minus the reward) of `weights`' top-k selections on
    `examples`, averaged (None: an untrained router)."""
    trainer = SelectionTrainer(model, processor, config)
    if weights is None:
        weights = RouterWeights(model.config.get_text_config().hidden_size, config.rank, seed=config.seed)
    weights = weights.to(model.device)
    losses = [
        trainer.greedy_loss(weights, list(examples[i : i + config.batch_size]))
        for i in range(0, len(examples), config.batch_size)
    ]
    return sum(losses) / len(losses)


def normalized(text: str) -> str:
    return text.strip().strip(".,!?;:'\"").strip().lower()


# --- checkpoints: safetensors and JSON, written whole or not at all -------------------------------


def save_checkpoint(out: Path, identity: dict, router: RouterWeights, optimizer, history: list[dict]) -> None:
    """Write out/checkpoint: the router, the optimizer state and every step's reward and
    validation so far (their count is the step), replacing the last checkpoint."""
    folder = out / CHECKPOINT
    scratch = out / f".{CHECKPOINT}.{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    state = optimizer.state_dict()
    tensors = {f"router.{k}": v.detach().cpu().contiguous() for k, v in router.state_dict().items()}
    for index, values in state["state"].items():
        tensors.update({f"optimizer.{index}.{k}": torch.as_tensor(v).cpu().contiguous() for k, v in values.items()})
    save_file(tensors, scratch / "state.safetensors")
    (scratch / "state.json").write_text(
        json.dumps(dict(step=len(history), identity=identity, history=history, param_groups=state["param_groups"]))
    )
    old = out / f".{CHECKPOINT}.old"
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    scratch.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def checkpoint_meta(out: Path) -> dict | None:
    """out/checkpoint/state.json (step, identity, history, optimizer settings), or None where
    no checkpoint is; a damaged one is refused, naming the file."""
    folder = out / CHECKPOINT
    if not folder.is_dir():
        old = out / f".{CHECKPOINT}.old"  # a kill between the two renames of a save
        if not old.is_dir():
            return None
        old.rename(folder)
    path = folder / "state.json"
    try:
        meta = json.loads(path.read_text())
        missing = [key for key in ("step", "identity", "history", "param_groups") if key not in meta]
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as error:
        missing = [f"a JSON object ({error})"]
    if missing:
        raise damaged_checkpoint(path, f"it lacks {', '.join(missing)}", folder)
    return meta


def damaged_checkpoint(path: Path, why: str, folder: Path) -> ValueError:
    return ValueError(
        f"{path} cannot be read ({why}): the checkpoint is damaged; delete {folder} to train from the start"
    )


def check_same_run(out: Path, meta: dict, identity: dict, ignored=()) -> None:
    """Refuse a checkpoint whose run had other settings than `identity` (compared as JSON, so
    that budget 1, one token, and 1.0, every token, differ), the keys `ignored` aside."""
    changed = [k for k in differences(identity, meta["identity"]) if k.split(".")[0] not in ignored]
    if changed:
        raise UsageError(
            f"{out / CHECKPOINT} belongs to a run with other settings ({', '.join(changed)}): resume with the "
            "same arguments, or train into another --out"
        )


def resume(out: Path, identity: dict, router: RouterWeights, optimizer) -> tuple[int, list[dict]]:
    """Load out/checkpoint into `router` and `optimizer` when it exists; (the step to start
    at, the steps' history so far)."""
    meta = checkpoint_meta(out)
    if meta is None:
        return 0, []
    check_same_run(out, meta, identity)
    path = out / CHECKPOINT / "state.safetensors"
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as error:
        raise damaged_checkpoint(path, str(error), out / CHECKPOINT) from None
    router.load_state_dict({k[len("router.") :]: v for k, v in tensors.items() if k.startswith("router.")})
    state: dict = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta["step"], meta["history"]


def data_hash(examples: Sequence[Example]) -> str:
    """What identifies the training data, so that a resumed run reads the same: a lazy
    source's own `identity`, else a hash of every question, answer and image (a file's
    content, a PIL image's pixels)."""
    identity = getattr(examples, "identity", None)
    if identity is not None:
        return str(identity)
    digest = hashlib.sha256()
    for e in examples:
        digest.update(f"{e.question}\x00{e.answer}\x00{image_identity(e.image)}\x00".encode())
    return digest.hexdigest()[:12]


def image_identity(image) -> str:
    """An example's image by content: a file's (a path, or a function that reads one and says
    where, as a task's rows do), a PIL image's pixels; nothing for another function, whose
    source's identity must say it."""
    path = image if isinstance(image, (str, Path)) else getattr(image, "path", None)
    if path is not None:
        return image_digest([path])
    if isinstance(image, Image.Image):
        return f"{image.mode}{image.size}{hashlib.sha256(image.tobytes()).hexdigest()}"
    return ""

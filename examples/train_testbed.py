"""Train the testbed model (`tokendrop.testbed`) from scratch on a CPU.

    python examples/train_testbed.py --seed 0 --out tokendrop/testbed

Two stages, as LLaVA's recipe on a small scale:
1. vision: the CLIP tower learns, through two linear heads, which (colour, shape) objects each
   tile holds (multi-label, from the CLS output) and which object each crop patch shows (from
   the layer that feeds the LLM). The CLS token so gathers image-level information by
   attending to the objects, which is what CLS attention means in CLIP. The base view is
   labelled with its colours only: its shapes are too small to label fairly.
2. language: the tower frozen, the projector and the LLM learn to answer the task's questions
   in the processor's chat template, with the loss on the answer tokens only. Each image's
   prompt prefix runs once and several independent questions continue it from its KV cache
   (no question sees another's answer, which a multi-turn chat would leak). For the first
   --spell-steps, an answer first repeats the shape asked about ("triangle red"): the
   LLM then finds the object from the token it is on, a one-step lookup it learns quickly,
   and learns to carry the shape word to the answer position, which the plain one-word
   answers of the rest of the stage need and which it is slow to find alone.
   After that, a share of the steps (--drop-share) prunes each image's prompt through
   tokendrop's own path (`Handle.prune`): the tokens of some of its objects stay, plus a random
   share (drawn per image from 0 to 1) of the others, and every question of that image asks
   about a kept object. The LLM so learns that fewer visual tokens is normal, and never sees
   a question whose answer was dropped, so it cannot learn to guess.

Every random draw follows --seed. It prints timings and accuracies and writes the weights
(safetensors), the config and the model card into --out.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import LlavaNextForConditionalGeneration

import tokendrop
from tokendrop.eval.shapes import (
    COLOURS,
    SHAPES,
    SIZE,
    TILE,
    Oracle,
    chance_accuracy,
    evaluate,
    object_features,
    questions_about,
    shapes_sample,
    shapes_samples,
)
from tokendrop.harness import chat_prompt
from tokendrop.method import Method
from tokendrop.patch import output_cache
from tokendrop.presets import build_config, build_processor

PAIRS = len(COLOURS) * len(SHAPES)
N_LABELS = PAIRS + len(COLOURS) + len(SHAPES)  # presence of: each pair, each colour, each shape
# pixels of an object a crop patch must hold to be labelled with it; a patch holding fewer
# (but some) is not labelled: a sliver of a shape does not show which shape it is
MIN_COVER = 24


def tile_labels(sample: dict, side: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What each tile (the base view, then the crops row by row) holds: presence
    (tiles, N_LABELS) and its mask (the base view counts its colours only); per patch
    (tiles, side * side) the index + 1 of the pair an object covers at least MIN_COVER pixels
    of, 0 for no object, -100 (ignored) for a sliver and on the base view."""
    per_row = SIZE // TILE
    tiles = 1 + per_row**2
    presence, mask = torch.zeros(tiles, N_LABELS), torch.ones(tiles, N_LABELS)
    mask[0, :PAIRS] = mask[0, PAIRS + len(COLOURS) :] = 0
    patches = torch.zeros(tiles, side, side, dtype=torch.long)
    patches[0] = -100
    patch_px = TILE // side
    edges = torch.arange(side) * patch_px
    for colour, shape, (x0, y0, x1, y1) in sample["objects"]:
        c, s = list(COLOURS).index(colour), SHAPES.index(shape)
        row, col = y0 // TILE, x0 // TILE  # objects lie whole in one crop
        crop = 1 + row * per_row + col
        for tile in (0, crop):
            presence[tile, [c * len(SHAPES) + s, PAIRS + c, PAIRS + len(COLOURS) + s]] = 1
        cover_x = (
            torch.minimum(edges + patch_px, torch.tensor(x1 - col * TILE))
            - torch.maximum(edges, torch.tensor(x0 - col * TILE))
        ).clamp(min=0)
        cover_y = (
            torch.minimum(edges + patch_px, torch.tensor(y1 - row * TILE))
            - torch.maximum(edges, torch.tensor(y0 - row * TILE))
        ).clamp(min=0)
        cover = cover_y[:, None] * cover_x[None, :]
        patches[crop][cover > 0] = -100
        patches[crop][cover >= MIN_COVER] = 1 + c * len(SHAPES) + s
    return presence, mask, patches.flatten(1)


class VisionHeads(nn.Module):
    """Training-only heads: which objects a tile holds, from the CLS output; which object each
    patch shows, from the layer whose output feeds the LLM."""

    def __init__(self, hidden: int):
        super().__init__()
        self.presence = nn.Linear(hidden, N_LABELS)
        self.patch = nn.Linear(hidden, 1 + PAIRS)

    def forward(self, tower, pixels: torch.Tensor, feature_layer: int):
        out = tower(pixel_values=pixels, output_hidden_states=True)
        return self.presence(out.pooler_output), self.patch(out.hidden_states[feature_layer][:, 1:])


def train_samples(start: int, n: int, seed: int) -> Iterator[dict]:
    return (shapes_sample("train", index, seed) for index in range(start, start + n))


def schedule(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def update(optimizer, parameters, loss: torch.Tensor, lr: float) -> None:
    """One AdamW step at `lr`, gradients clipped to norm 1."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad()
    loss.backward()
    nn.utils.clip_grad_norm_(parameters, 1.0)
    optimizer.step()


def vision_batch(processor, batch: list[dict], side: int):
    pixels = processor.image_processor([s["image"] for s in batch], return_tensors="pt")["pixel_values"]
    labels = [torch.cat(parts) for parts in zip(*(tile_labels(s, side) for s in batch))]
    return pixels.flatten(0, 1), *labels


def train_vision(model, processor, samples, args):
    tower, config = model.model.vision_tower, model.config
    side = config.vision_config.image_size // config.vision_config.patch_size
    heads = VisionHeads(tower.config.hidden_size)
    parameters = list(tower.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=args.vision_lr, weight_decay=0.01)
    start, running = time.perf_counter(), None
    tower.train()
    for step in range(args.vision_steps):
        pixels, presence, mask, patches = vision_batch(processor, [next(samples) for _ in range(args.batch)], side)
        presence_logits, patch_logits = heads(tower, pixels, config.vision_feature_layer)
        loss = (
            nn.functional.binary_cross_entropy_with_logits(presence_logits, presence, reduction="none") * mask
        ).sum() / mask.sum()
        loss = loss + nn.functional.cross_entropy(patch_logits.flatten(0, 1), patches.flatten())
        update(optimizer, parameters, loss, args.vision_lr * schedule(step, args.vision_steps, args.warmup))
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % 100 == 0 or step == args.vision_steps - 1:
            print(f"vision step {step:4d}  loss {running:.4f}  {time.perf_counter() - start:6.0f} s", flush=True)
    tower.eval()
    return time.perf_counter() - start, heads


def vision_accuracy(model, heads, processor, samples: list[dict]) -> dict[str, float]:
    """Percent of crops whose predicted set of objects is exactly right (from CLS), and of
    object patches of crops labelled with their object."""
    config = model.config
    side = config.vision_config.image_size // config.vision_config.patch_size
    pixels, presence, _, patches = vision_batch(processor, samples, side)
    with torch.no_grad():
        presence_logits, patch_logits = heads(model.model.vision_tower, pixels, config.vision_feature_layer)
    crops = torch.arange(len(pixels)) % (len(pixels) // len(samples)) != 0
    sets = ((presence_logits[crops, :PAIRS] > 0) == (presence[crops, :PAIRS] > 0)).all(-1)
    objects = patches > 0
    return dict(
        crop_sets=100 * sets.float().mean().item(),
        object_patches=100 * (patch_logits.argmax(-1)[objects] == patches[objects]).float().mean().item(),
    )


def questions(sample: dict, n: int, rng: np.random.Generator, objects: list | None = None) -> list[tuple[str, str]]:
    """The sample's own question, then n - 1 drawn from those the task can ask about its image;
    with `objects` (the objects a pruned prompt keeps), all n drawn from those about them."""
    if objects is not None:
        candidates = questions_about(objects)
        return [candidates[i] for i in rng.integers(len(candidates), size=n)]
    candidates = questions_about(sample["objects"])
    return [(sample["question"], sample["answer"])] + [candidates[i] for i in rng.integers(len(candidates), size=n - 1)]


@dataclass
class KeepObjects(Method):
    """The augmentation's selection: per image, in call order, the tokens of the objects of
    its plan plus a random `share` of the other tokens."""

    name = "keep-objects"
    plans: list = field(default_factory=list)  # per image: (boxes kept, share of the rest)
    generator: torch.Generator = field(default_factory=torch.Generator)

    def needs_budget(self) -> bool:  # its plans set each image's count
        return False

    def select(self, image):
        boxes, share = self.plans.pop(0)
        on_objects = torch.zeros(image.layout.n_features, dtype=torch.bool)
        for box in boxes:
            on_objects |= object_features(image.layout, box)
        others = torch.nonzero(~on_objects).flatten()
        count = math.floor(share * others.numel())
        chosen = others[torch.randperm(others.numel(), generator=self.generator)[:count]]
        return torch.sort(torch.cat([torch.nonzero(on_objects).flatten(), chosen])).values


def kept_objects(sample: dict, rng: np.random.Generator) -> list:
    """The objects a pruned prompt keeps: the one asked about, and each other with chance 1/2."""
    objects = sample["objects"]
    return [objects[0]] + [o for o in objects[1:] if rng.random() < 0.5]


def answer_labels(input_ids: torch.Tensor, marker: int, eos_id: int) -> torch.Tensor:
    """Labels that train the answer tokens only: each token after the generation prompt's
    `marker` token up to and including the end of turn; everything else is ignored (-100)."""
    labels = torch.full_like(input_ids, -100)
    for row, ids in enumerate(input_ids.tolist()):
        answering = False
        for position, token in enumerate(ids):
            if answering:
                labels[row, position] = token
                answering = token != eos_id
            elif token == marker:
                answering = True
    return labels


class Chats:
    """Training prompts in the processor's chat template, split where the image prefix ends
    ("USER: <image>\n"): the prefix once per image, then each question and its answer."""

    def __init__(self, processor):
        self.processor, self.tokenizer = processor, processor.tokenizer
        self.prefix, self.rest = chat_prompt(processor, "{question}", answer="{answer}").split("{question}")
        self.marker = self.tokenizer.convert_tokens_to_ids(" ASSISTANT:")

    def batch(self, samples: list[dict], n: int, spell: bool, rng: np.random.Generator, kept=None):
        """(prefix inputs, one per image; continuations, n per image in order; their labels).
        `spell`: the answers repeat the shape first ("triangle red"). `kept`: per image, the
        objects its pruned prompt keeps, which the questions then ask about."""
        prefix = self.processor(
            images=[s["image"] for s in samples], text=[self.prefix] * len(samples), return_tensors="pt"
        )
        texts = []
        for i, sample in enumerate(samples):
            for question, answer in questions(sample, n, rng, None if kept is None else kept[i]):
                if spell:
                    answer = f"{question.split()[-1].rstrip('?')} {answer}"
                texts.append(question + self.rest.format(answer=answer))
        rest = self.tokenizer(texts, add_special_tokens=False, padding=True, padding_side="right", return_tensors="pt")
        return prefix, rest, answer_labels(rest["input_ids"], self.marker, self.tokenizer.eos_token_id)


def continued(model, prefix, rest, n: int, labels=None, handle=None):
    """The model's output on the continuations, each after its image's prefix (run once).
    With a tokendrop `handle`, the prefix is pruned as a patched model prunes a prompt, left
    padded so that the continuations follow every row's end."""
    if handle is not None:
        images = {name: prefix[name] for name in handle.adapter.image_inputs}
        _, prefix, _ = handle.prune(prefix["input_ids"], prefix["attention_mask"], None, images, None, "left")
    cache = output_cache(model(**prefix, use_cache=True))
    cache.batch_repeat_interleave(n)
    mask = torch.cat([prefix["attention_mask"].repeat_interleave(n, 0), rest["attention_mask"]], 1)
    # the cache goes in by the name the release takes (`cache` from 5.2x; the old one warns there)
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return model(input_ids=rest["input_ids"], attention_mask=mask, labels=labels, **{name: cache})


def probe(model, chats: Chats, samples: list[dict]) -> float:
    """Percent of `samples` whose own question gets its one-word answer as the most likely
    next token."""
    prefix, rest, labels = chats.batch(samples, 1, False, np.random.default_rng(0))
    with torch.no_grad():
        logits = continued(model, prefix, rest, 1).logits
    first = (labels != -100).int().argmax(-1)
    rows = torch.arange(len(samples))
    return 100 * (logits[rows, first - 1].argmax(-1) == labels[rows, first]).float().mean().item()


def train_language(model, processor, samples, args) -> float:
    model.model.vision_tower.requires_grad_(False)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=args.language_lr, weight_decay=0.01, betas=(0.9, 0.98))
    chats, rng = Chats(processor), np.random.default_rng(args.seed)
    augment = KeepObjects()
    augment.generator.manual_seed(args.seed)
    validation = list(shapes_samples("validation", 256, seed=args.seed))
    start, running = time.perf_counter(), None
    model.train()
    model.model.vision_tower.eval()
    for step in range(args.language_steps):
        batch = [next(samples) for _ in range(args.batch)]
        if step >= args.spell_steps and rng.random() < args.drop_share:
            kept = [kept_objects(sample, rng) for sample in batch]
            prefix, rest, labels = chats.batch(batch, args.questions, False, rng, kept)
            augment.plans = [([box for _, _, box in objects], rng.random()) for objects in kept]
            with tokendrop.patched(model, augment) as handle:
                loss = continued(model, prefix, rest, args.questions, labels, handle).loss
        else:
            prefix, rest, labels = chats.batch(batch, args.questions, step < args.spell_steps, rng)
            loss = continued(model, prefix, rest, args.questions, labels).loss
        update(optimizer, parameters, loss, args.language_lr * schedule(step, args.language_steps, args.warmup))
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % 100 == 0 or step == args.language_steps - 1:
            model.eval()
            accuracy = probe(model, chats, validation)
            model.train()
            model.model.vision_tower.eval()
            print(
                f"language step {step:4d}  loss {running:.4f}  validation {accuracy:5.1f}%  "
                f"{time.perf_counter() - start:6.0f} s",
                flush=True,
            )
    model.eval()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("tokendrop/testbed"))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--vision-steps", type=int, default=1500)
    parser.add_argument("--language-steps", type=int, default=2400)
    parser.add_argument(
        "--spell-steps", type=int, default=600, help="language steps whose answers repeat the shape first"
    )
    parser.add_argument(
        "--drop-share",
        type=float,
        default=0.5,
        help="share of the language steps after --spell-steps whose prompts are pruned",
    )
    parser.add_argument("--vision-lr", type=float, default=3e-3)
    parser.add_argument("--language-lr", type=float, default=2e-3)
    parser.add_argument("--questions", type=int, default=8, help="questions per image in a language step")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (the reference run used 2)")
    parser.add_argument("--eval-samples", type=int, default=500, help="validation and test samples evaluated")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    processor = build_processor("testbed")
    config = build_config("testbed", processor.tokenizer)
    config._attn_implementation = "sdpa"
    model = LlavaNextForConditionalGeneration(config)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id

    # every training image is new: the language stage's follow the vision stage's
    seen = args.vision_steps * args.batch
    vision_s, heads = train_vision(model, processor, train_samples(0, seen, args.seed), args)
    vision = vision_accuracy(model, heads, processor, list(shapes_samples("validation", 256)))
    print("vision accuracy", vision, flush=True)
    language_images = train_samples(seen, args.language_steps * args.batch, args.seed)
    language_s = train_language(model, processor, language_images, args)
    total_s = vision_s + language_s
    print(
        f"training: vision {vision_s:.0f} s + language {language_s:.0f} s = {total_s / 60:.1f} min "
        f"on {args.threads} threads",
        flush=True,
    )

    validation = list(shapes_samples("validation", args.eval_samples))
    test = list(shapes_samples("test", args.eval_samples))
    results = {"validation": evaluate(model, processor, validation)["accuracy"]}
    results["test"] = evaluate(model, processor, test)["accuracy"]
    with tokendrop.patched(model, "random", budget=0.1):
        results["test_random_0.1"] = evaluate(model, processor, test)["accuracy"]
    for budget in (0.25, 0.1, 0.05, 0.02):
        oracle = Oracle(budget=budget)
        with tokendrop.patched(model, oracle):
            results[f"test_oracle_{budget}"] = evaluate(model, processor, test, oracle=oracle)["accuracy"]
    results["chance"] = 100 * chance_accuracy(list(shapes_samples("train", 5000, seed=args.seed)), test)
    print(json.dumps(results, indent=1), flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        args.out / "model.safetensors",
        metadata={"format": "pt", "seed": str(args.seed)},
    )
    config.to_json_file(args.out / "config.json")
    (args.out / "MODEL_CARD.md").write_text(model_card(model, args, vision, vision_s, language_s, results))
    print(f"wrote model.safetensors, config.json and MODEL_CARD.md in {args.out}", flush=True)


def model_card(model, args, vision: dict, vision_s: float, language_s: float, results: dict) -> str:
    tower = sum(p.numel() for p in model.model.vision_tower.parameters())
    total = sum(p.numel() for p in model.parameters())
    flags = (f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out")
    command = " ".join(["python examples/train_testbed.py", *flags])
    return f"""# The tokendrop testbed model

A tiny LLaVA-NeXT (`LlavaNextForConditionalGeneration`: a CLIP vision tower with a CLS token,
AnyRes pinpoints 48x96, 96x48 and 96x96 over 48 px tiles of 6x6 patches of 8 px, a 2-layer MLP
projector, a Llama LLM) trained from scratch on a CPU for the shapes task
(`tokendrop.eval.shapes`). It exists so that budget sweeps show real accuracy offline: a
method that drops the tokens of the small object a question is about loses the answer.
Load it with `tokendrop.presets.build_preset("testbed")`, or `--model testbed` on the command
line.

## Data
Synthetic and generated on the fly from seeds (`tokendrop.eval.shapes`): 96x96 images (2x2
crops of 48 px plus the base view) holding 3 or 4 shapes of 9 to 12 px, each another shape
(circle, square, triangle, cross) and another colour (of red, green, blue, yellow, purple,
cyan), on noise and grey clutter. The question asks for one shape's colour, "What colour is
the triangle?", answered in one word. The base view halves each object to 4 to 6 px, so
finding the shape needs the crops. Train, validation and test splits come from different seeds.

## Model
{total / 1e6:.2f} M parameters ({tower / 1e6:.2f} M in the vision tower), float32, in
`model.safetensors`; the architecture is `config.json`. Its tokenizer (byte-level, built by
`tokendrop.presets`) holds the task's words and the chat roles as whole tokens.

## Training
Reproduce with `{command}` ({args.threads} CPU threads).
1. Vision tower, {args.vision_steps} steps of {args.batch} images ({vision_s / 60:.1f} min): a linear
   head on the CLS output learns which (colour, shape) objects each tile holds (multi-label;
   the base view: its colours), and a linear head on the layer that feeds the LLM learns
   which object each crop patch shows. The CLS token so learns to attend to the objects, as
   CLIP's does to salient content. Validation: the object set of
   {vision["crop_sets"]:.1f}% of crops exactly right from CLS, {vision["object_patches"]:.1f}% of object patches
   labelled right.
2. Projector and LLM, tower frozen, {args.language_steps} steps of {args.batch} images
   ({language_s / 60:.1f} min): {args.questions} independent questions about each image (its
   prompt prefix run once), loss on the answer tokens; for the first {args.spell_steps} steps an
   answer first repeats the shape asked about ("triangle red"), which teaches the lookup
   quickly, then the one-word answers of the task. After those, {args.drop_share:.0%} of the steps
   prune each prompt through tokendrop's own path: the tokens of the object asked about (and
   of each other object with chance 1/2) stay, plus a random share of the rest drawn per
   image from 0 to 1; every question asks about a kept object. The LLM so learns that a
   pruned prompt is normal, without ever learning to guess a dropped answer.

Whole training: {(vision_s + language_s) / 60:.1f} min.

## Accuracy
Greedy answers, exact match, on the first {args.eval_samples} samples of each split:

| | accuracy |
|---|---|
| validation | {results["validation"]:.1f}% |
| test | {results["test"]:.1f}% |
| test, `random` at 10% of the visual tokens | {results["test_random_0.1"]:.1f}% |
| test, `oracle` at 25% / 10% / 5% / 2% (the queried object's tokens first, then CLS attention) | {results["test_oracle_0.25"]:.1f}% / {results["test_oracle_0.1"]:.1f}% / {results["test_oracle_0.05"]:.1f}% / {results["test_oracle_0.02"]:.1f}% |
| test, best blind guess (the most frequent answer to the same question in train) | {results["chance"]:.1f}% |

The budget sweep of every method is in docs/results.md ("The testbed").
"""


if __name__ == "__main__":
    main()

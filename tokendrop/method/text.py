"""Text-guided selection, SliME's training-free router (Zhang et al. 2024).

Each visual token after the projector (in the LLM's embedding space) scores
s_i = sum_j cos(v_i, x_j) over the LLM input embeddings x_j of the question's tokens. Then
either the top `budget` tokens, or (`threshold=gamma`) the adaptive SliME rule: p = softmax(s),
keep tokens in descending order while the cumulative p <= gamma, plus one.

Scope: "crops" (SliME's setting) scores and prunes the crop tokens only and keeps the base view
whole, so `budget` is a fraction (or count) of the crop tokens; "all" prunes every token, on the
same axis as the other methods. An image without crops (Qwen-VL's native resolution, an image
of a multi-image OneVision prompt) is one view, which either scope prunes whole.

Question tokens of a prompt row, exactly: the text after the row's last `<image>`, decoded;
in it the latest user question, where the chat template's own text puts it (learned by
rendering `processor`'s chat template around markers: after the last user turn that follows
an answer, else after the image's own turn, and up to the generation prompt), cleared of
special tokens, then re-tokenised and stripped of special tokens. So in a multi-turn chat the
question of the turn being answered selects, not every turn since the image. Where that rule
cannot tell, pass the question text explicitly: `model.generate(**inputs, questions=["...",
...])`, one per prompt row.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from itertools import islice

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from ..checks import UsageError, UsageTypeError, check_choice, check_real
from ..layout import EncodedImage, ImageBatch, ImageLayout
from ..selection import keep_count, order_key
from .base import Method, ProcessorNeeded, option, register

# stand-ins for a conversation's texts, to find where the chat template puts them
MARKERS = tuple(f"\u2063{word}\u2063" for word in ("FIRST", "ANSWER", "SECOND"))


@dataclass(frozen=True)
class Template:
    """Where the question stands in the chat template's text after a prompt's last image, in
    the template's own text (special tokens included): after `before` in the image's turn, or
    after the last `turn` (the end of an assistant's answer and the start of the next user
    turn) in a conversation that went on, and up to `after` (the generation prompt).
    `special`: the tokenizer's special tokens, which the question is cleared of."""

    before: str = ""
    after: str = ""
    turn: str = ""
    special: frozenset[str] = frozenset()

    @classmethod
    def of(cls, processor) -> Template:
        """Learned by rendering `processor`'s chat template around markers: a user turn with an
        image and a question, an answer, and a second question. No template: the whole text."""
        tokenizer = getattr(processor, "tokenizer", processor)
        special = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
        special = frozenset(special | set(tokenizer.all_special_tokens))
        if getattr(processor, "chat_template", None) is None:
            return cls(special=special)
        first, answer, second = MARKERS
        conversation = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": first}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
            {"role": "user", "content": [{"type": "text", "text": second}]},
        ]
        rendered = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        after_image = rendered.split(getattr(processor, "image_token", "<image>"))[-1]
        before, rest = after_image.split(first)
        turn, after = rest.split(answer)[1].split(second)
        return cls(before.strip(), after.strip(), turn.strip(), special)

    def question(self, text: str) -> str:
        """The latest user question in `text`, the decoded tokens after a prompt's last image."""
        turns = list(loose(self.turn).finditer(text)) if self.turn else []
        if turns:
            text = text[turns[-1].end() :]
        elif self.before and (start := loose(self.before).match(text.strip())):
            text = text.strip()[start.end() :]
        if self.after and (end := re.search(loose(self.after).pattern + r"\s*$", text)):
            text = text[: end.start()]
        for token in sorted(self.special, key=len, reverse=True):
            text = text.replace(token, "")
        return text.strip()


def loose(text: str) -> re.Pattern:
    """`text` as a pattern that any whitespace matches between its words: tokenizers decode
    the spaces around special tokens in their own ways."""
    return re.compile(r"\s*".join(re.escape(word) for word in text.split()))


@register("text", "SliME's training-free text router: the tokens most like the question's embeddings; needs processor=")
@dataclass
class Text(Method):
    threshold: float | None = option(
        None,
        "adaptive mode, in place of a budget: keep tokens in descending score while the cumulative softmax "
        "mass stays <= threshold, plus one",
    )
    scope: str = option(
        "crops", "'crops': the base view kept whole, the budget over the crop tokens; 'all': every token scored"
    )
    processor: object = option(
        None, "the model's processor (or tokenizer), to find and embed each prompt's question; required", repr=False
    )
    # read from the processor once, at patch time
    template: Template = field(init=False, repr=False, default=Template())
    image_token_id: int = field(init=False, repr=False, default=-1)

    def __post_init__(self):
        super().__post_init__()
        check_choice("scope", self.scope, ("crops", "all"))
        if self.threshold is not None:
            self.threshold = check_real("threshold", self.threshold, 1e-9, 1.0)
            if self.budget not in (None, 1.0):
                raise UsageError("text takes budget= (top-k) or threshold= (adaptive), not both")
        if self.processor is None:
            raise ProcessorNeeded(
                "text needs processor= (the model's processor or tokenizer) to find and embed the "
                "question: tokendrop.patch(model, 'text', budget=0.3, processor=processor)"
            )
        if not isinstance(self.tokenizer, PreTrainedTokenizerBase):
            raise UsageTypeError(
                "processor= must be the model's processor (as loaded with it, e.g. AutoProcessor.from_pretrained) "
                f"or its tokenizer, got {type(self.processor).__name__} {self.processor!r:.80}"
            )
        token = image_token(self.processor)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(token)
        if self.image_token_id in (None, self.tokenizer.unk_token_id):
            raise UsageError(f"processor= has no image token {token!r}: pass the patched model's own processor")
        self.template = Template.of(self.processor)

    def needs_budget(self) -> bool:
        return self.threshold is None

    def resolve(self, adapter) -> Text:
        if self.image_token_id != adapter.image_token_id:
            raise UsageError(
                f"processor= is another model's processor: its image token has id {self.image_token_id}, the "
                f"model's has id {adapter.image_token_id}. Pass the processor loaded with this model"
            )
        return self

    def reads(self) -> frozenset[str]:
        return frozenset({"features", "question"})

    def kept_count(self, layout: ImageLayout) -> int:
        """Under `threshold=` the count follows the scores: a ValueError."""
        if self.threshold is not None:
            raise UsageError(f"{self.name} with threshold= keeps a number of tokens that depends on the scores")
        if self.scope == "all" or layout.n_partitions == 1:
            return keep_count(self.budget, layout.n_features)
        return layout.sizes[0] + keep_count(self.budget, sum(layout.sizes[1:]))

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    def select_batch(self, batch: ImageBatch) -> torch.Tensor:
        layout = batch.layout
        questions = self.questions(batch.images)
        # image by image: each image's question differs in length (the scores stay on the device)
        scores = torch.stack([self.scores(image.features, q) for image, q in zip(batch.images, questions)])
        whole = self.scope == "all" or layout.n_partitions == 1  # an image without crops is one view
        in_scope = (layout.partition > 0) | whole
        n_candidates = layout.n_features if whole else sum(layout.sizes[1:])
        # candidates first, by descending score (ties: lower index; NaN last, as `order_key`
        # ranks), the tokens out of scope after them
        key = torch.where(in_scope, order_key(scores), float("-inf"))
        ranked = torch.sort(key, dim=-1, descending=True, stable=True).indices
        if self.threshold is None:
            count = torch.full((len(batch), 1), keep_count(self.budget, n_candidates), device=scores.device)
        elif self.threshold >= 1.0:
            count = torch.full((len(batch), 1), n_candidates, device=scores.device)
        else:
            top = scores.gather(-1, ranked[:, :n_candidates]).double()
            # a non-finite score holds no mass: it would make every share NaN
            top = torch.where(top.isfinite(), top, float("-inf"))
            mass = torch.cumsum(torch.softmax(top, -1), -1)
            count = ((mass <= self.threshold).sum(-1, keepdim=True) + 1).clamp(max=n_candidates)
        place = torch.arange(ranked.shape[-1], device=scores.device)
        kept = torch.zeros_like(in_scope.expand_as(scores)).scatter(-1, ranked, place < count)
        return kept | ~in_scope

    def scores(self, visual: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
        """(N,) fp32, on the device of `visual` (an image's (N, D) feature tokens): summed cosine
        similarity of each feature token to the question's (T, D) input embeddings, computed
        where the question is."""
        return cosine_scores(visual.to(question.device), question).to(visual.device)

    def questions(self, images: list[EncodedImage]) -> list[torch.Tensor]:
        """Each image's question as the LLM's (T, D) input embeddings, on the embedding's device:
        one lookup for all of them."""
        ids = self.question_ids(images)
        embed = images[0].embed
        looked_up = embed(torch.tensor([i for row in ids for i in row], device=embed.weight.device))
        return list(looked_up.split([len(row) for row in ids]))

    def question_ids(self, images: list[EncodedImage]) -> list[list[int]]:
        """Each image's question tokens (see the module docstring), worked out on the host: the
        prompts of the images without an explicit question are read back together, and each
        distinct question is tokenised once."""
        tokenizer = self.tokenizer
        prompts = iter(read_questions([image for image in images if image.question is None], self.image_token_id))
        texts = [
            image.question if image.question is not None else self.template.question(tokenizer.decode(next(prompts)))
            for image in images
        ]
        special = set(tokenizer.all_special_ids)
        distinct = list(dict.fromkeys(texts))
        tokens = {}
        for text, ids in zip(distinct, tokenizer(distinct, add_special_tokens=False).input_ids):
            tokens[text] = [i for i in ids if i not in special]
            if not tokens[text]:
                raise UsageError(
                    f"text found no question tokens in the prompt (text after the last image: {text!r}); "
                    "pass questions=[...] to generate/forward, one per prompt row"
                )
        return [tokens[text] for text in texts]


def read_questions(images: list[EncodedImage], image_token_id: int) -> list[list[int]]:
    """The tokens after the last image placeholder of each image's prompt row, padding
    removed: marked on the device and read back in one transfer for all the images (on an
    accelerator, one wait per call rather than several per image)."""
    if not images:
        return []
    if any(image.prompt_row is None for image in images):
        raise UsageError(
            "text reads each image's question from its prompt row, and these images carry none: "
            "pass questions=[...] to generate/forward, one per prompt row"
        )
    rows = []
    for image in images:
        row = image.prompt_row  # padding, then the row up to its last image, marked -1
        row = row if image.prompt_mask is None else row.masked_fill(image.prompt_mask != 1, -1)
        is_image = row == image_token_id
        rows.append(row.masked_fill((is_image.cumsum(0) < is_image.sum()) | is_image, -1))
    flat = iter(torch.cat(rows).tolist())
    return [[t for t in islice(flat, row.numel()) if t >= 0] for row in rows]


def cosine_scores(visual: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
    """(N, D), (T, D) -> (N,) fp32: sum_j cos(v_i, x_j)."""
    return (F.normalize(visual.float(), dim=-1) @ F.normalize(question.float(), dim=-1).T).sum(-1)


def image_token(processor) -> str:
    tokenizer = getattr(processor, "tokenizer", processor)
    return getattr(processor, "image_token", None) or getattr(tokenizer, "image_token", None) or "<image>"

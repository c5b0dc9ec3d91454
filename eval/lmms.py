"""lmms-eval model `llava_hf_tokendrop`: a LLaVA-NeXT checkpoint with a tokendrop patch.

    pip install 'tokendrop[lmms]'
    python -m lmms_eval --model llava_hf_tokendrop \\
        --model_args pretrained=llava-hf/llava-v1.6-vicuna-7b-hf,method=hired,budget=0.2 \\
        --tasks textvqa_val,pope --batch_size 4 --output_path logs/

`model_args`: `pretrained` (a Hugging Face id, local path or preset name), `method` ("none"
for the unpatched model), `budget`, any option of the method (`alpha=0.5`, ...), `dtype`,
`device_map`, `load_in_4bit`, `load_in_8bit`, `attn_implementation`. lmms-eval (>= 0.6)
finds the model through the `lmms_eval.models` entry point group; under `accelerate launch`
each process holds a whole model and lmms-eval shards the requests.
"""

from __future__ import annotations

import json

from tqdm.auto import tqdm

import tokendrop

from ..checks import MissingPackageError, UsageError
from ..harness import REFERENCE
from ..loading import LoadOptions, load_model, load_processor
from ..method import build as build_method
from .generation import generate_answers

try:
    from lmms_eval.api.model import lmms
except ImportError as error:
    if error.name in ("lmms_eval", "lmms_eval.api", "lmms_eval.api.model"):
        raise MissingPackageError("the lmms-eval model needs lmms-eval: pip install 'tokendrop[lmms]'") from error
    # lmms-eval is there, but one of its own imports failed: that is the cause to show
    raise ImportError(f"lmms-eval is installed, but importing it failed: {error}") from error

MODEL_ID = "llava_hf_tokendrop"
IMAGE_TOKEN = "<image>"
# lmms-eval's llava_hf default: tasks that set no limit stop at the end-of-sequence token
DEFAULT_MAX_NEW_TOKENS = 1024


def manifest():
    """The `lmms_eval.models` entry point: lmms-eval registers what this returns."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.LlavaHfTokendrop")


class LlavaHfTokendrop(lmms):
    """Answers lmms-eval's `generate_until` requests in batches of `batch_size`, the images
    first in the user turn of the model's chat template (as lmms-eval's llava_hf)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str = "llava-hf/llava-v1.6-vicuna-7b-hf",
        method: str = "hired",
        budget: float | int = 0.2,
        dtype: str = "auto",
        device: str | None = None,
        device_map=None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        load_in_4bit: bool = False,
        load_in_8bit: bool = False,
        attn_implementation: str | None = None,
        **options,
    ):
        # max_batch_size: lmms-eval passes it for --batch_size auto, which this model does not do
        super().__init__()
        try:
            self.batch_size = int(batch_size)
        except ValueError:
            raise UsageError(
                f"llava_hf_tokendrop takes a fixed batch size (e.g. --batch_size 4), got {batch_size!r}"
            ) from None
        if self.batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {self.batch_size}")
        if method == REFERENCE and options:
            raise UsageError(f"method=none (the unpatched model) takes no method options, got {', '.join(options)}")
        self.processor = load_processor(pretrained)
        if method != REFERENCE:  # a bad option fails before the model loads
            build_method(method, budget=budget, processor=self.processor, **options)
        from accelerate import PartialState

        state = PartialState()
        if state.num_processes > 1:  # data-parallel: a whole model per process
            device_map = {"": state.device}
            self._rank, self._world_size = state.process_index, state.num_processes
        elif device_map is None and device is not None:
            device_map = device
        self.pretrained = pretrained
        self.model = load_model(
            pretrained, LoadOptions(dtype, device_map, load_in_4bit, load_in_8bit, attn_implementation)
        )
        self.handle = (
            None
            if method == REFERENCE
            else tokendrop.patch(self.model, method, budget=budget, processor=self.processor, **options)
        )

    def generate_until(self, requests) -> list[str]:
        answers: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}  # requests with the same generation settings batch together
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        bar = tqdm(total=len(requests), desc="llava_hf_tokendrop", disable=self.rank != 0)
        for members in groups.values():
            settings = dict(requests[members[0]].args[1])
            until = settings.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            generation = _generation_settings(settings) | {"stop_strings": until}
            # longest prompts first, as lmms-eval's own models batch: similar lengths pad little,
            # and an out-of-memory batch shows at once
            members = sorted(members, key=lambda i: -len(requests[i].args[0]))
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                images, questions = [], []
                for i in chunk:
                    context, _, doc_to_visual, doc_id, task, split = requests[i].args
                    visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
                    images.append([v.convert("RGB") for v in visuals])
                    questions.append(context.replace(IMAGE_TOKEN, "").strip())  # images go first, once
                texts = generate_answers(self.model, self.processor, images, questions, **generation)
                for i, text in zip(chunk, texts):  # generation stopped at, and cut before, `until`
                    answers[i] = text
                    self.cache_hook.add_partial(
                        "generate_until", (requests[i].args[0], requests[i].args[1]), answers[i]
                    )
                bar.update(len(chunk))
        bar.close()
        return answers

    def loglikelihood(self, requests):
        raise NotImplementedError(
            "llava_hf_tokendrop only generates answers: use generation tasks (textvqa_val, pope, mme, ...)"
        )

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("llava_hf_tokendrop answers single-round requests only")


def _generation_settings(gen_kwargs: dict) -> dict:
    """lmms-eval's generation kwargs as `generate` takes them: greedy unless temperature > 0.
    Other keys are settings for other models (e.g. llava's image_aspect_ratio) and are ignored."""
    temperature = float(gen_kwargs.get("temperature") or 0)
    settings = dict(
        max_new_tokens=int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS),
        num_beams=int(gen_kwargs.get("num_beams") or 1),
        do_sample=temperature > 0,
    )
    if temperature > 0:
        settings["temperature"] = temperature
        if gen_kwargs.get("top_p") is not None:
            settings["top_p"] = float(gen_kwargs["top_p"])
    return settings

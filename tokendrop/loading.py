"""Loading a model and its processor: an embedded preset (built offline) or a checkpoint of a
supported family (a Hugging Face id or local path), in the dtype, placement and quantisation asked.
Shared by the command-line tools and the evaluation code."""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer, BitsAndBytesConfig

from .adapters import ADAPTERS
from .checks import MissingInputError, MissingPackageError, UsageError, UsageTypeError
from .family import ModelFacts
from .preset_specs import PRESETS
from .presets import QWEN_FAMILIES, QwenPilImageProcessor, build_preset, build_processor, preset_config
from .registry import did_you_mean

DTYPES = {
    "auto": "auto",
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")  # from_pretrained's placements over all GPUs


def check_model_name(spec: str) -> None:
    """A name with no slash that is neither a preset nor a local path is a typo, not a hub id
    (LLaVA-NeXT checkpoints are all org/name): say so instead of asking the hub."""
    if spec in PRESETS.names() or "/" in spec or Path(spec).exists():
        return
    raise UsageError(
        f"no preset or local path named {spec!r}; presets: {', '.join(PRESETS.names())}."
        f"{did_you_mean(spec, PRESETS.names())} A Hugging Face id has the form org/name"
    )


def check_device_map(device_map) -> None:
    """Refuse a placement that would fail only once the weights load."""
    if device_map is None or isinstance(device_map, dict) or device_map in STRATEGIES:
        return
    try:
        device = torch.device("cuda", device_map) if isinstance(device_map, int) else torch.device(device_map)
    except (RuntimeError, TypeError):
        raise UsageError(
            f"device_map must be {', '.join(STRATEGIES)}, cpu, cuda, cuda:N or a dict of module -> "
            f"device; got {device_map!r}"
        ) from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            seen = f"cuda:0 to cuda:{count - 1}" if count else "none"
            raise UsageError(
                f"device_map {device_map!r} needs a GPU that torch does not see (it sees {seen}): "
                "use cpu, or leave it out"
            )


@contextmanager
def reading(spec: str):
    """transformers' errors for a checkpoint it cannot find, reach or complete (a wrong id, no
    network, a folder without its files, a quantization package not installed) as the
    caller's to fix, with transformers' own message."""
    try:
        yield
    except ImportError as error:
        raise MissingPackageError(str(error)) from error
    except OSError as error:
        raise MissingInputError(str(error)) from error


def load_processor(spec: str):
    """The processor of an embedded preset or a Hugging Face id / local path, set to pad on
    the left: batched generation continues every row from its end."""
    check_model_name(spec)
    if spec in PRESETS.names():
        processor = build_processor(spec)
    else:
        with reading(spec):
            try:
                processor = AutoProcessor.from_pretrained(spec)
            except ImportError as error:  # a Qwen-VL video processor needs torchvision, which a CPU torch may lack
                processor = images_only_processor(spec, error)
    processor.tokenizer.padding_side = "left"
    return processor


def images_only_processor(spec: str, error: ImportError):
    """A Qwen-VL checkpoint's processor for images alone, built from its tokenizer, its image
    processor (the PIL one) and its chat template, where the stock one cannot load (its video
    processor needs torchvision); `error` is raised for any other model."""
    config = AutoConfig.from_pretrained(spec)
    if config.model_type not in QWEN_FAMILIES:
        raise error
    tokenizer = AutoTokenizer.from_pretrained(spec)
    template = tokenizer.chat_template
    for name in ("chat_template.jinja", "chat_template.json"):
        path = Path(spec) / name
        if template is None and path.is_file():
            text = path.read_text()
            template = text if name.endswith(".jinja") else json.loads(text)["chat_template"]
    return QWEN_FAMILIES[config.model_type][2](
        image_processor=QwenPilImageProcessor.from_pretrained(spec), tokenizer=tokenizer, chat_template=template
    )


def model_facts(spec: str) -> ModelFacts:
    """What methods read of the model `spec` names (its vision layers, feature layer, image
    token), from its configuration alone: harnesses check every method against it before the
    weights load (`tokendrop.method.base.check_fits`)."""
    check_model_name(spec)
    if spec in PRESETS.names():
        config = preset_config(spec)
    else:
        with reading(spec):
            config = AutoConfig.from_pretrained(spec)
    return adapter_class(spec, config).facts(config)


def adapter_class(spec: str, config):
    """The adapter class of a model's `config`; another family fails here, before its weights load."""
    if config.model_type not in ADAPTERS.names():
        raise UsageError(
            f"{spec} is a {config.model_type!r} model; tokendrop has adapters for {', '.join(ADAPTERS.names())}"
        )
    return ADAPTERS.get(config.model_type)


@dataclass(frozen=True)
class LoadOptions:
    """How `load_model` loads a model: checked when made, before any weights load."""

    dtype: str = "auto"  # a key of DTYPES
    # passed to `from_pretrained` ("auto", "cpu", {"": "cuda:1"}, ...); None: "auto" with a GPU,
    # the CPU without. A preset is moved to the device it names
    device_map: str | int | dict | None = None
    load_in_4bit: bool = False  # bitsandbytes
    load_in_8bit: bool = False
    attn_implementation: str | None = None  # "sdpa", "eager", "flash_attention_2"; None: the model's default

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise UsageError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.load_in_4bit and self.load_in_8bit:
            raise UsageError("pick one of load_in_4bit and load_in_8bit")
        check_device_map(self.device_map)

    @property
    def quantization(self) -> str | None:
        return "4bit" if self.load_in_4bit else "8bit" if self.load_in_8bit else None


def load_model(spec: str, options: LoadOptions | None = None, **fields):
    """An embedded preset or a checkpoint of a family tokendrop has an adapter for (Hugging
    Face id or local path), loaded as `options` say (or `LoadOptions(**fields)`: e.g.
    `load_model(spec, dtype="bf16")`); another family fails before its weights load."""
    if options is not None and fields:
        raise UsageTypeError("load_model takes a LoadOptions or its fields as keywords, not both")
    options = LoadOptions(**fields) if options is None else options
    check_model_name(spec)
    dtype = options.dtype
    attention = {"attn_implementation": options.attn_implementation} if options.attn_implementation else {}
    if spec in PRESETS.names():
        if options.quantization:
            raise UsageError(f"preset {spec!r} is built in memory: quantize a checkpoint instead")
        model, _ = build_preset(spec, dtype=torch.float32 if dtype == "auto" else DTYPES[dtype], **attention)
        return model.to(_preset_device(options.device_map))
    quantization = None
    if options.quantization:
        compute = torch.float16 if dtype == "auto" else DTYPES[dtype]
        quantization = BitsAndBytesConfig(
            load_in_4bit=options.load_in_4bit, load_in_8bit=options.load_in_8bit, bnb_4bit_compute_dtype=compute
        )
    device_map = options.device_map
    if device_map is None:
        device_map = "auto" if torch.cuda.is_available() else "cpu"
    with reading(spec):
        config = AutoConfig.from_pretrained(spec)
    adapter_class(spec, config)
    try:
        with reading(spec):
            model = AutoModelForImageTextToText.from_pretrained(
                spec,
                config=config,
                dtype=DTYPES[dtype],
                device_map=device_map,
                quantization_config=quantization,
                **attention,
            )
    except SafetensorError as error:
        raise UsageError(
            f"cannot load the weights of {spec}: {error}. The checkpoint is damaged or cut short: download or "
            "save it again"
        ) from None
    return model.eval()


def _preset_device(device_map) -> torch.device:
    if isinstance(device_map, dict):
        device_map = next(iter(device_map.values()))
    if device_map is None or device_map in STRATEGIES:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device_map)

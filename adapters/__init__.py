"""Per-model-family glue. An adapter knows where a family keeps its vision layers, the
partition geometry of each image, how to run the vision pass, and how to feed the LLM a
shortened prompt; methods never touch model internals. One adapter per family, chosen from
the model itself."""

from __future__ import annotations

from tokendrop.registry import Registry

from ..checks import UsageError
from .llava_next import LlavaNextAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .qwen_vl import Qwen2_5_VLAdapter, Qwen2VLAdapter, Qwen3VLAdapter

ADAPTERS = Registry("adapter")
ADAPTERS.register("llava_next")(LlavaNextAdapter)
ADAPTERS.register("llava_onevision")(LlavaOnevisionAdapter)
ADAPTERS.register("qwen2_vl")(Qwen2VLAdapter)
ADAPTERS.register("qwen2_5_vl")(Qwen2_5_VLAdapter)
ADAPTERS.register("qwen3_vl")(Qwen3VLAdapter)


def adapter_for(model):
    """The adapter of the model's family; raises ValueError naming the supported ones."""
    for _, adapter in ADAPTERS.items():
        if adapter.supports(model):
            return adapter(model)
    supported = ", ".join(f"{name} ({cls.model_class})" for name, cls in ADAPTERS.items())
    raise UsageError(f"tokendrop cannot patch a {type(model).__name__}; supported models: {supported}")


__all__ = [
    "ADAPTERS",
    "adapter_for",
    "LlavaNextAdapter",
    "LlavaOnevisionAdapter",
    "Qwen2VLAdapter",
    "Qwen2_5_VLAdapter",
    "Qwen3VLAdapter",
]

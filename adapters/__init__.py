"""Per-model-family glue. An adapter knows where a family keeps its vision layers, the
partition geometry of each image, how to run the vision pass, and how to feed the LLM a
shortened prompt; methods never touch model internals. One adapter per family, chosen from
the model itself."""

from __future__ import annotations

from tokendrop.registry import Registry

from .llava_next import LlavaNextAdapter
from .llava_onevision import LlavaOnevisionAdapter

ADAPTERS = Registry("adapter")
ADAPTERS.register("llava_next")(LlavaNextAdapter)
ADAPTERS.register("llava_onevision")(LlavaOnevisionAdapter)


def adapter_for(model):
    """The adapter of the model's family; raises ValueError naming the supported ones."""
    for _, adapter in ADAPTERS.items():
        if adapter.supports(model):
            return adapter(model)
    supported = ", ".join(f"{name} ({cls.model_class})" for name, cls in ADAPTERS.items())
    raise ValueError(f"tokendrop cannot patch a {type(model).__name__}; supported models: {supported}")


__all__ = ["ADAPTERS", "adapter_for", "LlavaNextAdapter", "LlavaOnevisionAdapter"]

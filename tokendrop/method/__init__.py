"""Every selection method, one per file. Importing this package registers them all, in the
order `tokendrop.methods()` and the command line list them."""

from .base import METHODS, Method, build, describe
from .base_view import BaseView
from .cls import CLS
from .divprune import DivPrune
from .dpp import DPP
from .globalcom2 import GlobalCom2
from .hired import HiRED
from .pool import Pool
from .random import Random
from .router import Router
from .text import Text
from .uniform import Uniform
from .visionzip import VisionZip

__all__ = [
    "METHODS",
    "Method",
    "build",
    "describe",
    "BaseView",
    "CLS",
    "DivPrune",
    "DPP",
    "GlobalCom2",
    "HiRED",
    "Pool",
    "Random",
    "Router",
    "Text",
    "Uniform",
    "VisionZip",
]

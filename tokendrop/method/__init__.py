"""Every selection method, one per file. Importing this package registers them all."""

from . import base_view, cls, divprune, dpp, globalcom2, hired, pool, random, router, text, uniform, visionzip  # noqa: F401  (registration)  # noqa: F401,I001  (registered after, in this order)
from .base import METHODS, Method, build, describe

__all__ = ["METHODS", "Method", "build", "describe"]

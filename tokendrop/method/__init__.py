"""Every selection method, one per file. Importing this package registers them all."""

from . import globalcom2, hired, pool, random, router, text, uniform, visionzip  # noqa: F401  (registration)
from .base import METHODS, Method, build, describe, with_processor

__all__ = ["METHODS", "Method", "build", "describe", "with_processor"]

"""Every selection method, one per file. Importing this package registers them all."""

from . import hired, random, uniform  # noqa: F401  (registration)
from .base import METHODS, Method, build, describe

__all__ = ["METHODS", "Method", "build", "describe"]

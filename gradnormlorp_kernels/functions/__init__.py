"""Thin autograd Functions: forward and backward call the ops, never autograd through the formula."""

from .adapter_linear import AdapterLinearFunction
from .full_linear import FullLinearFunction

__all__ = ["AdapterLinearFunction", "FullLinearFunction"]

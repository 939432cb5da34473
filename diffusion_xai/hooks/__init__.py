"""UNet hooks: attention recording/editing through the processor API, and module forward hooks."""

from .activations import ActivationPatcher, ActivationRecorder
from .attention import AttentionEditor, AttentionRecorder, LayerFilter
from .manager import CallContext, HookedAttnProcessor, HookManager

__all__ = ["ActivationPatcher", "ActivationRecorder", "AttentionEditor", "AttentionRecorder", "CallContext",
           "HookManager", "HookedAttnProcessor", "LayerFilter"]

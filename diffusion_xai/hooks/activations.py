"""Forward hooks on named UNet modules: record activations, or patch them."""

from __future__ import annotations

import difflib
from collections.abc import Callable

import torch

from .manager import CallContext


def resolve_modules(unet: torch.nn.Module, names) -> dict[str, torch.nn.Module]:
    """Map module names (as in ``unet.named_modules()``) to modules; clear error for unknown ones."""
    modules = dict(unet.named_modules())
    out = {}
    for n in names:
        if n not in modules:
            close = difflib.get_close_matches(n, list(modules), n=3)
            raise ValueError(f"module {n!r} is not in this UNet; closest: {', '.join(close) or 'none'}")
        out[n] = modules[n]
    return out


def _first_tensor(output):
    return output[0] if isinstance(output, tuple) else output


class ActivationRecorder:
    """Records the outputs of named UNet modules at every UNet call.

    ``records[name]`` is a list (one entry per call) of detached tensors, the first tensor of
    the module's output, moved to ``device`` when given (e.g. "cpu" to save accelerator memory).
    """

    def __init__(self, names, device: str | torch.device | None = None):
        self.names = list(names)
        if not self.names:
            raise ValueError("give at least one module name")
        self.device = device
        self.records: dict[str, list[torch.Tensor]] = {n: [] for n in self.names}

    def install(self, unet, manager) -> list:
        handles = []
        for name, mod in resolve_modules(unet, self.names).items():
            def hook(module, args, output, _name=name):
                t = _first_tensor(output).detach()
                self.records[_name].append(t.to(self.device) if self.device is not None else t.clone())
            handles.append(mod.register_forward_hook(hook))
        return handles


class ActivationPatcher:
    """Replaces the outputs of named UNet modules.

    ``patches[name]`` is a tensor (broadcast to the output's shape) or a callable
    ``fn(output, ctx) -> new_output`` where ``ctx`` is the :class:`CallContext` of the call.
    """

    def __init__(self, patches: dict[str, torch.Tensor | Callable[[torch.Tensor, CallContext], torch.Tensor]]):
        if not patches:
            raise ValueError("give at least one module to patch")
        self.patches = dict(patches)

    def install(self, unet, manager) -> list:
        handles = []
        for name, mod in resolve_modules(unet, list(self.patches)).items():
            patch = self.patches[name]

            def hook(module, args, output, _patch=patch):
                t = _first_tensor(output)
                new = _patch(t, manager.context) if callable(_patch) else _patch.to(t.device, t.dtype).expand_as(t)
                if isinstance(output, tuple):
                    return (new,) + tuple(output[1:])
                return new
            handles.append(mod.register_forward_hook(hook))
        return handles

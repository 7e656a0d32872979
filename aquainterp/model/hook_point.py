"""TransformerLens's HookPoint, called without nn.Module's dispatch while nothing is attached to it, and the
same fast call for the model's own modules (DirectCall).

A HookPoint is the identity; every hook TransformerLens attaches (add_hook, run_with_cache, hooks(),
run_with_hooks, permanent hooks, forward and backward) goes through nn.Module's hook registries, and so do
torch's global module hooks. While all of those are empty (and no JIT trace or module.compile() is in force),
nn.Module.__call__ does nothing but call forward, at about a microsecond of Python each time: `hook(x)` then
returns x directly, and a DirectCall module calls its forward directly (and reads its submodules without
nn.Module.__getattr__). A 2025-10 block has 18 hook points and
4 modules of ours, so a KV-cache decode step of a small model spent several percent of its time in that
dispatch (generation vs nanochat's own Engine: benchmarks/peers.py). Anything attached takes
nn.Module.__call__, as before.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as _torch_module
from transformer_lens.hook_points import HookPoint as _TLHookPoint

# torch's registries of hooks on every module (dicts it mutates in place, never rebinds)
_G_FWD, _G_FWD_PRE, _G_BWD, _G_BWD_PRE = (getattr(_torch_module, name) for name in (
    "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks"))
_is_tracing = torch._C._is_tracing


class HookPoint(_TLHookPoint):
    """TL's HookPoint (isinstance holds, the same name and hooks API); the identity without module dispatch
    while no hook of any kind is registered on it or globally."""

    def __call__(self, *args, **kwargs):
        if (len(args) != 1 or kwargs or self._forward_hooks or self._forward_pre_hooks or self._backward_hooks
                or self._backward_pre_hooks or _G_FWD or _G_FWD_PRE or _G_BWD or _G_BWD_PRE
                or self._compiled_call_impl is not None or _is_tracing()):
            return super().__call__(*args, **kwargs)
        return args[0]


class DirectCall(nn.Module):
    """An nn.Module whose call goes straight to forward while nn.Module.__call__ would do nothing else, and whose
    submodules read as plain attributes: nn.Module keeps them in _modules, where `self.hook_q` reaches them only
    through nn.Module.__getattr__ (Python, after a failed normal look-up; ~90 per decode forward of a depth-4
    model, about 3% of it). Each registered submodule is mirrored into the instance __dict__, kept in step by
    __setattr__, __delattr__ and add_module; _modules stays the registry (children, state_dict, hooks)."""

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        modules = self.__dict__.get("_modules")
        if modules is not None and name in modules:
            self.__dict__[name] = modules[name]

    def __delattr__(self, name):
        modules = self.__dict__.get("_modules")
        if modules is not None and name in modules:
            self.__dict__.pop(name, None)
        super().__delattr__(name)

    def add_module(self, name, module):
        super().add_module(name, module)
        self.__dict__[name] = module

    register_module = add_module

    def __call__(self, *args, **kwargs):
        if (self._forward_hooks or self._forward_pre_hooks or self._backward_hooks or self._backward_pre_hooks
                or _G_FWD or _G_FWD_PRE or _G_BWD or _G_BWD_PRE or self._compiled_call_impl is not None
                or _is_tracing()):
            return super().__call__(*args, **kwargs)
        return self.forward(*args, **kwargs)

"""TransformerLens's HookPoint, called without nn.Module's dispatch while nothing is attached to it.

A HookPoint is the identity; every hook TransformerLens attaches (add_hook, run_with_cache, hooks(),
run_with_hooks, permanent hooks, forward and backward) goes through nn.Module's hook registries, and so do
torch's global module hooks. While all of those are empty, `hook(x)` returns x directly: nn.Module.__call__
would do nothing else, at about a microsecond each. A 2025-10 block has 18 hook points, so a KV-cache decode
step of a small model spends several percent of its time in them (generation vs nanochat's own Engine, which
has none: benchmarks/peers.py). Anything attached, or any other call signature, takes nn.Module.__call__.
"""

from __future__ import annotations

from torch.nn.modules import module as _torch_module
from transformer_lens.hook_points import HookPoint as _TLHookPoint

# torch's registries of hooks on every module (dicts it mutates in place, never rebinds)
_G_FWD, _G_FWD_PRE, _G_BWD, _G_BWD_PRE = (getattr(_torch_module, name) for name in (
    "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks"))


class HookPoint(_TLHookPoint):
    """TL's HookPoint (isinstance holds, the same name and hooks API); the identity without module dispatch
    while no hook of any kind is registered on it or globally."""

    def __call__(self, *args, **kwargs):
        if (len(args) != 1 or kwargs or self._forward_hooks or self._forward_pre_hooks or self._backward_hooks
                or self._backward_pre_hooks or _G_FWD or _G_FWD_PRE or _G_BWD or _G_BWD_PRE):
            return super().__call__(*args, **kwargs)
        return args[0]

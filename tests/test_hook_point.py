"""aquainterp.model.hook_point: hook points are the identity and the model's own modules (DirectCall) call their
forward without nn.Module's dispatch while nothing is attached, and every kind of hook still fires (TL forward
and backward hooks, torch module hooks, torch's global module hooks)."""

import pytest
import torch
from torch import nn
from torch.nn.modules import module as torch_module
from transformer_lens.hook_points import HookPoint as TLHookPoint

from aquainterp.model.gpt import GPT, MLP, Block, CausalSelfAttention, GPTConfig, RMSNormPre
from aquainterp.model.hook_point import DirectCall, HookPoint


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=32))
    model.init_weights()
    with torch.no_grad():  # non-zero projections, so gradients reach every hook point
        for block in model.blocks:
            block.attn.c_proj.weight.normal_(0, 0.1)
            block.mlp.c_proj.weight.normal_(0, 0.1)
        model.lm_head.weight.normal_(0, 0.1)
    return model


@pytest.fixture
def dispatches(monkeypatch):
    """Counts the hook points that go through nn.Module.__call__ (the slow path)."""
    calls = []
    real = nn.Module.__call__

    def counting(self, *args, **kwargs):
        if isinstance(self, (TLHookPoint, DirectCall)):
            calls.append(getattr(self, "name", None) or type(self).__name__)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "__call__", counting)
    return calls


def test_model_hook_points_are_tl_hook_points_and_skip_dispatch_when_bare(dispatches):
    model = tiny_gpt()
    points = [m for m in model.modules() if isinstance(m, TLHookPoint)]
    assert points and all(type(m) is HookPoint for m in points)
    x = torch.randint(0, 64, (2, 8))
    plain = model(x)
    assert dispatches == []  # no hook anywhere: every hook point returned its input directly
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_mid", lambda act, hook: None)]):
        hooked = model(x)
    assert dispatches == ["blocks.0.hook_resid_mid"]  # only the hooked one dispatches
    torch.testing.assert_close(plain, hooked, rtol=0, atol=0)


def test_bare_hook_point_is_the_identity_and_other_signatures_dispatch():
    h = HookPoint()
    x = torch.randn(3)
    assert h(x) is x
    with pytest.raises(TypeError):  # forward(x) takes one argument: nn.Module's call reports the misuse
        h(x, x)


def test_every_kind_of_hook_still_fires():
    model = tiny_gpt(seed=1)
    x = torch.randint(0, 64, (2, 8))
    seen = []
    # TL forward hook that edits the activation, and a TL backward hook
    model.blocks[1].hook_resid_pre.add_hook(lambda act, hook: seen.append(("fwd", hook.name)) or act * 0)
    model.blocks[0].hook_mlp_out.add_hook(lambda grad, hook: seen.append(("bwd", hook.name)), dir="bwd")
    out = model(x)
    out.sum().backward()
    assert ("fwd", "blocks.1.hook_resid_pre") in seen and ("bwd", "blocks.0.hook_mlp_out") in seen
    model.reset_hooks(including_permanent=True)
    model.zero_grad()
    # a torch forward pre-hook on one hook point
    handle = model.blocks[0].hook_attn_out.register_forward_pre_hook(lambda mod, args: seen.append("pre"))
    model(x)
    handle.remove()
    assert seen.count("pre") == 1
    # torch's global module hook reaches hook points too
    names = []
    handle = torch_module.register_module_forward_hook(
        lambda mod, args, out: names.append(mod.name) if isinstance(mod, TLHookPoint) else None)
    try:
        model(x)
    finally:
        handle.remove()
    assert "blocks.0.hook_resid_post" in names and "ln_final.hook_normalized" in names
    # run_with_cache sees every hook point the plain forward passes through
    _, cache = model.run_with_cache(x)
    assert {"blocks.0.hook_resid_post", "blocks.1.attn.hook_z", "blocks.1.mlp.hook_post"} <= set(cache.keys())
    torch.testing.assert_close(cache["blocks.1.hook_resid_pre"], cache["blocks.0.hook_resid_post"])


def test_model_modules_skip_dispatch_when_bare_and_their_hooks_fire(dispatches):
    model = tiny_gpt(seed=2)
    assert all(issubclass(c, DirectCall) for c in (RMSNormPre, CausalSelfAttention, MLP, Block))
    x = torch.randint(0, 64, (2, 8))
    plain = model(x)
    assert dispatches == []
    seen = []
    handles = [model.blocks[1].register_forward_hook(lambda mod, args, out: seen.append("block")),
               model.blocks[0].mlp.register_forward_pre_hook(lambda mod, args: seen.append("mlp")),
               model.blocks[0].attn.register_forward_hook(lambda mod, args, out: out * 2)]  # edits the output
    edited = model(x)
    for handle in handles:
        handle.remove()
    assert seen == ["mlp", "block"] and sorted(dispatches) == ["blocks.0.attn", "blocks.0.mlp", "blocks.1"]
    assert not torch.allclose(plain, edited)
    torch.testing.assert_close(model(x), plain, rtol=0, atol=0)


def test_submodules_read_without_getattr_and_stay_in_step_with_the_registry():
    """DirectCall mirrors each submodule into __dict__ (plain attribute reads); replacing, deleting or
    add_module keeps the mirror equal to _modules, and copies keep the two the same objects."""
    import copy

    model = tiny_gpt(seed=3)
    block = model.blocks[0]
    for name, child in block.named_children():
        assert block.__dict__[name] is child
    new = HookPoint()
    block.hook_resid_mid = new
    assert block.hook_resid_mid is new and block._modules["hook_resid_mid"] is new
    block.add_module("hook_mlp_out", HookPoint())
    assert block.hook_mlp_out is block._modules["hook_mlp_out"]
    del block.hook_mlp_in
    assert not hasattr(block, "hook_mlp_in") and "hook_mlp_in" not in block._modules
    twin = copy.deepcopy(model.blocks[1])
    assert all(twin.__dict__[name] is child for name, child in twin.named_children())
    assert twin.attn is not model.blocks[1].attn

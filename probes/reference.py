"""The frozen reference policy for KL: a copy of the model taken before RL starts.

Built from the model's config and state dict (not deepcopy), so a GPU model can be copied straight
to the CPU without a second GPU-resident copy. Gradients off, eval mode, no hooks.
"""

from __future__ import annotations

import torch

from aquainterp.model.gpt import unwrap


def freeze_reference(model, device: str | torch.device = "cpu"):
    """A frozen copy of `model` on `device` ("cpu" offloads it; pass the model's device to keep it there)."""
    model = unwrap(model)
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"freeze_reference: {type(model).__name__} has no .config to rebuild it from")
    dtype = next(model.parameters()).dtype
    with torch.device("meta"):
        reference = type(model)(config)
    state = {k: v.detach().to(device=device, copy=True) for k, v in model.state_dict().items()}
    reference.load_state_dict(state, strict=True, assign=True)
    # non-persistent buffers (rotary tables) are not in the state dict: copy them too
    for name, buf in model.named_buffers():
        if name not in state:
            module_name, _, attr = name.rpartition(".")
            owner = reference.get_submodule(module_name) if module_name else reference
            setattr(owner, attr, buf.detach().to(device=device, copy=True))
    reference.to(device=device, dtype=dtype)
    reference.eval()
    reference.requires_grad_(False)
    return reference

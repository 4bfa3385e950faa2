"""Which tensors of a module a checkpoint must write: the trained ones, not a frozen base.

The rule (`trainable_keys`):

- A module with both trainable parameters (requires_grad) and frozen ones is a *partial* fine-tune
  (LoRA adapters on a frozen transformer, or frozen layers): its state is the tensors of its trainable
  parameters only. Its frozen parameters and its buffers are part of the frozen base, which is rebuilt
  from where it came from (the model folder, then `enable_lora(..., seed=...)`) and never written.
- Any other module (every parameter trainable: a full fine-tune; or none: a frozen copy such as the
  trainer's reference or EMA of a full fine-tune) writes its whole `state_dict()`, buffers included.
- `like=`: a frozen copy of a partially trained module (the EMA or the reference of a LoRA run:
  `frozen_copy`, its base shared with the policy or copied) has no trainable parameter
  left to tell which tensors are trained; pass the trained module as `like` to take its keys, so the
  copy writes the EMA (or the reference) of the adapters only.

Keys are `module.state_dict()` keys (equal to `torch.distributed.checkpoint.state_dict.
get_model_state_dict` keys for an unwrapped or FSDP2-sharded module). A parameter is matched to its
state-dict key(s) by identity (`state_dict(keep_vars=True)`), so tied parameters (several keys, one
tensor) and state-dict hooks that rename keys are handled.
"""

from __future__ import annotations

import copy

from typing import Mapping, Optional

import torch
from torch import Tensor, nn

__all__ = ["frozen_copy", "select_trainable", "trainable_keys", "trainable_state_dict", "upcast_trained"]


def trainable_keys(module: nn.Module, *, like: Optional[nn.Module] = None) -> Optional[frozenset[str]]:
    """The state-dict keys a checkpoint of `module` must hold, or None for all of them (see the module
    docstring for the rule). With `like`, the keys of `like` (which `module` must all have)."""
    if like is not None:
        keys = trainable_keys(like)
        if keys is not None:
            missing = sorted(keys - set(module.state_dict(keep_vars=True)))
            if missing:
                raise ValueError(f"trainable_keys: the module lacks {len(missing)} of the trained tensors of `like` "
                                 f"(e.g. {', '.join(missing[:3])}): it is not a copy of that module")
        return keys
    trained, frozen = [], False
    for key, value in module.state_dict(keep_vars=True).items():
        if isinstance(value, nn.Parameter):
            if value.requires_grad:
                trained.append(key)
            else:
                frozen = True
    # Parameters absent from the state dict (none in practice) do not count.
    if trained and frozen:
        return frozenset(trained)
    return None


def select_trainable(module: nn.Module, state_dict: Mapping[str, Tensor], *,
                     like: Optional[nn.Module] = None) -> dict[str, Tensor]:
    """The entries of `state_dict` (a state dict of `module`, e.g. `get_model_state_dict(module)` under
    FSDP2) that `trainable_keys(module, like=like)` keeps, in its order."""
    keys = trainable_keys(module, like=like)
    if keys is None:
        return dict(state_dict)
    missing = sorted(keys - set(state_dict))
    if missing:
        raise ValueError(f"select_trainable: the state dict lacks {len(missing)} trained tensor(s) "
                         f"(e.g. {', '.join(missing[:3])})")
    return {k: v for k, v in state_dict.items() if k in keys}


def trainable_state_dict(module: nn.Module, *, like: Optional[nn.Module] = None) -> dict[str, Tensor]:
    """`module.state_dict()` restricted to the tensors a checkpoint must write (detached, sharing storage)."""
    return select_trainable(module, module.state_dict(), like=like)


@torch.no_grad()
def upcast_trained(module: nn.Module) -> int:
    """Casts every trained (requires_grad) floating parameter narrower than fp32 to fp32 in place and
    returns how many values were cast: fp32 master weights for a fine-tune loaded in bf16 / fp16. AdamW
    steps a parameter in its own dtype, and a bf16 weight of size ~0.02 has a resolution of ~1e-4, so at
    lr 1e-5 most updates round away (measured: 15% of a bf16 matrix's entries moved after 10 steps, against
    all of them in fp32). Frozen parameters and buffers keep their dtype."""
    n = 0
    for p in module.parameters():
        if p.requires_grad and p.is_floating_point() and p.element_size() < 4:
            p.data = p.data.float()
            n += p.numel()
    return n


def frozen_copy(module: nn.Module, share_frozen: bool) -> nn.Module:
    """A copy of `module` with every parameter frozen (the trainer's KL reference and EMA). share_frozen:
    the parameters that are already frozen (a LoRA run's base) are the module's own tensors, not copies,
    so a copy costs the adapters only; nothing writes them (no optimizer, no EMA update)."""
    memo = {id(p): p for p in module.parameters() if not p.requires_grad} if share_frozen else {}
    return copy.deepcopy(module, memo).requires_grad_(False)

"""Hugging Face transformers patches: ``fastloss.integrations.transformers.patch(model)``.

Patches a model instance in place (no global monkey-patching of transformers classes):

* Gemma 3n: every sparse MLP layer (``Gemma3nTextMLP`` with ``activation_sparsity > 0``)
  computes ``gelu_tanh(relu(gate - theta)) * up`` with :func:`fastloss.stat_topk_gelu_mul`,
  one fused kernel in place of the mean, std, threshold, relu, gelu and multiply ops.

Numerics: transformers computes PhiInv(sparsity) in float32 and rounds it to the activation
dtype, and takes the row statistics in that dtype; fastloss uses the double-precision
quantile and float32 statistics, so in bfloat16 the two differ by bfloat16 rounding.
"""

from __future__ import annotations

import types

import torch

from ..ops.stat_topk import stat_topk, stat_topk_gelu_mul

_GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new", "gelu_fast")


def _gemma3n_sparse_mlp_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    gate = self.gate_proj(hidden_states)
    up = self.up_proj(hidden_states)
    return self.down_proj(stat_topk_gelu_mul(gate, up, self.activation_sparsity))


def _gemma3n_sparse_mlp_forward_unfused(self, hidden_states: torch.Tensor) -> torch.Tensor:
    # Another activation than gelu-tanh: only the threshold is fused.
    gate = stat_topk(self.gate_proj(hidden_states), sparsity=self.activation_sparsity)
    return self.down_proj(self.act_fn(gate) * self.up_proj(hidden_states))


def _patch_gemma3n(model: torch.nn.Module) -> int:
    try:
        from transformers.models.gemma3n.modeling_gemma3n import Gemma3nTextMLP
    except ImportError:  # a transformers without Gemma 3n
        return 0
    patched = 0
    for module in model.modules():
        if not isinstance(module, Gemma3nTextMLP) or getattr(module, "_fastloss_patched", False):
            continue
        if not module.activation_sparsity > 0.0:
            continue
        activation = getattr(module.config, "hidden_activation", None)
        forward = _gemma3n_sparse_mlp_forward if activation in _GELU_TANH else _gemma3n_sparse_mlp_forward_unfused
        module.forward = types.MethodType(forward, module)
        module._fastloss_patched = True
        patched += 1
    return patched


def patch(model: torch.nn.Module) -> torch.nn.Module:
    """Route the parts of ``model`` that fastloss implements through its kernels, in place.

    Returns the model. Patching twice is harmless; models with nothing to patch are returned
    unchanged. Supported: Gemma 3n sparse MLP layers (statistical top-k + gelu-tanh + multiply).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fastloss.integrations.transformers.patch: expected a torch.nn.Module, got "
                        f"{type(model).__name__}")
    _patch_gemma3n(model)
    return model

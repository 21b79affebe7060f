"""Hugging Face transformers patches: ``fastloss.integrations.transformers.patch(model)``.

Patches a model instance in place (no global monkey-patching of transformers classes);
``unpatch(model)`` undoes it:

* Gemma 3n: every sparse MLP layer (``Gemma3nTextMLP`` with ``activation_sparsity > 0``)
  computes ``gelu_tanh(relu(gate - theta)) * up`` with :func:`fastloss.stat_topk_gelu_mul`,
  one fused kernel in place of the mean, std, threshold, relu, gelu and multiply ops.
* Causal LMs (Llama, Mistral, Ministral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3, Phi, Phi-3,
  OLMo 2, StarCoder2, StableLM, GLM, SmolLM3, Granite, Cohere): when ``labels`` are given, the
  training loss is :func:`fastloss.linear_cross_entropy` of the final hidden states and the
  LM head (with Gemma 2/3's final-logit softcap, and Granite's and Cohere's logit scaling), so
  the logits are never materialized; the output's ``logits`` is then None. Without labels,
  under ``torch.no_grad()``, with a wrapped head or a loss_function of the user's, the model
  runs unchanged.

Numerics: transformers computes PhiInv(sparsity) in float32 and rounds it to the activation
dtype, and takes the row statistics in that dtype; fastloss uses the double-precision
quantile and float32 statistics, so in bfloat16 the two differ by bfloat16 rounding.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import warnings
import weakref
from typing import Callable, Optional

import torch

from ..ops.linear_cross_entropy import linear_cross_entropy
from ..ops.stat_topk import stat_topk, stat_topk_gelu_mul

_GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new", "gelu_fast")


def _gemma3n_sparse_mlp_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if not self.activation_sparsity > 0.0:  # made dense after patching: transformers' own forward
        return type(self).forward(self, hidden_states)
    gate = self.gate_proj(hidden_states)
    up = self.up_proj(hidden_states)
    return self.down_proj(stat_topk_gelu_mul(gate, up, self.activation_sparsity))


def _gemma3n_sparse_mlp_forward_unfused(self, hidden_states: torch.Tensor) -> torch.Tensor:
    # Another activation than gelu-tanh: only the threshold is fused.
    if not self.activation_sparsity > 0.0:
        return type(self).forward(self, hidden_states)
    gate = stat_topk(self.gate_proj(hidden_states), sparsity=self.activation_sparsity)
    return self.down_proj(self.act_fn(gate) * self.up_proj(hidden_states))


class _BoundForward:
    """``function`` bound to ``module``, as an instance's forward. It holds the module weakly: a
    forward in the module's own __dict__ that referred to the module (a bound method, a
    partial) made a cycle, so a dropped model stayed alive, parameters and all, until the
    cycle collector ran (eight models built, patched and dropped in turn: seven still alive).
    (A shallow copy of the module shares this forward, so it runs only while the original
    lives.) It pickles as (function, module) (torch.save of a patched model, copy.deepcopy), where a
    bound method would be looked up on the loaded instance by a name its class does not have.
    It shows the signature of the forward it replaces: transformers reads the forward's
    parameter names (generate() builds an attention mask and passes logits_to_keep only where
    the forward names them; Trainer keeps the dataset columns it names)."""

    def __init__(self, function, module: torch.nn.Module, signature=None):
        self.function = function
        self.module = weakref.ref(module)
        self.__signature__ = signature if signature is not None else inspect.signature(module.forward)

    def __call__(self, *args, **kwargs):
        module = self.module()
        if module is None:  # (a shallow copy shares its original's forward)
            raise RuntimeError("fastloss.integrations.transformers: this patched forward belongs to a module that "
                               "was freed: a shallow copy (copy.copy) of a patched model runs only while the original "
                               "lives; use copy.deepcopy, or unpatch() and patch() the copy")
        return self.function(module, *args, **kwargs)

    def __reduce__(self):
        return (_BoundForward, (self.function, self.module(), self.__signature__))


def _replace_forward(module: torch.nn.Module, function) -> None:
    """Make ``function`` the module's forward, keeping a forward the instance already had
    (accelerate's dispatch hooks put one there) for :func:`unpatch` to restore."""
    if "forward" in vars(module):
        module.__dict__["_fastloss_instance_forward"] = vars(module)["forward"]
    setattr(module, "forward", _BoundForward(function, module))


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
        _replace_forward(module, forward)
        setattr(module, "_fastloss_patched", True)
        patched += 1
    return patched


# Causal LMs whose forward is `self.model(...)` -> last_hidden_state -> `self.lm_head` (then
# config.final_logit_softcapping, if set) -> ForCausalLMLoss; a few scale the logits by a
# config constant (Granite divides by logits_scaling, Cohere multiplies by logit_scale).
_CAUSAL_LM_CLASSES = ("LlamaForCausalLM", "MistralForCausalLM", "MinistralForCausalLM", "Qwen2ForCausalLM",
                      "Qwen3ForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM",
                      "Phi3ForCausalLM", "PhiForCausalLM", "Olmo2ForCausalLM", "Starcoder2ForCausalLM",
                      "StableLmForCausalLM", "GlmForCausalLM", "SmolLM3ForCausalLM", "GraniteForCausalLM",
                      "CohereForCausalLM")
# The classes whose forward applies config.final_logit_softcapping (other configs may carry the
# key without their model using it).
_SOFTCAP_CLASSES = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")


def _causal_lm_class(model: torch.nn.Module) -> Optional[str]:
    """The supported transformers class whose forward ``model`` runs (its own class, or a base
    of a subclass that does not override forward), or None."""
    for cls in type(model).__mro__:
        if cls.__name__ in _CAUSAL_LM_CLASSES:
            return cls.__name__ if getattr(type(model), "forward") is getattr(cls, "forward", None) else None
    return None


def _model_class(model) -> str:
    # (getattr: a model patched and saved by an earlier version has no such attribute.)
    return getattr(model, "_fastloss_causal_lm", None) or type(model).__name__


def _logit_scale(model) -> float:
    name = _model_class(model)
    if name == "GraniteForCausalLM":
        return 1.0 / float(model.config.logits_scaling)
    if name == "CohereForCausalLM":
        return float(model.logit_scale)
    return 1.0


def _head_is_plain_linear(head) -> bool:
    # A head wrapped later (LoRA adapters, FSDP or tensor-parallel hooks, accelerate's hooks that
    # replace the instance's forward) must run as a module: reading its .weight directly would
    # skip what the wrapper adds.
    return (type(head) is torch.nn.Linear and not head._forward_hooks and not head._forward_pre_hooks
            and "forward" not in vars(head))


def _look_up(module: str, name: str):
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


# transformers functions the patched forward calls, None where the installed transformers lacks
# them. Looked up here, not in the forward: under torch.compile(fullgraph=True) a failed import
# inside the forward is an error (slice_logits_to_keep arrived in transformers 5.21; before
# loss_function, the loss was inline).
_slice_logits_to_keep: Optional[Callable[..., torch.Tensor]] = _look_up("transformers.modeling_utils",
                                                                         "slice_logits_to_keep")
_for_causal_lm_loss: Optional[Callable[..., torch.Tensor]] = _look_up("transformers.loss.loss_utils",
                                                                       "ForCausalLMLoss")


def _uses_causal_lm_loss(model) -> bool:
    """Whether the model's loss is transformers' ForCausalLMLoss, which the patch reproduces (a
    loss_function assigned by the user, or another config.loss_type, runs unchanged)."""
    if _for_causal_lm_loss is None:
        return True
    return getattr(model, "loss_function", _for_causal_lm_loss) is _for_causal_lm_loss


def _keep_positions(hidden: torch.Tensor, logits_to_keep) -> torch.Tensor:
    """The positions whose logits the model would compute, as transformers selects them: an int
    keeps the last ``logits_to_keep`` (0: all), a 1-D tensor these positions, and (where the
    installed transformers has slice_logits_to_keep) a 2-D integer tensor per-sequence positions
    or a 2-D boolean mask the True positions, flattened."""
    if _slice_logits_to_keep is None:
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return hidden[:, keep, :]
    return _slice_logits_to_keep(hidden, logits_to_keep)


def _call_arguments(signature: inspect.Signature, args, kwargs) -> dict:
    """The arguments the caller gave the forward of this ``signature``, by name (its
    ``**kwargs`` merged in): only those are passed on, so the cache argument keeps the name the
    caller used (transformers 5.25 renamed ``past_key_values`` to ``cache`` and warns when the
    old name is passed)."""
    call = dict(signature.bind(*args, **kwargs).arguments)
    for parameter in signature.parameters.values():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            call.update(call.pop(parameter.name, {}))
    return call


def _cache_field() -> str:
    """The output's cache field: ``cache`` from transformers 5.25 on, ``past_key_values`` before."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


def _original_forward(self, args, kwargs):
    """The forward the model had before patching: one on the instance (accelerate's hooks), or
    its class's (looked up on each call, not stored: a bound method on the instance is a cycle)."""
    instance_forward = vars(self).get("_fastloss_instance_forward")
    if instance_forward is not None:
        return instance_forward(*args, **kwargs)
    return type(self).forward(self, *args, **kwargs)


def _causal_lm_forward(self, *args, **kwargs):
    call = _call_arguments(self._fastloss_forward_signature, args, kwargs)
    labels = call.pop("labels", None)
    # Without labels, without autograd (evaluation wants the logits for its metrics), with a
    # wrapped head or another loss function, the model runs unchanged.
    if (labels is None or not torch.is_grad_enabled() or not _head_is_plain_linear(self.lm_head)
            or not _uses_causal_lm_loss(self)):
        return _original_forward(self, args, kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    # The loss arguments of transformers' ForCausalLMLoss.
    logits_to_keep = call.pop("logits_to_keep", 0)
    num_items_in_batch = call.pop("num_items_in_batch", None)
    ignore_index = call.pop("ignore_index", -100)
    shift_labels = call.pop("shift_labels", None)
    return_dict = call.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    outputs = self.model(return_dict=True, **call)
    hidden = outputs.last_hidden_state
    hidden = _keep_positions(hidden, logits_to_keep)
    head = self.lm_head
    bias = getattr(head, "bias", None)
    scale = _logit_scale(self)
    if scale != 1.0:  # (h W^T + b) s = (s h) W^T + s b
        hidden = hidden * scale
        bias = None if bias is None else bias * scale
    # As ForCausalLMLoss: labels shift by one along their last dim (the last position predicts
    # nothing), then tokens and targets are flattened, whatever shapes logits_to_keep left.
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    softcap = getattr(self.config, "final_logit_softcapping", None) if _model_class(self) in _SOFTCAP_CLASSES else None
    loss = linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), head.weight, shift_labels.reshape(-1).to(hidden.device), bias,
        ignore_index=ignore_index, reduction="mean" if num_items_in_batch is None else "sum", softcap=softcap)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    # (getattr: a model patched and saved by an earlier version has no such attribute.)
    cache_field = getattr(self, "_fastloss_cache_field", None) or _cache_field()
    out = CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=outputs.hidden_states,
                                 attentions=outputs.attentions, **{cache_field: getattr(outputs, cache_field)})
    if return_dict:
        return out
    # to_tuple() drops None fields: keep the logits' place, so that out[1] is not the cache.
    return (loss, None) + CausalLMOutputWithPast(**{k: v for k, v in out.items() if k not in ("loss", "logits")}).to_tuple()


def _patch_causal_lm(model: torch.nn.Module) -> int:
    # Every causal LM inside the module: one wrapped by DistributedDataParallel or
    # torch.compile, or several held together (a distillation teacher and student).
    return sum(_patch_one_causal_lm(module) for module in model.modules())


def _patch_one_causal_lm(model: torch.nn.Module) -> int:
    name = _causal_lm_class(model)
    if name is None or getattr(model, "_fastloss_loss_patched", False):
        return 0
    if not isinstance(getattr(model, "lm_head", None), torch.nn.Linear):
        return 0
    # Read once: inspect.signature follows the forward's decorators on every call otherwise.
    setattr(model, "_fastloss_forward_signature", inspect.signature(model.forward))
    # Read at patch time: torch.compile cannot trace dataclasses.fields inside the forward.
    setattr(model, "_fastloss_cache_field", _cache_field())
    setattr(model, "_fastloss_causal_lm", name)
    _replace_forward(model, _causal_lm_forward)
    setattr(model, "_fastloss_loss_patched", True)
    return 1


def patch(model: torch.nn.Module) -> torch.nn.Module:
    """Route the parts of ``model`` that fastloss implements through its kernels, in place.

    Returns the model. Patching twice is harmless; a model with nothing to patch is returned
    unchanged, with a warning. The patched parts may sit anywhere inside ``model`` (a DistributedDataParallel
    or torch.compile wrapper, a container of several models; patch before the first compiled
    call; a container that reads an inner model's ``logits`` from a call with ``labels``, as a
    distillation loss might, gets None: patch the models that only need the loss). Supported:
    Gemma 3n sparse MLP layers (statistical top-k + gelu-tanh + multiply);
    the training loss of the causal LMs listed in the module docstring (cut
    cross-entropy: no logits when ``labels`` are given with autograd on; a batch whose labels
    are all ignored gets loss 0 and zero gradients where transformers gives NaN). Under
    ``torch.no_grad()`` (evaluation), for a wrapped ``lm_head`` (e.g. LoRA on the head) and
    with a ``loss_function`` assigned by the user the model runs unchanged and returns its
    logits. ``logits_to_keep`` takes every form transformers accepts (int, positions, mask).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fastloss.integrations.transformers.patch: expected a torch.nn.Module, got "
                        f"{type(model).__name__}")
    _patch_gemma3n(model)
    _patch_causal_lm(model)
    if not any(_is_patched(m) for m in model.modules()):
        warnings.warn(f"fastloss.integrations.transformers.patch: nothing in {type(model).__name__} is supported, so "
                      "nothing was patched (supported: Gemma 3n sparse MLPs, and the causal LMs "
                      f"{', '.join(_CAUSAL_LM_CLASSES)} and their subclasses that keep their forward)", stacklevel=2)
    return model


def _is_patched(module: torch.nn.Module) -> bool:
    return getattr(module, "_fastloss_patched", False) or getattr(module, "_fastloss_loss_patched", False)


# What patch sets on a module's instance (the MLPs' flag, the causal LMs' flag and state).
_PATCH_STATE = ("forward", "_fastloss_patched", "_fastloss_loss_patched", "_fastloss_forward_signature",
                "_fastloss_cache_field", "_fastloss_causal_lm")


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`patch` in place: the patched modules get back the forward they had (their
    class's, or one that was on the instance, such as accelerate's hooks). Hooks added after
    patching wrap fastloss's forward: remove them first. Returns the model; a model that was
    never patched is returned unchanged."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fastloss.integrations.transformers.unpatch: expected a torch.nn.Module, got "
                        f"{type(model).__name__}")
    for module in model.modules():
        if not _is_patched(module):
            continue
        for name in _PATCH_STATE:
            module.__dict__.pop(name, None)
        if "_fastloss_instance_forward" in vars(module):
            module.__dict__["forward"] = module.__dict__.pop("_fastloss_instance_forward")
    return model

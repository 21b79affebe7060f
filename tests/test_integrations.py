"""Hugging Face transformers patches on tiny randomly initialised models built from configs."""

import warnings

import pytest
import torch

import fastloss.integrations.transformers as fl_transformers

transformers = pytest.importorskip("transformers")


def tiny_gemma3n(sparsity_pattern):
    if not hasattr(transformers, "Gemma3nTextConfig"):
        pytest.skip(f"transformers {transformers.__version__} has no Gemma 3n")
    from transformers import Gemma3nTextConfig
    from transformers.models.gemma3n.modeling_gemma3n import Gemma3nForCausalLM

    config = Gemma3nTextConfig(
        vocab_size=128, vocab_size_per_layer_input=128, hidden_size=64, hidden_size_per_layer_input=8,
        intermediate_size=256, num_hidden_layers=len(sparsity_pattern), num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, activation_sparsity_pattern=list(sparsity_pattern),
        num_kv_shared_layers=0, layer_types=["sliding_attention", "full_attention"][: len(sparsity_pattern)],
        sliding_window=16, altup_num_inputs=2, laurel_rank=4, max_position_embeddings=64)
    torch.manual_seed(0)
    return Gemma3nForCausalLM(config).float()


def loss_and_grads(model, ids):
    model.zero_grad()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                    if p.grad is not None}


def test_gemma3n_sparse_mlp_patch_matches_unpatched():
    model = tiny_gemma3n([0.95, 0.0])
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    logits_ref, loss_ref, grads_ref = loss_and_grads(model, ids)

    assert fl_transformers.patch(model) is model
    mlps = [m for m in model.modules() if type(m).__name__ == "Gemma3nTextMLP"]
    assert [getattr(m, "_fastloss_patched", False) for m in mlps] == [True, False]  # only the sparse one
    fl_transformers.patch(model)  # idempotent

    # A layer made dense after patching runs transformers' dense forward.
    mlps[0].activation_sparsity = 0.0
    dense = model(input_ids=ids).logits
    mlps[0].activation_sparsity = 0.95
    unpatched = tiny_gemma3n([0.0, 0.0])
    torch.testing.assert_close(dense, unpatched(input_ids=ids).logits, rtol=1e-5, atol=1e-6)

    logits, loss, grads = loss_and_grads(model, ids)
    # transformers rounds PhiInv(0.95) to float32; fastloss uses it in double precision.
    torch.testing.assert_close(logits, logits_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-3, atol=1e-5, msg=name)


def test_gemma3n_patch_uses_the_fused_kernel(monkeypatch):
    model = tiny_gemma3n([0.95, 0.95])
    calls = []
    real = fl_transformers.stat_topk_gelu_mul
    monkeypatch.setattr(fl_transformers, "stat_topk_gelu_mul", lambda *a, **k: calls.append(1) or real(*a, **k))
    fl_transformers.patch(model)
    model(input_ids=torch.randint(0, 128, (1, 8)))
    assert len(calls) == 2


def test_patch_rejects_non_modules():
    with pytest.raises(TypeError, match="expected a torch.nn.Module"):
        fl_transformers.patch("not a model")


def test_patched_models_pickle():
    """torch.save / torch.load of a patched model (checkpointing whole modules): the patched
    forwards pickle as (module-level function, module); bound methods were looked up by a name
    the loaded class does not have."""
    import io

    gemma = tiny_gemma3n([0.95, 0.0])
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1)).float()
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))
    for model in (gemma, llama):
        fl_transformers.patch(model)
        expected = model(input_ids=ids, labels=ids).loss
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        out = loaded(input_ids=ids, labels=ids)
        torch.testing.assert_close(out.loss, expected)
        if model is llama:
            assert out.logits is None  # still patched
        else:
            assert all(getattr(m, "_fastloss_patched", False) for m in loaded.modules()
                       if type(m).__name__ == "Gemma3nTextMLP" and m.activation_sparsity > 0)


def test_a_dropped_patched_model_is_freed_without_the_cycle_collector():
    """The patched forwards (and the kept original) referred to their module from its own
    __dict__: a cycle, so a dropped model kept its parameters until gc ran (one per model
    built and dropped in a loop)."""
    import copy
    import gc
    import weakref

    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))
    for build in (lambda: tiny_gemma3n([0.95, 0.0]), lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1)).float()):
        model = fl_transformers.patch(build())
        model(input_ids=ids, labels=ids).loss.backward()
        copied = copy.deepcopy(model)  # a copy is patched on its own, and runs
        torch.testing.assert_close(copied(input_ids=ids, labels=ids).loss, model(input_ids=ids, labels=ids).loss)
        refs = [weakref.ref(p) for p in model.parameters()] + [weakref.ref(p) for p in copied.parameters()]
        gc.disable()
        try:
            del model, copied
            assert not any(r() is not None for r in refs)
        finally:
            gc.enable()
    # A shallow copy shares its original's forward: it runs while the original lives, and
    # afterwards says why it cannot.
    model = fl_transformers.patch(build())
    shallow = copy.copy(model)
    shallow(input_ids=ids, labels=ids)
    del model
    gc.collect()
    with pytest.raises(RuntimeError, match=r"shallow copy \(copy.copy\)"):
        shallow(input_ids=ids, labels=ids)


def test_unpatch_restores_the_models(monkeypatch):
    gemma = tiny_gemma3n([0.95, 0.0])
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1)).float()
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(4))
    calls = []
    for name in ("stat_topk_gelu_mul", "linear_cross_entropy"):
        real = getattr(fl_transformers, name)
        monkeypatch.setattr(fl_transformers, name, lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    for model in (gemma, llama):
        expected = model(input_ids=ids, labels=ids)
        assert fl_transformers.unpatch(fl_transformers.patch(model)) is model
        assert not any(k.startswith("_fastloss") or k == "forward" for m in model.modules() for k in vars(m))
        calls.clear()
        out = model(input_ids=ids, labels=ids)
        assert not calls and out.logits is not None
        torch.testing.assert_close(out.loss, expected.loss)
        fl_transformers.patch(model)  # and patched again
        model(input_ids=ids, labels=ids)
        assert calls
    with pytest.raises(TypeError, match="expected a torch.nn.Module"):
        fl_transformers.unpatch(None)
    # A forward already on the instance (accelerate's dispatch hooks put one there) comes back.
    hooked = []
    fl_transformers.unpatch(llama)
    plain = llama.forward
    llama.forward = lambda *a, **k: hooked.append(1) or plain(*a, **k)
    own = llama.forward
    fl_transformers.unpatch(fl_transformers.patch(llama))
    assert llama.forward is own
    llama(input_ids=ids, labels=ids)
    assert hooked


def test_patch_reaches_models_inside_wrappers():
    # A container (as DistributedDataParallel or torch.compile's wrapper) holding a causal LM.
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1)).float()
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(5))
    expected = llama(input_ids=ids, labels=ids).loss
    wrapper = torch.nn.ModuleDict({"student": llama})
    assert fl_transformers.patch(wrapper) is wrapper
    out = wrapper["student"](input_ids=ids, labels=ids)
    assert out.logits is None
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    fl_transformers.unpatch(wrapper)
    assert wrapper["student"](input_ids=ids, labels=ids).logits is not None


def test_patch_covers_subclasses_and_warns_when_nothing_is_supported():
    config = transformers.Gemma2Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, final_logit_softcapping=2.0)

    class MyGemma2(transformers.Gemma2ForCausalLM):  # keeps the forward: patched, with its softcap
        pass

    class OwnForward(transformers.Gemma2ForCausalLM):  # a forward of its own: not the patch's to replace
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(6))
    torch.manual_seed(0)
    model = MyGemma2(config).float()
    expected = model(input_ids=ids, labels=ids).loss
    fl_transformers.patch(model)
    out = model(input_ids=ids, labels=ids)
    assert out.logits is None
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fl_transformers.patch(model)  # already patched: nothing to say
    for unsupported in (OwnForward(config), torch.nn.Linear(2, 2)):
        with pytest.warns(UserWarning, match="nothing was patched"):
            fl_transformers.patch(unsupported)
        assert "forward" not in vars(unsupported)

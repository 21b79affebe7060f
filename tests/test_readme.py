"""The README's Python examples run as written (each block in a namespace of its own, with the
few names a block takes as given, such as `model`, defined here), so the front door's API
examples cannot drift from the API."""

import re
from pathlib import Path

import pytest
import torch

import fastloss

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 6


def _given(block: str) -> dict:
    """The names a block uses without defining them."""
    g = torch.Generator().manual_seed(0)
    names = {"torch": torch, "fastloss": fastloss}
    if "per_sample" in block:  # (B, T, D) hidden states, (B, T) targets, (V, D) head
        names.update(hidden=torch.randn(2, 5, 8, generator=g, dtype=torch.float64),
                     targets=torch.randint(0, 11, (2, 5), generator=g),
                     W=torch.randn(11, 8, generator=g, dtype=torch.float64),
                     x=torch.rand(3, 4, generator=g, dtype=torch.float64) + 0.5,
                     rbar=torch.rand(3, generator=g, dtype=torch.float64) * 0.9 + 0.05)
    if "patch(model)" in block:
        transformers = pytest.importorskip("transformers")
        if "Gemma 3n" in block:
            from test_integrations import tiny_gemma3n

            names["model"] = tiny_gemma3n([0.95, 0.0])
        else:
            names["model"] = transformers.LlamaForCausalLM(transformers.LlamaConfig(
                vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1))
    return names


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=lambda i: f"block{i + 1}")
def test_readme_example_runs(index):
    block = BLOCKS[index]
    names = _given(block)
    exec(compile(block, f"README.md python block {index + 1}", "exec"), names)
    if "patch(model)" in block:  # the patched model trains with fastloss's loss
        model = names["model"]
        ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
        out = model(input_ids=ids, labels=ids)
        assert torch.isfinite(out.loss)
        out.loss.backward()

"""Prepacked linear weights: same results, used only inside the context, rebuilt when weights change."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model

from hf_specdec.backends.cpu_kernels import packed_linears, packed_weight, prepacking_available

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN (mkldnn)")


def test_same_logits_and_the_model_is_restored():
    model = tiny_model("llama", vocab_size=96)
    assert prepacking_available(model)
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        reference = model(ids).logits
        with packed_linears(model):
            assert all("forward" in vars(m) for m in model.modules() if isinstance(m, torch.nn.Linear))
            packed = model(ids).logits
        after = model(ids).logits
    torch.testing.assert_close(packed, reference, atol=1e-5, rtol=1e-5)
    assert torch.equal(after, reference)
    assert not any("forward" in vars(m) for m in model.modules())


def test_packed_copy_is_cached_and_follows_weight_updates():
    linear = torch.nn.Linear(8, 4)
    first = packed_weight(linear.weight)
    assert packed_weight(linear.weight) is first
    with torch.no_grad():
        linear.weight.mul_(2.0)
    second = packed_weight(linear.weight)
    assert second is not first
    x = torch.randn(3, 8)
    out = torch.ops.mkldnn._linear_pointwise(x, second, linear.bias, "none", [], "")
    torch.testing.assert_close(out, linear(x))


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("HF_SPECDEC_PREPACK", "0")
    assert not prepacking_available(tiny_model("llama"))


def test_reduced_vocabulary_head_is_packed_and_keeps_its_minus_infinity():
    from test_models import tiny_draft

    draft = tiny_draft()
    ids = torch.randint(0, draft.config.vocab_size, (1, 6))
    with torch.no_grad():
        reference = draft(ids).logits
        with packed_linears(draft):
            assert "kept_logits" in vars(draft.lm_head)
            packed = draft(ids).logits
    assert "kept_logits" not in vars(draft.lm_head)
    assert torch.equal(torch.isneginf(packed), torch.isneginf(reference))
    kept = torch.isfinite(reference)
    torch.testing.assert_close(packed[kept], reference[kept], atol=1e-5, rtol=1e-5)

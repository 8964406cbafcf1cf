"""Prepacked linear weights: same results, used only inside the context, never stale after a weight changes."""

from __future__ import annotations

import pytest
import torch
from tiny_models import perturbed_copy, tiny_model

from hf_specdec import speculative_generate

from hf_specdec.backends.cpu_kernels import packed_linears, prepacking_available

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


def _lora_style_update(model, how: str) -> None:
    """Change the weights the ways adapters and merges do, most of them invisible to a tensor's version counter."""
    linear = model.model.layers[0].mlp.down_proj
    delta = 0.5 * torch.randn_like(linear.weight)
    if how == "data +=":
        linear.weight.data += delta
    elif how == "data rows swapped":  # same values, so the same sum: only their places change
        linear.weight.data[[0, 1]] = linear.weight.data[[1, 0]].clone()
    elif how == "data =":
        linear.weight.data = linear.weight.data + delta
    elif how == "load_state_dict":
        state = model.state_dict()
        state["model.layers.0.mlp.down_proj.weight"] = state["model.layers.0.mlp.down_proj.weight"] + delta
        model.load_state_dict(state)
    elif how == "no_grad in place":
        with torch.no_grad():
            linear.weight.add_(delta)
    elif how == "module swap":  # set_adapter-style: another module in the same place
        swapped = torch.nn.Linear(linear.in_features, linear.out_features, bias=False)
        with torch.no_grad():
            swapped.weight.copy_(linear.weight + delta)
        model.model.layers[0].mlp.down_proj = swapped
    else:
        raise ValueError(how)


@pytest.mark.parametrize("how", ["data +=", "data rows swapped", "data =", "load_state_dict", "no_grad in place", "module swap"])
def test_weights_changed_between_calls_are_seen(how, monkeypatch):
    """A packed copy never outlives its weight's values: after an update, speculative output still equals plain."""
    import hf_specdec.strategy

    # packed weights whatever they measure here
    monkeypatch.setattr(hf_specdec.strategy, "prepacking_pays", lambda model, tokens: prepacking_available(model))
    target = tiny_model("llama", vocab_size=96, scale=0.3)
    target.generation_config.eos_token_id = None
    draft = perturbed_copy(target, noise=0.05)
    ids = torch.randint(3, 96, (1, 8))
    kwargs = dict(do_sample=False, max_new_tokens=24, pad_token_id=0)
    speculative = dict(custom_generate=speculative_generate, draft_model=draft, speculative_config="sd:l=3")
    before = target.generate(ids, **kwargs, **speculative)
    assert torch.equal(before, target.generate(ids, **kwargs))
    _lora_style_update(target, how)
    _lora_style_update(draft, how)
    reference = target.generate(ids, **kwargs)
    assert not torch.equal(reference, before), "the update should change the output"
    assert torch.equal(target.generate(ids, **kwargs, **speculative), reference)


def test_packed_copies_are_kept_between_calls_while_their_weights_stay(monkeypatch):
    """Packing happens once per weight, not once per call; a changed weight is packed again, and only it."""
    from hf_specdec.backends import cpu_kernels

    packed = []
    original = cpu_kernels.packed_weight
    monkeypatch.setattr(cpu_kernels, "packed_weight", lambda weight: packed.append(weight) or original(weight))
    model = tiny_model("llama", vocab_size=96)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    ids = torch.randint(0, 96, (1, 5))
    with torch.no_grad():
        for _ in range(2):
            with packed_linears(model):
                model(ids)
        assert len(packed) == len(linears)
        linears[0].weight.data[0, 0] += 1.0
        with packed_linears(model):
            after = model(ids).logits
        assert len(packed) == len(linears) + 1 and packed[-1] is linears[0].weight
        torch.testing.assert_close(after, model(ids).logits, atol=1e-5, rtol=1e-5)
        cpu_kernels.forget_packed_weights(model)
        with packed_linears(model):
            model(ids)
    assert len(packed) == 2 * len(linears) + 1


def test_a_token_count_between_two_timed_alike_takes_their_choice(monkeypatch, tmp_path):
    """A tree size not timed yet, between two timed token counts whose choices agree, is not timed: their choice;
    where they disagree, or outside the timed counts, it is timed."""
    from hf_specdec.backends import cpu_kernels

    monkeypatch.setenv("HF_SPECDEC_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_kernels, "_PAYS", {})
    timed = []

    def time_forward(m, tokens, packed):  # packed is faster from 8 tokens on
        timed.append(tokens)
        return 1.0 if packed == (tokens >= 8) else 2.0

    monkeypatch.setattr(cpu_kernels, "_time_forward", time_forward)
    model = tiny_model("llama", vocab_size=96)
    assert [cpu_kernels.prepacking_pays(model, n) for n in (2, 8, 32)] == [False, True, True]
    count = len(timed)
    assert cpu_kernels.prepacking_pays(model, 17) and len(timed) == count  # between 8 and 32
    assert not cpu_kernels.prepacking_pays(model, 5) and len(timed) > count  # between 2 and 8: timed
    count = len(timed)
    assert cpu_kernels.prepacking_pays(model, 64) and len(timed) > count  # above every timed count: timed


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


def test_prepacking_is_chosen_by_measuring_it(monkeypatch, tmp_path):
    """Packed weights are used where they measure faster on this machine, and not where they measure slower."""
    from hf_specdec.backends import cpu_kernels

    model = tiny_model("llama", vocab_size=96)
    monkeypatch.setenv("HF_SPECDEC_CACHE", str(tmp_path / "faster"))
    monkeypatch.setattr(cpu_kernels, "_PAYS", {})
    monkeypatch.setattr(cpu_kernels, "_time_forward", lambda m, tokens, packed: 1.0 if packed else 2.0)
    assert cpu_kernels.prepacking_pays(model, 8)
    monkeypatch.setenv("HF_SPECDEC_CACHE", str(tmp_path / "slower"))
    monkeypatch.setattr(cpu_kernels, "_PAYS", {})
    monkeypatch.setattr(cpu_kernels, "_time_forward", lambda m, tokens, packed: 1.0 if packed else 1.01)
    assert not cpu_kernels.prepacking_pays(model, 8)
    monkeypatch.setenv("HF_SPECDEC_PREPACK", "0")
    assert not cpu_kernels.prepacking_pays(model, 8)


def test_kernel_choices_outlive_the_process_until_a_calibration(monkeypatch, tmp_path):
    """A choice is timed once and kept on disk: a later process (a fresh memo) runs what the planner's calibration
    timed, whatever one timing there would say, until `calibrate` times the choices anew with its samples."""
    from hf_specdec.backends import cpu_kernels
    from hf_specdec.planner import calibration

    monkeypatch.setenv("HF_SPECDEC_CACHE", str(tmp_path))
    model, other = tiny_model("llama", vocab_size=96), tiny_model("qwen2", vocab_size=96)
    monkeypatch.setattr(cpu_kernels, "_PAYS", {})
    timed = []
    faster = {"packed": True}

    def time_forward(m, tokens, packed):
        timed.append((m, tokens))
        return 1.0 if packed == faster["packed"] else 2.0

    monkeypatch.setattr(cpu_kernels, "_time_forward", time_forward)
    assert cpu_kernels.prepacking_pays(model, 8) and cpu_kernels.prepacking_pays(other, 8)
    faster["packed"] = False
    assert not cpu_kernels.prepacking_pays(model, 1)
    count = len(timed)
    monkeypatch.setattr(cpu_kernels, "_PAYS", {})  # a new process: the stored choices, nothing timed
    assert cpu_kernels.prepacking_pays(model, 8) and not cpu_kernels.prepacking_pays(model, 1)
    assert len(timed) == count
    monkeypatch.setattr(calibration, "measure", lambda m, grid, repeats, progress: [])
    monkeypatch.setattr(calibration, "fit_hardware", lambda *args: (_ for _ in ()).throw(RuntimeError("stop")))
    with pytest.raises(RuntimeError, match="stop"):
        calibration.calibrate(model, progress=False)  # forgets this model's choices, then measures
    assert not cpu_kernels.prepacking_pays(model, 8)  # timed anew: stock is faster now
    assert cpu_kernels.prepacking_pays(other, 8) and len(timed) == count + 4  # the other model's choice stays


def test_timing_leaves_the_random_state_of_sampling_alone():
    """Kernel choices and calibrations are timed inside the first generate() call that needs them: their random
    inputs come from their own generators, so a seeded call samples the same tokens whether it timed something or
    not."""
    from hf_specdec.backends.cpu_kernels import _time_forward
    from hf_specdec.planner.calibration import time_forward

    model = tiny_model("llama", vocab_size=64)
    torch.manual_seed(3)
    state = torch.get_rng_state()
    _time_forward(model, 4, packed=False, context=8, repeats=1)
    time_forward(model, 1, 4, 8, repeats=1)
    assert torch.equal(torch.get_rng_state(), state)

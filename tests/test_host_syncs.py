"""A steady-state step reads the device at most twice (the goal on a GPU: the host never waits on the device more
than that per step). Every Tensor method that reads values back to the host is counted during each step."""

from __future__ import annotations

import contextlib

import pytest
import torch
from tiny_models import left_padded_prompts, perturbed_copy, tiny_model

from hf_specdec import speculative_generate
from hf_specdec.loop import SpeculativeDecoder

MAX_SYNCS_PER_STEP = 2
READ_BACKS = ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero", "cpu", "numpy")


@contextlib.contextmanager
def counted_read_backs(counter: list[int]):
    originals = {name: getattr(torch.Tensor, name) for name in READ_BACKS}
    original_to = torch.Tensor.to

    def counting(name):
        def method(self, *args, **kwargs):
            counter[0] += 1
            return originals[name](self, *args, **kwargs)

        return method

    def to(self, *args, **kwargs):
        # a copy to the host from another device (on a CPU-only machine, `.to(device)` moves nothing)
        target = args[0] if args else kwargs.get("device")
        if isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu" and self.device.type != "cpu":
            counter[0] += 1
        return original_to(self, *args, **kwargs)

    for name in READ_BACKS:
        setattr(torch.Tensor, name, counting(name))
    torch.Tensor.to = to
    try:
        yield
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)
        torch.Tensor.to = original_to


def reads_per_step(monkeypatch) -> list[int]:
    """A list that receives the number of reads back of each step the loop runs from here on."""
    per_step = []
    step = SpeculativeDecoder._step

    def counting_step(self, *args, **kwargs):
        counter = [0]
        with counted_read_backs(counter):
            step(self, *args, **kwargs)
        per_step.append(counter[0])

    monkeypatch.setattr(SpeculativeDecoder, "_step", counting_step)
    return per_step


@pytest.fixture(scope="module")
def pair():
    target = tiny_model("llama", vocab_size=96, scale=0.3)
    target.generation_config.eos_token_id = None
    return target, perturbed_copy(target, noise=0.05)


@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampling"])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("method", ["sd:l=4", "spectr:k=3,l=3", "rsd-c:b=2-2-1", "rsd-s:w=3,d=4"])
def test_host_syncs_per_step(pair, monkeypatch, method, batch, do_sample):
    target, draft = pair
    per_step = reads_per_step(monkeypatch)
    inputs = left_padded_prompts([2 * (row % 3) for row in range(batch)], 9, 96, seed=7)
    target.generate(**inputs, do_sample=do_sample, max_new_tokens=40, pad_token_id=0, eos_token_id=[2, 95],
                    custom_generate=speculative_generate, draft_model=draft, speculative_config=method)
    assert len(per_step) > 3
    assert max(per_step) <= MAX_SYNCS_PER_STEP, f"host reads per step: {per_step}"


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("method", ["spectr:k=3,l=3", "rsd-s:w=3,d=4"])
def test_host_syncs_per_step_with_sparse_distributions(monkeypatch, method, batch):
    """Under top-k on a vocabulary wider than the support bound, p and q reach the verifier as `SparseProbs` (p after
    a check for ties beyond its entries, a read): still at most two reads a step."""
    from hf_specdec.processors import NodeScorer

    target = tiny_model("llama", vocab_size=512, scale=0.3)
    draft = perturbed_copy(target, noise=0.05)
    per_step, answered, top_support = reads_per_step(monkeypatch), [], NodeScorer.top_support
    monkeypatch.setattr(NodeScorer, "top_support", lambda *args: answered.append(1) or top_support(*args))
    inputs = left_padded_prompts([2 * (row % 3) for row in range(batch)], 9, 512, seed=7)
    target.generate(**inputs, do_sample=True, top_k=5, max_new_tokens=40, pad_token_id=0, eos_token_id=[2, 511],
                    custom_generate=speculative_generate, draft_model=draft, speculative_config=method)
    assert len(per_step) > 3 and answered
    assert max(per_step) <= MAX_SYNCS_PER_STEP, f"host reads per step: {per_step}"


def test_the_counter_sees_a_read_back():
    counter = [0]
    with counted_read_backs(counter):
        torch.ones(2).sum().item()
        bool(torch.ones(1))
        torch.ones(1).cpu()
    assert counter[0] == 3

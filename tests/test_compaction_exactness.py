"""End to end through generate(): sampling with the verifier on the compact vocabulary (`compact_vocabulary`, forced
on even where the vocabulary is tiny: the union of p's and q's supports, or q's support with p's lumped rest) still
follows the target's exact distribution (the chi-square test of tests/test_exactness.py), under top-k (the drafters
then sample on q's support only) and without it."""

from __future__ import annotations

import pytest
from statistics_helpers import chi_square_pvalue
from test_exactness import (  # noqa: F401  (pairs, pytorch_sample: the fixtures)
    LEVEL, SAMPLES, SETTINGS, exact_joint, pairs, pytorch_sample, sample_joint,
)

import hf_specdec.generation as generation
from hf_specdec.verify_batched import verify_tree_batched


CALLS = []


@pytest.mark.parametrize("compact", [True, "lumped"])
@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("config", ["sd:l=3", "spectr:k=4,l=3", "rsd-c:b=3-2-1", "rsd-s:w=4,d=3"])
def test_compact_verification_matches_target_distribution(pairs, pytorch_sample, monkeypatch, config, setting,
                                                          compact):
    def compact_verifier(inputs):
        CALLS.append(inputs.rule)
        return verify_tree_batched(inputs, compact=compact)

    monkeypatch.setattr(generation, "default_verifier", lambda device: compact_verifier)
    temperature, top_k, draft = SETTINGS[setting]
    target, _ = pairs[draft]
    CALLS.clear()
    counts = sample_joint(pytorch_sample, draft, config, temperature, top_k)
    assert counts.sum() == SAMPLES and CALLS and set(CALLS) <= {"rrs", "spectr"}
    pvalue = chi_square_pvalue(counts, exact_joint(target, temperature, top_k))
    assert pvalue > LEVEL, f"{config} at {setting}: chi-square p-value {pvalue:.2e}"


@pytest.mark.parametrize("config", ["sd:l=3", "spectr:k=3,l=3", "rsd-c:b=2-2-1", "rsd-s:w=3,d=3"])
def test_sparse_distributions_sample_the_dense_loops_tokens(monkeypatch, config):
    """Under top-k on a vocabulary larger than the support bound (512 tokens, top-k 5: 42 entries per node), the loop
    hands the verifier p and q as `SparseProbs` (p's support checked for ties beyond its entries); with the same seed
    it samples the tokens of the loop made to work on dense distributions (it draws the same random numbers), over
    rows of different lengths, and it did go sparse."""
    import torch
    from tiny_models import left_padded_prompts, perturbed_copy, tiny_model

    from hf_specdec import speculative_generate
    from hf_specdec.drafting import DraftProbsBuffer
    from hf_specdec.processors import NodeScorer

    target = tiny_model("llama", vocab_size=512, scale=0.5)
    draft = perturbed_copy(target, noise=0.1)
    inputs = left_padded_prompts([0, 2, 5], 8, 512, seed=3)
    top_support = NodeScorer.top_support
    answered = []
    monkeypatch.setattr(NodeScorer, "top_support",
                        lambda *args: answered.append(1) or top_support(*args))

    def sample():
        torch.manual_seed(11)
        return target.generate(**inputs, do_sample=True, temperature=0.8, top_k=5, max_new_tokens=24, pad_token_id=0,
                               eos_token_id=None, custom_generate=speculative_generate, draft_model=draft,
                               speculative_config=config)

    sparse = sample()
    assert answered
    start = DraftProbsBuffer.start

    def dense_start(self, *args):
        start(self, *args)._to_dense()  # every level recorded densely: p dense too
        return self

    monkeypatch.setattr(DraftProbsBuffer, "start", dense_start)
    answered.clear()
    assert torch.equal(sample(), sparse) and not answered

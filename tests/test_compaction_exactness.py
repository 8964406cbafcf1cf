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

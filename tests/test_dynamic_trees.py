"""Dynamic trees (`,q=Q`): a node grows children only while the draft reaches it with probability >= Q, and drafting
stops when no node qualifies. Exactness with dynamic trees is checked by the chi-square (tests/test_exactness.py) and
greedy identity (tests/test_greedy_identity.py) tests; here, that the trees really are cut where q says."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from tiny_models import left_padded_prompts, perturbed_copy, tiny_model

from hf_specdec import SpeculativeConfig, speculative_generate
from hf_specdec.loop import SpeculativeDecoder


@pytest.mark.parametrize("config", ["sd:l=6,q=0.3", "spectr:k=3,l=4,q=0.2", "rsd-c:b=2-2-1-1,q=0.2", "rsd-s:w=3,d=5,q=0.2"])
@pytest.mark.parametrize("do_sample", [False, True])
def test_only_nodes_the_draft_reaches_with_probability_q_grow(monkeypatch, config, do_sample):
    target = tiny_model("llama", vocab_size=96, scale=0.3)
    target.generation_config.eos_token_id = None
    draft = perturbed_copy(target, noise=0.05)
    limit = SpeculativeConfig.parse(config)
    trees = []
    original = SpeculativeDecoder._draft

    def recorded(self, state, out, tree, depth):
        step = original(self, state, out, tree, depth)
        trees.append((tree, depth))
        return step

    inputs = left_padded_prompts([0, 3], 9, 96, seed=5)
    kwargs = dict(do_sample=do_sample, max_new_tokens=48, pad_token_id=0, custom_generate=speculative_generate,
                  draft_model=draft, return_dict_in_generate=True)
    torch.manual_seed(0)
    static = target.generate(**inputs, speculative_config=str(dataclasses.replace(limit, min_path_q=0.0)), **kwargs)
    monkeypatch.setattr(SpeculativeDecoder, "_draft", recorded)
    torch.manual_seed(0)
    out = target.generate(**inputs, speculative_config=config, **kwargs)
    cut_levels, refused = 0, 0
    for tree, depth in trees:
        size = tree.size
        parents, valid = tree.parents[:, :size], tree.valid[:, :size]
        has_children = torch.zeros_like(valid)
        has_children.scatter_(1, parents.clamp(min=0), valid & (parents >= 0))
        has_children[:, 0] = False  # the root always grows
        # every node with children was reached with probability >= q
        assert (tree.path_log_q[:, :size][has_children] >= math.log(limit.min_path_q) - 1e-6).all()
        refused += int((valid & ~has_children & (tree.path_log_q[:, :size] < math.log(limit.min_path_q))).sum())
        cut_levels += tree.depth < depth
    assert refused > 0 and cut_levels > 0, "the threshold should cut some trees short"
    assert out.speculative_stats.draft_calls < static.speculative_stats.draft_calls
    if not do_sample:
        assert torch.equal(out.sequences, static.sequences)


def test_dynamic_configs_round_trip_and_refuse_bad_thresholds():
    config = SpeculativeConfig.parse("rsd-s:w=3,d=5,q=0.15")
    assert config.min_path_q == 0.15 and str(config) == "rsd-s:w=3,d=5,q=0.15"
    assert SpeculativeConfig.parse(str(config)) == config
    for bad in ("sd:l=4,q=1.5", "sd:l=4,q=x", "ar:q=0.1"):
        with pytest.raises(ValueError):
            SpeculativeConfig.parse(bad)

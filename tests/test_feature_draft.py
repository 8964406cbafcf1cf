"""Feature-conditioned (EAGLE-style) drafts in the speculative loop: bookkeeping, exact acceptance, errors, saving.

Exactness (greedy identity on five families, the sampled distribution against the enumerated target) runs with a
feature draft in tests/test_greedy_identity.py and tests/test_exactness.py; here are the checks that exactness
cannot make, because a wrong draft only lowers acceptance:
- a draft that computes exactly the target's distribution is accepted to full depth at every step;
- the features the draft reads are the target's own, of the token before each input, at every step.
"""

from __future__ import annotations

import pytest
import torch
from feature_fixtures import drafted_tokens, exact_feature_pair, feature_draft_for, predictable_target, tiny_feature_draft
from tiny_models import left_padded_prompts, tiny_model
from transformers import AutoModelForCausalLM

from hf_specdec import SpeculativeConfig, speculative_generate
from hf_specdec.feature_draft import FeatureDraftForCausalLM
from hf_specdec.loop import SpeculativeDecoder
from hf_specdec.teacher import lm_head_inputs

NEW_TOKENS = 40


def prompts(batch: int, vocab: int = 96) -> dict[str, torch.Tensor]:
    return left_padded_prompts([2 * row for row in range(batch)], 9, vocab, seed=3)


def speculative(target, draft, inputs, config, do_sample, **kwargs):
    return target.generate(**inputs, do_sample=do_sample, max_new_tokens=NEW_TOKENS, pad_token_id=0,
                           custom_generate=speculative_generate, draft_model=draft, speculative_config=config,
                           return_dict_in_generate=True, **kwargs)


# greedy RSD-S is left out: beam search may drop the argmax chain from the tree even when q = p
FULL_DEPTH = [("sd:l=4", False), ("spectr:k=3,l=3", False), ("rsd-c:b=2-2-1", False)] + [
    (config, True) for config in ("sd:l=4", "spectr:k=3,l=3", "rsd-c:b=2-2-1", "rsd-s:w=3,d=4")]


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("config,do_sample", FULL_DEPTH)
def test_a_draft_equal_to_the_target_is_accepted_to_full_depth_at_every_step(config, do_sample, batch):
    target, draft = exact_feature_pair()
    torch.manual_seed(0)
    out = speculative(target, draft, prompts(batch), config, do_sample)
    depth = SpeculativeConfig.parse(config).depth
    for row, accepted in enumerate(out.speculative_stats.accepted_lengths):
        # every step but a last one cut short by max_new_tokens
        assert set(accepted[:-1]) == {depth}, f"row {row}: accepted lengths {accepted}"
    if not do_sample:
        reference = target.generate(**prompts(batch), do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=0)
        assert torch.equal(out.sequences, reference)


@pytest.mark.parametrize("config", ["sd:l=3", "rsd-c:b=2-2", "rsd-s:w=3,d=3"])
@pytest.mark.parametrize("do_sample", [False, True])
def test_the_draft_reads_the_targets_features_of_the_token_before(monkeypatch, config, do_sample):
    """After every step, each pending draft input (the accepted path and the next root) carries the target's LM-head
    input at the position before it, as a plain forward over the committed sequence computes it."""
    target = predictable_target("llama")
    draft = feature_draft_for(target)
    inputs = prompts(3)
    checked = []
    original_step = SpeculativeDecoder._step

    def checked_step(self, state, out, stop, timer):
        original_step(self, state, out, stop, timer)
        for a, row in enumerate(state.host_rows):
            length = int(out.lengths[row])
            sequence = out.sequences[row, :length]
            real = sequence.new_ones(length, dtype=torch.bool)
            real[: int((inputs["attention_mask"][row] == 0).sum())] = False
            positions = (real.long().cumsum(0) - 1).clamp(min=0)
            with torch.no_grad():
                hidden = target.get_decoder()(input_ids=sequence[None], attention_mask=real[None].long(),
                                              position_ids=positions[None]).last_hidden_state[0]
            pending = state.host_pending[a]
            width = state.draft_pending.shape[1]
            assert state.draft_pending_valid[a].tolist() == [False] * (width - pending) + [True] * pending
            assert state.draft_pending[a, -pending:].tolist() == sequence[length - pending:].tolist()
            expected = hidden[length - pending - 1 : length - 1]
            torch.testing.assert_close(state.draft_pending_features[a, -pending:], expected, atol=1e-4, rtol=1e-4)
            checked.append(pending)

    monkeypatch.setattr(SpeculativeDecoder, "_step", checked_step)
    torch.manual_seed(0)
    speculative(target, draft, inputs, config, do_sample)
    assert checked and max(checked) > 1, "some step should have accepted draft tokens"


@pytest.mark.parametrize("config", ["sd:l=4", "spectr:k=3,l=3", "rsd-c:b=2-2-1", "rsd-s:w=3,d=4"])
def test_a_reduced_vocabulary_draft_keeps_greedy_output(config):
    """Drafting on the draft's kept tokens only (its logits are -inf elsewhere): the same output as plain generate,
    and tokens outside the kept ones never drafted."""
    target = predictable_target("qwen2")
    target.generation_config.eos_token_id = None
    kept = [t for t in range(96) if t % 5 != 4]
    draft = feature_draft_for(target, kept_token_ids=kept)
    inputs = prompts(3)
    reference = target.generate(**inputs, do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=0)
    with drafted_tokens() as drafted:
        out = speculative(target, draft, inputs, config, False)
    assert torch.equal(out.sequences, reference)
    assert out.speculative_stats.block_efficiency > 1.2
    assert set(torch.cat(drafted).tolist()) <= set(kept)


def test_lm_head_inputs_are_what_the_head_reads():
    target = tiny_model("llama", vocab_size=96)
    tokens = torch.randint(3, 96, (12,))
    with torch.no_grad():
        logits = target(tokens[None]).logits[0]
        torch.testing.assert_close(target.lm_head(lm_head_inputs(target, tokens)), logits)


def test_a_draft_for_another_hidden_size_is_refused():
    target = tiny_model("llama", vocab_size=96)
    other = tiny_model("llama", vocab_size=96, hidden_size=48, num_attention_heads=4, num_key_value_heads=2)
    draft = tiny_feature_draft(other)
    with pytest.raises(ValueError, match="hidden states of size 48.*size 32.*--draft-type feature"):
        speculative(target, draft, prompts(1), "sd:l=2", False)


def test_plain_and_assisted_generate_refuse_a_feature_draft_by_name():
    target = predictable_target("llama")
    draft = feature_draft_for(target)
    with pytest.raises(ValueError, match="needs the target's hidden states"):
        draft.generate(**prompts(1), max_new_tokens=3, pad_token_id=0)
    with pytest.raises(ValueError, match="needs the target's hidden states"):
        target.generate(**prompts(1), assistant_model=draft, max_new_tokens=3, pad_token_id=0)


def test_saved_feature_draft_loads_with_the_auto_classes(tmp_path):
    from hf_specdec import distill

    target = predictable_target("llama")
    draft = feature_draft_for(target)
    distill.save_draft(draft, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, FeatureDraftForCausalLM) and loaded.dtype == torch.float32
    tokens = torch.randint(3, 96, (1, 7))
    features = torch.randn(1, 7, 32)
    with torch.no_grad():
        for parameter in draft.parameters():  # what the fp16 file holds
            parameter.copy_(parameter.half().float())
        expected, got = draft(tokens, features), loaded(tokens, features)
    torch.testing.assert_close(got.logits, expected.logits)
    torch.testing.assert_close(got.features, expected.features)
    inputs = prompts(1)
    reference = target.generate(**inputs, do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=0)
    assert torch.equal(speculative(target, loaded, inputs, "rsd-c:b=2-2", False).sequences, reference)

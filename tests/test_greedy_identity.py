"""Greedy speculative decoding is token-identical to plain `generate(do_sample=False)`.

For every method and both kinds of draft (standalone, feature-conditioned), on Llama, Qwen2, Mistral (sliding window
crossed by the output), GPT-2 and OPT, with eager and sdpa attention, batch 1 and batch 3 with left padding, 64 new
tokens: once as is, once with an eos that lands inside an accepted path (row 0), and once with a max_new_tokens that
cuts a step's accepted path short.
"""

from __future__ import annotations

import pytest
import torch
from feature_fixtures import feature_draft_for, predictable_target
from tiny_models import FAMILIES, left_padded_prompts, perturbed_copy, tiny_model

from hf_specdec import speculative_generate

# the last two are dynamic trees (nodes grow only while the draft reaches them with at least probability q)
METHODS = ["ar", "sd:l=4", "spectr:k=3,l=3", "rsd-c:b=2-2-1", "rsd-s:w=3,d=4", "sd:l=6,q=0.3", "rsd-c:b=3-2-1-1,q=0.2"]
NEW_TOKENS = 64


def prompts(batch: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    padded = left_padded_prompts([2 * row for row in range(batch)], 9, vocab, seed=7)  # left padding of 0, 2, 4, ...
    return padded["input_ids"], padded["attention_mask"]


def generate(model, inputs, **kwargs):
    return model.generate(**inputs, do_sample=False, pad_token_id=0, **kwargs)


def step_spans(accepted_lengths: list[int]) -> list[tuple[int, int]]:
    """(first generated index, number of accepted draft tokens) of each step of one row."""
    spans, start = [], 0
    for accepted in accepted_lengths:
        spans.append((start, accepted))
        start += accepted + 1
    return spans


def index_inside_accepted_path(accepted_lengths: list[int], tokens: list[int]) -> int | None:
    """A generated index that was an accepted draft token (not a step's last token) and whose token did not occur
    earlier in the output, so that using it as eos stops generation exactly there."""
    for start, accepted in step_spans(accepted_lengths):
        for index in range(start, start + accepted):
            if 3 <= index < len(tokens) - 1 and tokens[index] not in tokens[:index]:
                return index
    return None


@pytest.fixture(scope="module", params=[(f, a, d) for f in FAMILIES for a in ("eager", "sdpa") for d in ("standalone", "feature")],
                ids=lambda p: "-".join(p))
def pair(request):
    family, attention, draft_kind = request.param
    if draft_kind == "feature":
        target = predictable_target(family, attention)
        draft = feature_draft_for(target)
    else:
        target = tiny_model(family, vocab_size=96, attn_implementation=attention, scale=0.3)
        draft = perturbed_copy(target, noise=0.05)
    target.generation_config.eos_token_id = None
    return target, draft


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("method", METHODS)
def test_greedy_is_token_identical(pair, method, batch):
    target, draft = pair
    input_ids, attention_mask = prompts(batch, target.config.vocab_size)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    speculative = dict(custom_generate=speculative_generate, draft_model=draft, speculative_config=method,
                       return_dict_in_generate=True)

    reference = generate(target, inputs, max_new_tokens=NEW_TOKENS)
    out = generate(target, inputs, max_new_tokens=NEW_TOKENS, **speculative)
    assert torch.equal(out.sequences, reference), f"{method}: differs from plain generate"
    stats = out.speculative_stats
    assert stats.generated_tokens == batch * NEW_TOKENS
    if method == "ar":
        return
    assert stats.block_efficiency > 1.2, "the draft should be accepted often enough to exercise the tree"

    # eos inside an accepted path of row 0
    tokens = out.sequences[0, input_ids.shape[1]:].tolist()
    eos_index = index_inside_accepted_path(stats.accepted_lengths[0], tokens)
    assert eos_index is not None
    eos = tokens[eos_index]
    reference = generate(target, inputs, max_new_tokens=NEW_TOKENS, eos_token_id=eos)
    out = generate(target, inputs, max_new_tokens=NEW_TOKENS, eos_token_id=eos, **speculative)
    assert torch.equal(out.sequences, reference), f"{method}: differs with eos={eos}"
    assert out.sequences[0, input_ids.shape[1] + eos_index] == eos
    assert out.speculative_stats.generated_tokens < batch * NEW_TOKENS

    # max_new_tokens ending inside an accepted path. With one row the tree is never drafted past max_length; with
    # several, rows advance by different amounts and a row near its limit gets its accepted path cut short.
    if batch == 1:
        step_start, _ = next(s for s in step_spans(stats.accepted_lengths[0]) if s[1] >= 1 and s[0] > 4)
        limits = [step_start + 1]
    else:
        limits = range(5, 30)
    for limit in limits:
        reference = generate(target, inputs, max_new_tokens=limit)
        out = generate(target, inputs, max_new_tokens=limit, **speculative)
        assert torch.equal(out.sequences, reference), f"{method}: differs with max_new_tokens={limit}"
        assert out.speculative_stats.generated_tokens == batch * limit
        drafted = [len(a) + sum(a) for a in out.speculative_stats.accepted_lengths]
        if batch == 1 or max(drafted) > limit:
            break
    else:
        pytest.fail("no row's accepted path was cut by max_new_tokens")

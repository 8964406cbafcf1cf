"""Every rotary embedding type transformers ships: greedy speculative output identical to plain `generate`, or refused.

"dynamic" (NTK) and "longrope" pick their frequencies from the sequence length of each forward, which a tree step
does not share with one-token decoding; `hf_specdec.rope` reproduces plain decoding's per-token choice. The tiny
models switch regimes within the output (max_position_embeddings / original_max_position_embeddings of 24 with 9
prompt tokens and 40 new ones).
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import left_padded_prompts, perturbed_copy
from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from hf_specdec import speculative_generate

SWITCH = 24  # where the length-dependent types change frequencies
HEAD_DIM = 8
ROPE_PARAMETERS = {
    "default": {},
    "linear": {"factor": 2.0},
    "dynamic": {"factor": 4.0},
    "yarn": {"factor": 4.0, "original_max_position_embeddings": SWITCH},
    "llama3": {"factor": 4.0, "original_max_position_embeddings": SWITCH, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
    "proportional": {"partial_rotary_factor": 0.5},
    "longrope": {"short_factor": [1.0] * (HEAD_DIM // 2), "long_factor": [3.0 + i for i in range(HEAD_DIM // 2)],
                 "original_max_position_embeddings": SWITCH},
}
METHODS = ["sd:l=4", "rsd-s:w=3,d=4"]
COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.3)


def rope_model(rope_type: str, attention: str = "sdpa"):
    torch.manual_seed(0)
    parameters = {"rope_type": rope_type, "rope_theta": 10000.0, **ROPE_PARAMETERS[rope_type]}
    if rope_type == "longrope":  # Phi-3's (its generate switches the whole cache to the long factors)
        config = Phi3Config(max_position_embeddings=256, original_max_position_embeddings=SWITCH, rope_parameters=parameters, **COMMON)
        cls = Phi3ForCausalLM
    else:
        # dynamic NTK scales beyond max_position_embeddings
        config = LlamaConfig(max_position_embeddings=SWITCH if rope_type == "dynamic" else 256, rope_parameters=parameters, **COMMON)
        cls = LlamaForCausalLM
    config._attn_implementation = attention
    model = cls(config).eval()
    model.generation_config.eos_token_id = None
    return model


def generate(model, inputs, new_tokens, **kwargs):
    return model.generate(**inputs, do_sample=False, max_new_tokens=new_tokens, pad_token_id=0, **kwargs)


def test_every_rope_type_is_covered():
    assert set(ROPE_INIT_FUNCTIONS) | {"default"} == set(ROPE_PARAMETERS), "a new rope type: add it here"


# (left padding per row, prompt width, new tokens): longrope's exact cases; its refused one is tested below
SHAPES = {"batch 1": ([0], 9, 40), "batch 3": ([0, 2, 4], 9, 40)}
LONGROPE_SHAPES = {"prompt beyond the switch": ([0, 2, 4], 30, 30), "padded rows cross it": ([1, 3, 5], 9, 40),
                   "output below it": ([0], 9, 16)}


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("rope_type", sorted(ROPE_PARAMETERS))
def test_greedy_is_token_identical(rope_type, attention):
    target = rope_model(rope_type, attention)
    draft = perturbed_copy(target, noise=0.05)
    for name, (pads, width, new_tokens) in (LONGROPE_SHAPES if rope_type == "longrope" else SHAPES).items():
        inputs = left_padded_prompts(pads, width, 96, seed=7)
        reference = generate(target, inputs, new_tokens)
        for method in METHODS:
            out = generate(target, inputs, new_tokens, custom_generate=speculative_generate, draft_model=draft,
                           speculative_config=method)
            assert torch.equal(out, reference), f"{rope_type}, {name}, {method}: differs from plain generate"


def test_longrope_crossing_the_switch_is_refused():
    target = rope_model("longrope")
    inputs = left_padded_prompts([0], 9, 96, seed=7)
    with pytest.raises(ValueError, match="rope_type='longrope'.*original_max_position_embeddings=24.*max_new_tokens <= 25"):
        generate(target, inputs, 40, custom_generate=speculative_generate, draft_model=perturbed_copy(target, 0.05),
                 speculative_config="sd:l=2")
    from transformers import GenerationConfig

    from hf_specdec.backends.hf import HFBackend
    from hf_specdec.generation import decode

    with pytest.raises(ValueError, match="rope_type='longrope'"):  # outside generate too
        decode(HFBackend(target), HFBackend(perturbed_copy(target, 0.05), "draft"), inputs["input_ids"],
               GenerationConfig(do_sample=False, max_new_tokens=40, pad_token_id=0), "sd:l=2",
               attention_mask=inputs["attention_mask"])


def test_dynamic_rope_state_carries_over_calls_as_in_plain_generate():
    """Dynamic NTK keeps the longest length it has seen: a call after a long one starts from there. A speculative
    call leaves the module as a plain call would (here it stops at an eos, after drafting past it), so the next call
    (plain or speculative) gives the same output."""
    plain, speculative = rope_model("dynamic"), rope_model("dynamic")
    draft = perturbed_copy(plain, noise=0.05)
    long_prompt, short_prompt = left_padded_prompts([0], 30, 96, seed=3), left_padded_prompts([0], 26, 96, seed=4)
    tokens = generate(rope_model("dynamic"), long_prompt, 20)[0, 30:].tolist()
    eos = next(t for i, t in enumerate(tokens) if i >= 8 and t not in tokens[:i])
    generate(plain, long_prompt, 20, eos_token_id=eos)
    generate(speculative, long_prompt, 20, eos_token_id=eos, custom_generate=speculative_generate, draft_model=draft,
             speculative_config="sd:l=6")
    assert torch.equal(plain.model.rotary_emb.inv_freq, speculative.model.rotary_emb.inv_freq)
    assert plain.model.rotary_emb.max_seq_len_cached == speculative.model.rotary_emb.max_seq_len_cached
    reference = generate(plain, short_prompt, 10)
    out = generate(speculative, short_prompt, 10, custom_generate=speculative_generate, draft_model=draft,
                   speculative_config="rsd-s:w=3,d=4")
    assert torch.equal(out, reference)


def test_measuring_forwards_leave_the_rotary_state(monkeypatch):
    """Forwards outside generation (timing the kernels, the planner's calibration) run past the dynamic type's
    max_position_embeddings; the module must be left as it was, or the next generation would start elsewhere."""
    from hf_specdec.backends import cpu_kernels
    from hf_specdec.planner.calibration import time_forward

    model = rope_model("dynamic")
    rotary = model.model.rotary_emb
    before = rotary.inv_freq.clone(), rotary.max_seq_len_cached
    monkeypatch.setattr(cpu_kernels, "_PAYS", {})
    cpu_kernels._time_forward(model, 40, packed=False)
    time_forward(model, batch=1, new_tokens=8, context=64)
    assert torch.equal(rotary.inv_freq, before[0]) and rotary.max_seq_len_cached == before[1]

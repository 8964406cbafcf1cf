"""What users expect from generate(): processors with each node's own prefix, stopping criteria, streamers, stats."""

from __future__ import annotations

import pytest
import torch
from tiny_models import character_tokenizer, left_padded_prompts, perturbed_copy, tiny_model
from transformers import GenerationConfig, StopStringCriteria, StoppingCriteriaList

from hf_specdec import speculative_generate
from hf_specdec.backends.cpu_kernels import prepacking_available

METHODS = ["sd:l=3", "spectr:k=2,l=3", "rsd-c:b=2-2-1", "rsd-s:w=3,d=3"]


@pytest.fixture(scope="module")
def pair():
    target = tiny_model("llama", vocab_size=96, scale=0.3)
    target.generation_config.eos_token_id = None
    return target, perturbed_copy(target, noise=0.05)


@pytest.fixture(scope="module")
def batch():
    return left_padded_prompts([0, 3, 0], 8, 96, seed=3)


def speculative(draft, config, **kwargs):
    return dict(custom_generate=speculative_generate, draft_model=draft, speculative_config=config, pad_token_id=0, **kwargs)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "options",
    [
        {"repetition_penalty": 1.5},
        {"no_repeat_ngram_size": 2},
        {"min_new_tokens": 20, "eos_token_id": [5, 9, 17]},
        {"bad_words_ids": [[89], [14, 14]], "eos_token_id": 23},  # both occur in the unconstrained output
    ],
    ids=["repetition-penalty", "no-repeat-ngram", "min-new-tokens", "bad-words"],
)
def test_prefix_dependent_processors_keep_greedy_identity(pair, batch, method, options):
    target, draft = pair
    reference = target.generate(**batch, do_sample=False, max_new_tokens=40, pad_token_id=0, **options)
    eos = {k: v for k, v in options.items() if k == "eos_token_id"}
    unconstrained = target.generate(**batch, do_sample=False, max_new_tokens=40, pad_token_id=0, **eos)
    assert not torch.equal(reference, unconstrained)  # the processor changes the output: the identity tests it
    out = target.generate(**batch, do_sample=False, max_new_tokens=40, **speculative(draft, method), **options)
    assert torch.equal(out, reference)


class Recorder:
    """A streamer that keeps what it is given."""

    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.flatten().tolist())

    def end(self):
        self.ended = True


def test_streamer_receives_every_token_once(pair):
    target, draft = pair
    recorder = Recorder()
    prompt = torch.tensor([[1, 40, 41, 42]])
    out = target.generate(prompt, do_sample=False, max_new_tokens=30, speculative_streamer=recorder, **speculative(draft, "rsd-s:w=3,d=3"))
    assert recorder.chunks[0] == prompt[0].tolist() and recorder.ended
    assert sum(recorder.chunks[1:], []) == out[0, 4:].tolist()
    assert any(len(chunk) > 1 for chunk in recorder.chunks[1:])  # several tokens per step arrive together


def test_stats(pair, batch):
    target, draft = pair
    out = target.generate(**batch, do_sample=True, max_new_tokens=25, return_dict_in_generate=True, **speculative(draft, "rsd-c:b=2-2-1"))
    stats = out.speculative_stats
    assert stats.batch_size == 3 and stats.generated_tokens == 75
    assert stats.block_efficiency == pytest.approx(75 / stats.row_steps)
    assert stats.draft_calls >= stats.target_calls  # a draft forward per tree level
    for row in stats.accepted_lengths:
        assert sum(row) + len(row) >= 25 and max(row) <= 3
    assert stats.time_total >= stats.time_draft + stats.time_target + stats.time_verify
    assert stats.as_dict()["block_efficiency"] == stats.block_efficiency
    assert "block efficiency" in stats.summary()


def test_scores_and_logits_per_generated_token(pair):
    target, draft = pair
    prompt = torch.tensor([[1, 40, 41, 42]])
    out = target.generate(prompt, do_sample=False, max_new_tokens=12, return_dict_in_generate=True, output_scores=True,
                          output_logits=True, repetition_penalty=1.3, **speculative(draft, "sd:l=3"))
    reference = target.generate(prompt, do_sample=False, max_new_tokens=12, return_dict_in_generate=True,
                                output_scores=True, output_logits=True, repetition_penalty=1.3, pad_token_id=0)
    assert torch.equal(out.sequences, reference.sequences)
    assert len(out.scores) == len(out.logits) == 12
    for ours, theirs in zip(out.scores, reference.scores):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    for ours, theirs in zip(out.logits, reference.logits):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("where", ["generate keyword", "generation config", "stopping criterion"])
def test_stop_strings(pair, where):
    """As plain generate: stop_strings with tokenizer= (or in the model's generation config), or a criterion."""
    target, draft = pair
    tokenizer = character_tokenizer()
    prompt = torch.tensor([[1, 40, 41, 42]])
    free = target.generate(prompt, do_sample=False, max_new_tokens=30, pad_token_id=0)
    stop = tokenizer.decode(free[0, 4 + 8 : 4 + 10])  # two characters generated mid-way
    reference = target.generate(prompt, pad_token_id=0, do_sample=False, max_new_tokens=30, stop_strings=[stop], tokenizer=tokenizer)
    options = {
        "generate keyword": dict(stop_strings=[stop], tokenizer=tokenizer),
        "generation config": dict(generation_config=GenerationConfig(stop_strings=[stop], do_sample=False), tokenizer=tokenizer),
        "stopping criterion": dict(stopping_criteria=StoppingCriteriaList([StopStringCriteria(tokenizer, [stop])])),
    }[where]
    out = target.generate(prompt, do_sample=False, max_new_tokens=30, **options, **speculative(draft, "rsd-s:w=3,d=4"))
    assert torch.equal(out, reference) and out.shape[1] < free.shape[1]


def test_num_return_sequences_with_sampling(pair):
    target, draft = pair
    out = target.generate(torch.tensor([[1, 40, 41]]), do_sample=True, num_return_sequences=4, max_new_tokens=10,
                          **speculative(draft, "rsd-s:w=2,d=2"))
    assert out.shape == (4, 13)
    assert len({tuple(row.tolist()) for row in out}) > 1


@pytest.mark.parametrize("method", ["ar", "rsd-c:b=2-1"])
def test_one_token_prompt_and_max_length(pair, method):
    target, draft = pair
    prompt = torch.tensor([[1]])
    reference = target.generate(prompt, do_sample=False, max_length=20, pad_token_id=0)
    out = target.generate(prompt, do_sample=False, max_length=20, **speculative(draft, method))
    assert torch.equal(out, reference)


def test_a_prompt_longer_than_max_length_is_refused_as_generate_refuses_it(pair):
    from hf_specdec.backends.hf import HFBackend
    from hf_specdec.generation import decode

    target, draft = pair
    prompt = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]])
    with pytest.raises(ValueError, match="max_length"):
        target.generate(prompt, do_sample=False, max_length=5, pad_token_id=0)
    with pytest.raises(ValueError, match="increase max_length or, better, set max_new_tokens"):
        decode(HFBackend(target, "target"), HFBackend(draft, "draft"), prompt,
               GenerationConfig(do_sample=False, max_length=5), "rsd-c:b=2-1")


def test_decode_without_a_length_generates_twenty_new_tokens_as_generate(pair):
    from hf_specdec.backends.hf import HFBackend
    from hf_specdec.generation import decode

    target, draft = pair
    prompt = torch.tensor([[1, 40, 41, 42] * 6])  # longer than generate's default max_length of 20
    reference = target.generate(prompt, do_sample=False, pad_token_id=0)
    result = decode(HFBackend(target, "target"), HFBackend(draft, "draft"), prompt,
                    GenerationConfig(do_sample=False, pad_token_id=0), "rsd-c:b=2-1")
    assert reference.shape[1] == prompt.shape[1] + 20 and torch.equal(result.sequences, reference)


def test_decode_honours_renormalize_logits_and_max_time(pair):
    from hf_specdec.backends.hf import HFBackend
    from hf_specdec.generation import decode

    target, draft = pair
    backends = HFBackend(target, "target"), HFBackend(draft, "draft")
    prompt = torch.tensor([[1, 40, 41, 42]])
    options = dict(do_sample=False, max_new_tokens=12, pad_token_id=0, renormalize_logits=True, output_scores=True,
                   return_dict_in_generate=True)
    reference = target.generate(prompt, **options)
    result = decode(*backends, prompt, GenerationConfig(**options), "rsd-c:b=2-1")
    assert torch.equal(result.sequences, reference.sequences)
    assert torch.allclose(torch.stack(result.scores), torch.stack(reference.scores), atol=1e-5)
    assert torch.allclose(torch.stack(result.scores).exp().sum(-1), torch.ones(12, 1))  # normalised
    # a time limit already spent: one token, as generate
    reference = target.generate(prompt, do_sample=False, max_new_tokens=12, pad_token_id=0, max_time=1e-9)
    result = decode(*backends, prompt, GenerationConfig(do_sample=False, max_new_tokens=12, max_time=1e-9), "rsd-c:b=2-1")
    assert reference.shape[1] == 5 and torch.equal(result.sequences, reference)


def test_auto_asks_the_planner_and_records_acceptance(pair, monkeypatch, tmp_path, free_loop):
    """`auto` asks the planner for a shape; with nothing recorded for the pair it explores a tree, and every run's
    block efficiency is recorded (greedy under temperature 0) for the next choice."""
    from hf_specdec.planner import Hardware, calibration
    from hf_specdec.planner.acceptance import pair_statistics_path

    # a fixed weight-bound latency profile (and a free loop) instead of timing this busy CPU: a deterministic choice
    weight_bound = Hardware("weight-bound", matmul_flops=1e14, attention_flops=5e13, bandwidth=1e9,
                            attention_bandwidth=1e9, kernel_overhead=0.0, overlap=True, dtype="float32")
    monkeypatch.setattr(calibration, "calibrated_hardware", lambda model, **_: weight_bound)
    monkeypatch.setenv("HF_SPECDEC_CACHE", str(tmp_path))  # no statistics recorded by other tests
    target, _ = pair
    draft = tiny_model("llama", vocab_size=96, seed=2, num_hidden_layers=1)  # cheaper than the target
    prompt = torch.tensor([[1, 40, 41]])
    first = target.generate(prompt, do_sample=False, max_new_tokens=20, return_dict_in_generate=True, **speculative(draft, "auto"))
    assert first.sequences.shape[1] == 23 and not first.speculative_stats.config.startswith("ar")
    recorded = pair_statistics_path(target, draft).read_text().splitlines()
    assert len(recorded) == 1 and '"temperature": 0.0' in recorded[0]
    second = target.generate(prompt, do_sample=False, max_new_tokens=20, return_dict_in_generate=True, **speculative(draft, "auto"))
    assert torch.equal(second.sequences, first.sequences)


@pytest.mark.parametrize("packing_pays", [False, True])
@pytest.mark.parametrize("do_sample", [False, True])
def test_auto_runs_plain_generate_when_no_tree_pays(pair, monkeypatch, do_sample, packing_pays):
    """When the planner predicts no tree beats plain decoding, `auto` runs transformers' own loop (on prepacked
    weights where they measured faster for one token, as the planner's baseline assumes): the same tokens as plain
    generate, sampled ones included (same seed), and none of the speculative loop."""
    import hf_specdec.planner
    import hf_specdec.strategy
    from hf_specdec.backends import cpu_kernels
    from hf_specdec.config import SpeculativeConfig

    target, draft = pair
    monkeypatch.setattr(hf_specdec.planner, "choose_config", lambda *args, **kwargs: SpeculativeConfig.ar())
    monkeypatch.setattr(hf_specdec.strategy, "make_decoder", None)  # the speculative loop must not be built
    monkeypatch.setattr(hf_specdec.strategy, "prepacking_pays", lambda model, tokens: packing_pays and tokens == 1)
    packed = []
    kept_packed_weight = cpu_kernels.kept_packed_weight
    monkeypatch.setattr(cpu_kernels, "kept_packed_weight", lambda module: packed.append(module) or kept_packed_weight(module))
    prompt = torch.tensor([[1, 40, 41]])
    torch.manual_seed(3)
    reference = target.generate(prompt, do_sample=do_sample, max_new_tokens=20, pad_token_id=0)
    torch.manual_seed(3)
    recorder = Recorder()
    out = target.generate(prompt, do_sample=do_sample, max_new_tokens=20, return_dict_in_generate=True,
                          speculative_streamer=recorder, **speculative(draft, "auto"))
    assert torch.equal(out.sequences, reference)
    assert out.speculative_stats.config.startswith("ar (plain generate")
    assert bool(packed) == (packing_pays and prepacking_available(target))
    # the streamer sees the prompt first, then each token, as with plain generate(streamer=...)
    assert recorder.chunks[0] == prompt[0].tolist() and recorder.ended
    assert sum(recorder.chunks[1:], []) == reference[0, 3:].tolist()

"""End to end: sampled output of every speculative method follows the target's exact distribution, on every backend.

A tiny Llama (vocab 12) makes the joint distribution of the first 3 generated tokens enumerable (12^3 sequences).
Drafts: a standalone model close to the target, an unrelated one, and a feature-conditioned draft close to its target
(a one-layer Llama it nearly reproduces).
One generate() call with thousands of identical prompts draws that many independent samples; a chi-square test on
cells with expected count >= 5 (the rest pooled) must not reject at level 1e-4 (seeds are fixed, so the test is
deterministic). The sampler is pluggable: PyTorch through generate(), and the exported pair on ONNX Runtime through
`hf_specdec.generation.decode`. The negative controls check that the test does reject a verifier that is off:
grossly off with the sweep's sample size, subtly off with the larger one of a few cases.
"""

from __future__ import annotations

import pytest
import torch
from feature_fixtures import exact_feature_pair
from onnx_fixtures import export_once
from statistics_helpers import chi_square_pvalue
from tiny_models import perturbed_copy, tiny_model, word_tokenizer
from transformers import GenerationConfig

import hf_specdec.generation as generation
import hf_specdec.verification as verification
from hf_specdec import speculative_generate
from hf_specdec.export.onnx_export import export_pair
from hf_specdec.export.ort_backend import load_onnxruntime_pair
from hf_specdec.generation import decode

VOCAB = 12
NEW_TOKENS = 3
SAMPLES = 4000
LEVEL = 1e-4
PROMPT = [1, 5, 7, 3]


@pytest.fixture(scope="module")
def pairs():
    """draft name -> (target, draft)."""
    target = tiny_model("llama", vocab_size=VOCAB, seed=0, scale=0.6)  # peaky distributions
    target.generation_config.eos_token_id = None  # every row generates exactly 3 tokens
    # q = 0 on three tokens (a reduced vocabulary: drafting runs on the kept tokens only)
    feature_target, exact_draft = exact_feature_pair(VOCAB, kept_token_ids=[0, 1, 2, 3, 5, 6, 8, 9, 11])
    return {
        # close to the target: long accepted paths (block efficiency ~2 at depth 3) and still many rejections
        "near": (target, perturbed_copy(target, noise=0.1)),
        # unrelated: mostly rejections, and under top-k, q = 0 where p > 0 and the other way round
        "far": (target, tiny_model("llama", vocab_size=VOCAB, seed=1, scale=0.6)),
        # a feature draft that nearly reproduces its one-layer target on its 9 tokens: long paths, some rejections
        "feature": (feature_target, perturbed_copy(exact_draft, noise=0.15)),
    }


def exact_joint(target, temperature: float, top_k: int | None) -> torch.Tensor:
    """p(x1, x2, x3 | prompt) after temperature and top-k, enumerated: [V, V, V]."""
    prompt = torch.tensor(PROMPT)

    def next_probs(continuations: torch.Tensor) -> torch.Tensor:
        prefixes = torch.cat([prompt.expand(len(continuations), -1), continuations], 1)
        with torch.no_grad():
            logits = target(prefixes).logits[:, -1].double() / temperature
        if top_k is not None:
            kth = logits.topk(top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return logits.softmax(-1)

    tokens = torch.arange(VOCAB)
    first = next_probs(torch.zeros(1, 0, dtype=torch.long))[0]  # [V]
    second = next_probs(tokens[:, None])  # [V, V]
    third = next_probs(torch.cartesian_prod(tokens, tokens)).view(VOCAB, VOCAB, VOCAB)
    return first[:, None, None] * second[:, :, None] * third


def pytorch_sampler(pairs):
    """sample(draft name, config, temperature, top-k) -> the generated tokens [SAMPLES, NEW_TOKENS], via generate()."""

    def sample(draft, config, temperature, top_k, samples=SAMPLES):
        target, draft_model = pairs[draft]
        out = target.generate(
            torch.tensor(PROMPT).expand(samples, -1),
            custom_generate=speculative_generate,
            draft_model=draft_model,
            speculative_config=config,
            do_sample=True,
            temperature=temperature,
            top_k=top_k if top_k is not None else 0,
            max_new_tokens=NEW_TOKENS,
            pad_token_id=0,
        )
        return out[:, len(PROMPT):]

    return sample


def onnxruntime_sampler(exported):
    """The same on ONNX Runtime: `exported` maps a draft name to the exported (target, that draft) pair (for the
    feature draft, a target graph that returns its features and a draft graph that reads them)."""

    def sample(draft, config, temperature, top_k, samples=SAMPLES):
        pair = exported[draft]
        generation_config = GenerationConfig(do_sample=True, temperature=temperature, top_k=top_k or 0,
                                             max_new_tokens=NEW_TOKENS, pad_token_id=0)
        result = decode(pair.target, pair.draft, torch.tensor(PROMPT).expand(samples, -1), generation_config, config)
        return result.sequences[:, len(PROMPT):]

    return sample


@pytest.fixture(scope="module")
def pytorch_sample(pairs):
    return pytorch_sampler(pairs)


@pytest.fixture(scope="module")
def onnxruntime_sample(pairs, tmp_path_factory):
    exported = {}
    for name, (target, draft) in pairs.items():
        def export(out, draft=draft, name=name):
            export_pair(target, draft, word_tokenizer(VOCAB), out, {"target": "target", "draft": name}, max_batch=SAMPLES)

        exported[name] = load_onnxruntime_pair(export_once(tmp_path_factory, f"exactness-{name}", export))
    return onnxruntime_sampler(exported)


def sample_joint(sample, draft: str, config: str, temperature: float, top_k: int | None,
                 samples: int = SAMPLES) -> torch.Tensor:
    """Counts of each of the V^3 possible continuations over `samples` seeded draws."""
    torch.manual_seed(1234)
    new = sample(draft, config, temperature, top_k, samples)
    index = (new[:, 0] * VOCAB + new[:, 1]) * VOCAB + new[:, 2]
    return torch.bincount(index, minlength=VOCAB**NEW_TOKENS).double()


# the last shape of each method is a dynamic tree (q=: nodes grow children only while the draft reaches them with
# at least that probability)
SHAPES = {
    "sd": ["sd:l=1", "sd:l=3", "sd:l=3,q=0.3"],
    "spectr": ["spectr:k=2,l=2", "spectr:k=4,l=3", "spectr:k=4,l=3,q=0.3"],
    "rsd-c": ["rsd-c:b=2-2", "rsd-c:b=3-2-1", "rsd-c:b=3-2-1,q=0.2"],
    "rsd-s": ["rsd-s:w=2,d=2", "rsd-s:w=4,d=3", "rsd-s:w=4,d=3,q=0.2"],
}
# (temperature, top-k, draft)
SETTINGS = {
    "t1-far-draft": (1.0, None, "far"),
    "t1-near-draft": (1.0, None, "near"),
    "t0.7-top5-far-draft": (0.7, 5, "far"),
    "t1-feature-draft": (1.0, None, "feature"),
    "t0.7-top5-feature-draft": (0.7, 5, "feature"),
}


# PyTorch: every shape. ONNX Runtime runs the same loop and verifiers on another backend: the deepest static shape of
# each method (the most cache rearranging per step) is enough to check the backend, with every setting, the feature
# draft's included (its exported pair: the target graph returns its features, the draft graph reads them).
CASES = [("pytorch", c) for shapes in SHAPES.values() for c in shapes] + [("onnxruntime", shapes[1]) for shapes in SHAPES.values()]


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("backend,config", CASES)
def test_sampling_matches_target_distribution(request, pairs, backend, config, setting):
    temperature, top_k, draft = SETTINGS[setting]
    target, _ = pairs[draft]
    exact = exact_joint(target, temperature, top_k)
    counts = sample_joint(request.getfixturevalue(f"{backend}_sample"), draft, config, temperature, top_k)
    assert counts.sum() == SAMPLES
    pvalue = chi_square_pvalue(counts, exact)
    assert pvalue > LEVEL, f"{config} at {setting}: chi-square p-value {pvalue:.2e}"


# The sweep above draws SAMPLES a case: enough for what breaks a whole step (caches, positions, masks), which moves the
# joint far. A verifier that is subtly off moves it little, most where drafts are often rejected; these cases draw
# POWER_SAMPLES, where the negative controls below must reject such a verifier (a near draft with rsd-s:w=4,d=3 is
# rejected too rarely for it: it would need ~4x more).
POWER_SAMPLES = 16000
POWER_CASES = {
    "near-rsd-c": ("near", "rsd-c:b=3-2-1"),
    "feature-rsd-c": ("feature", "rsd-c:b=3-2-1"),
    "feature-rsd-s": ("feature", "rsd-s:w=4,d=3"),
    "far-rsd-s": ("far", "rsd-s:w=2,d=2"),
}


@pytest.mark.parametrize("case", POWER_CASES)
def test_sampling_matches_target_distribution_with_more_samples(pairs, pytorch_sample, case):
    draft, config = POWER_CASES[case]
    counts = sample_joint(pytorch_sample, draft, config, 1.0, None, POWER_SAMPLES)
    pvalue = chi_square_pvalue(counts, exact_joint(pairs[draft][0], 1.0, None))
    assert pvalue > LEVEL, f"{config} with the {draft} draft: chi-square p-value {pvalue:.2e}"


def accept_everything(p, q, tokens):
    decision = verification.recursive_rejection(p, q, tokens)
    decision.accept_probs = torch.ones_like(decision.accept_probs)
    return decision


def keep_rejected_tokens_in_q(p, q, tokens):
    """Recursive rejection that forgets to remove rejected tokens from q (right for draws with replacement only)."""
    theta, qk = p.double(), q.double()
    accept = torch.zeros(len(tokens), dtype=torch.float64)
    for k, token in enumerate(tokens.tolist()):
        accept[k] = (theta[token] / qk[token]).clamp(max=1.0)
        theta = (theta - qk).clamp(min=0.0)
        theta = theta / theta.sum()
    return verification.NodeDecision(accept, theta)


def spectr_without_rho(p, q, tokens):
    """K-SEQ with rho left at 1 (its solve forgotten): K draws accept more than p allows, the residual is clipped."""
    p64, q64 = p.double(), q.double()
    accept = torch.where(q64[tokens] > 0, p64[tokens] / q64[tokens].clamp(min=1e-300), 0.0).clamp(max=1.0)
    beta = float(torch.minimum(q64, p64).sum())  # > 0: these tiny models give every token some probability
    accepted_mass = torch.minimum(q64, p64) * ((1.0 - (1.0 - beta) ** len(tokens)) / beta)
    return verification.NodeDecision(accept, verification._normalize((p64 - accepted_mass).clamp(min=0.0), p64))


def verifier_replaced(monkeypatch, rule: str, biased_rule) -> None:
    monkeypatch.setitem(verification.NODE_RULES, rule, biased_rule)
    # the reference walks NODE_RULES (the default verifier, the batched path, is checked against it elsewhere)
    monkeypatch.setattr(generation, "default_verifier", lambda device: verification.verify_tree)


@pytest.mark.parametrize("rule,biased_rule,draft,config", [
    ("rrs", accept_everything, "far", "rsd-c:b=2-2"),
    ("rrs", keep_rejected_tokens_in_q, "far", "rsd-c:b=2-2"),
    ("spectr", spectr_without_rho, "near", "spectr:k=2,l=2"),
    ("spectr", spectr_without_rho, "feature", "spectr:k=4,l=3"),
])
def test_negative_control_detects_a_biased_verifier(pairs, pytorch_sample, monkeypatch, rule, biased_rule, draft,
                                                    config):
    """The sweep's test rejects a verifier that is off: grossly (accepting every draft token, so the output follows
    q; SpecTr without its rho) or subtly (treating draws without replacement as draws with replacement)."""
    verifier_replaced(monkeypatch, rule, biased_rule)
    counts = sample_joint(pytorch_sample, draft, config, 1.0, None)
    assert chi_square_pvalue(counts, exact_joint(pairs[draft][0], 1.0, None)) < LEVEL


@pytest.mark.parametrize("case", POWER_CASES)
def test_negative_control_with_more_samples_detects_a_subtly_biased_verifier(pairs, pytorch_sample, monkeypatch, case):
    draft, config = POWER_CASES[case]
    verifier_replaced(monkeypatch, "rrs", keep_rejected_tokens_in_q)
    counts = sample_joint(pytorch_sample, draft, config, 1.0, None, POWER_SAMPLES)
    assert chi_square_pvalue(counts, exact_joint(pairs[draft][0], 1.0, None)) < LEVEL

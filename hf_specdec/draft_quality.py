"""How well a draft matches its target, and what it costs: the two numbers that decide speculative speed-up.

Measured on held-out continuations: the target continues held-out ShareGPT prompts (sampled at temperature 1, and
greedily), generated once and stored (`hf_specdec.teacher.target_continuations`: tokens and the target's LM-head
input at every generated position, so p is exact).
- alpha = E[sum_x min(p(x), q(x))], the probability that one drafted token is accepted by speculative sampling
  (Leviathan et al. 2023), with p and q over the full vocabulary (q = 0 outside a reduced-vocabulary draft).
- greedy agreement: argmax p == argmax q on the target's own greedy continuations.
- for a feature draft both by tree depth: depth 1 reads the target's features; depth d >= 2 its own predicted
  features of the d - 1 tokens before (as deeper tree levels do, the path's tokens being the target's), so alpha at
  depth d is the acceptance of a chain's d-th token given the ones before were accepted.
- chain block efficiency for a chain of L draft tokens with per-depth acceptance a_1, a_2, ...: 1 + a_1 + a_1 a_2 +
  ... (deeper depths than measured repeat the deepest).
- cost: best-of-N wall time of one forward pass of n new tokens after `past_len` cached tokens, draft over target.
- the draft's logit scale (`fit_logit_scale`): q = softmax(s * logits) for the s with the most alpha, fitted on
  held-out prompts other than the ones measured.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import DynamicCache

from hf_specdec.compat import cache_argument
from hf_specdec.data import heldout_prompts
from hf_specdec.distill import feature_unrolled
from hf_specdec.feature_draft import reads_target_features, timing_inputs
from hf_specdec.teacher import Continuation, lm_head_inputs, target_continuations

CHAIN_LENGTHS = (1, 2, 3, 4, 5, 6, 8)
LOGIT_SCALES = tuple(round(0.8 + 0.05 * i, 2) for i in range(15))  # 0.8 .. 1.5
COST_TOKENS = (1, 8, 32)
FEATURE_DEPTHS = 4  # tree depths a feature draft is measured at


# ------------------------------------------------------------------------------------------------ acceptance
@torch.no_grad()
def draft_hidden(draft, target, sample: Continuation) -> list[torch.Tensor]:
    """The draft's LM-head input at the sample's generated positions [generated, H], one tensor per depth (a
    standalone draft: one)."""
    tokens = sample.token_ids[None].long()
    positions = torch.arange(sample.prompt_len - 1, len(sample.token_ids) - 1)
    if not reads_target_features(draft):
        return [draft.model(tokens).last_hidden_state[0, positions]]
    features = lm_head_inputs(target, sample.token_ids)[None].to(draft.dtype)
    return [h[0, positions] for h in feature_unrolled(draft, tokens, features, FEATURE_DEPTHS)]


@torch.no_grad()
def draft_log_probs(draft, target, sample: Continuation) -> list[torch.Tensor]:
    """log q at the sample's generated positions [generated, V], one tensor per depth (a standalone draft: one)."""
    return [torch.log_softmax(draft.lm_head(h).float(), dim=-1) for h in draft_hidden(draft, target, sample)]


@torch.no_grad()
def acceptance(draft, target, samples: list[Continuation]) -> dict:
    """alpha, top-1 agreement and the share of p inside the draft's support, averaged over all generated positions;
    for a feature draft per depth (`*_by_depth`), depth d counted at positions with d - 1 generated tokens before."""
    head = target.get_output_embeddings()
    alphas, agreements, support_mass = {}, {}, []
    for sample in samples:
        p = torch.softmax(head(sample.hidden.to(head.weight.dtype)).float(), dim=-1)
        for depth, log_q in enumerate(draft_log_probs(draft, target, sample)):
            q = log_q.exp()
            alphas.setdefault(depth, []).append(torch.minimum(p, q).sum(dim=-1)[depth:])
            agreements.setdefault(depth, []).append((p.argmax(dim=-1) == q.argmax(dim=-1)).float()[depth:])
            if depth == 0:
                support_mass.append((p * (q > 0)).sum(dim=-1))
    alpha = [torch.cat(a).mean().item() for a in alphas.values()]
    agreement = [torch.cat(a).mean().item() for a in agreements.values()]
    return {
        "alpha": alpha[0],
        "top1_agreement": agreement[0],
        "alpha_by_depth": alpha,
        "top1_agreement_by_depth": agreement,
        "draft_support_mass": torch.cat(support_mass).mean().item(),
        "positions": sum(len(a) for a in alphas[0]),
    }


def overlap_by_scale(p: torch.Tensor, logits: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """sum_x min(p(x), q_s(x)) with q_s = softmax(s * logits), for each scale s [S] at each position: [S, n].
    p [n, K] and logits [n, K] over the same K tokens (a reduced-vocabulary draft's: q is 0 elsewhere)."""
    q = torch.softmax(scales[:, None, None] * logits[None].float(), dim=-1)
    return torch.minimum(p[None], q).sum(-1)


@torch.no_grad()
def fit_logit_scale(draft, target, samples: list[Continuation], scales=LOGIT_SCALES) -> dict:
    """The scale of the draft's logits with the most alpha over `samples`, every depth a draft tree uses counted
    (a feature draft's `FEATURE_DEPTHS`). Returns `logit_scale` and `alpha_by_scale`."""
    head = target.get_output_embeddings()
    kept = draft.lm_head.kept_token_ids
    scale_values = torch.tensor(scales)
    total, count = torch.zeros(len(scales), dtype=torch.float64), 0
    for sample in samples:
        p = torch.softmax(head(sample.hidden.to(head.weight.dtype)).float(), dim=-1)[:, kept]
        for depth, hidden in enumerate(draft_hidden(draft, target, sample)):
            logits = draft.lm_head.kept_logits(hidden)[depth:]
            total += overlap_by_scale(p[depth:], logits, scale_values).sum(-1).double()
            count += logits.shape[0]
    alpha = (total / max(count, 1)).tolist()
    best = max(range(len(scales)), key=alpha.__getitem__)
    return {"logit_scale": scales[best], "alpha_by_scale": {f"{s:g}": a for s, a in zip(scales, alpha)}}


def chain_block_efficiency(acceptance_rate: "float | list[float]", length: int) -> float:
    """Expected tokens per target pass for a chain of `length` draft tokens whose d-th token is accepted w.p.
    `acceptance_rate[d - 1]` given the ones before (one rate: the same at every depth; depths beyond the list repeat
    its last rate)."""
    rates = [acceptance_rate] if isinstance(acceptance_rate, (int, float)) else list(acceptance_rate)
    expected, reach = 1.0, 1.0
    for depth in range(length):
        reach *= rates[min(depth, len(rates) - 1)]
        expected += reach
    return expected


# ------------------------------------------------------------------------------------------------ cost
@torch.no_grad()
def forward_ms(model, new_tokens: int, past_len: int = 256, repeats: int = 20) -> float:
    """Best-of-`repeats` milliseconds for one forward pass of `new_tokens` tokens after `past_len` cached ones."""
    vocab_size = model.config.get_text_config().vocab_size
    cache = DynamicCache(config=model.config)
    past = torch.randint(vocab_size, (1, past_len))
    model(past, use_cache=True, **cache_argument(model, cache), **timing_inputs(model, past))
    tokens = torch.randint(vocab_size, (1, new_tokens))
    position_ids = torch.arange(past_len, past_len + new_tokens)[None]
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        model(tokens, position_ids=position_ids, use_cache=True, **cache_argument(model, cache),
              **timing_inputs(model, tokens))
        best = min(best, time.perf_counter() - start)
        cache.crop(-new_tokens)
    return best * 1000


def relative_cost(draft, target, token_counts=COST_TOKENS, past_len: int = 256) -> dict:
    """Draft / target forward time at each token count, with both times in milliseconds."""
    costs = {}
    for n in token_counts:
        draft_ms, target_ms = forward_ms(draft, n, past_len), forward_ms(target, n, past_len)
        costs[str(n)] = {"draft_ms": draft_ms, "target_ms": target_ms, "ratio": draft_ms / target_ms}
    return costs


def evaluate_draft(target, draft, tokenizer, data_dir: Path, prompts: int, max_new_tokens: int, seed: int,
                   batch_size: int = 16) -> dict:
    """Acceptance on held-out prompts (continuations generated once into `data_dir`) and relative cost."""
    prompt_texts = heldout_prompts(prompts, tokenizer)
    sampled, greedy = (
        acceptance(draft, target, target_continuations(target, tokenizer, prompt_texts, data_dir / kind, batch_size,
                                                        max_new_tokens, seed, greedy=kind == "greedy"))
        for kind in ("sampled", "greedy")
    )
    return {
        "draft_type": "feature" if reads_target_features(draft) else "standalone",
        "heldout_prompts": prompts,
        "max_new_tokens": max_new_tokens,
        "alpha": sampled["alpha"],
        "alpha_by_depth": sampled["alpha_by_depth"],
        "draft_support_mass": sampled["draft_support_mass"],
        "top1_agreement_sampled": sampled["top1_agreement"],
        "greedy_agreement": greedy["top1_agreement"],
        "greedy_agreement_by_depth": greedy["top1_agreement_by_depth"],
        "positions": {"sampled": sampled["positions"], "greedy": greedy["positions"]},
        "chain_block_efficiency": {str(L): chain_block_efficiency(sampled["alpha_by_depth"], L) for L in CHAIN_LENGTHS},
        "greedy_chain_block_efficiency": {
            str(L): chain_block_efficiency(greedy["top1_agreement_by_depth"], L) for L in CHAIN_LENGTHS
        },
        "relative_cost": relative_cost(draft, target),
    }

"""How well a draft matches its target, and what it costs: the two numbers that decide speculative speed-up.

- alpha = E[sum_x min(p(x), q(x))], the probability that one drafted token is accepted by speculative
  sampling (Leviathan et al. 2023), averaged over the positions of target-generated held-out continuations
  at temperature 1, with p and q over the full vocabulary (q = 0 outside a reduced-vocabulary draft).
- greedy agreement: argmax p == argmax q on the target's own greedy continuations.
- chain block efficiency for a chain of L draft tokens with i.i.d. acceptance a: (1 - a^(L+1)) / (1 - a).
- cost: best-of-N wall time of one forward pass of n new tokens after `past_len` cached tokens, draft over
  target (best-of-N because other processes may share the cores).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import DynamicCache

from hf_specdec.data import heldout_prompts
from hf_specdec.distill import TeacherSample, generate_teacher_data

CHAIN_LENGTHS = (1, 2, 3, 4, 5, 6, 8)
COST_TOKENS = (1, 8, 32)


@torch.no_grad()
def acceptance(draft, target_head: torch.nn.Linear, samples: list[TeacherSample]) -> dict:
    """alpha, top-1 agreement and the share of p inside the draft's support, averaged over all positions."""
    alphas, agreements, support_mass = [], [], []
    for sample in samples:
        p = torch.softmax(target_head(sample.hidden).float(), dim=-1)
        positions = torch.arange(sample.prompt_len - 1, len(sample.token_ids) - 1)
        logits = draft(sample.token_ids[None].long()).logits[0, positions].float()
        q = torch.softmax(logits, dim=-1)
        alphas.append(torch.minimum(p, q).sum(dim=-1))
        agreements.append((p.argmax(dim=-1) == q.argmax(dim=-1)).float())
        support_mass.append((p * (q > 0)).sum(dim=-1))
    return {
        "alpha": torch.cat(alphas).mean().item(),
        "top1_agreement": torch.cat(agreements).mean().item(),
        "draft_support_mass": torch.cat(support_mass).mean().item(),
        "positions": sum(len(a) for a in alphas),
    }


def chain_block_efficiency(acceptance_rate: float, length: int) -> float:
    """Expected tokens per target pass for a chain of `length` draft tokens, each accepted w.p. `acceptance_rate`."""
    if acceptance_rate >= 1.0:
        return float(length + 1)
    return (1 - acceptance_rate ** (length + 1)) / (1 - acceptance_rate)


@torch.no_grad()
def forward_ms(model, new_tokens: int, past_len: int = 256, repeats: int = 20) -> float:
    """Best-of-`repeats` milliseconds for one forward pass of `new_tokens` tokens after `past_len` cached ones."""
    vocab_size = model.config.vocab_size
    cache = DynamicCache(config=model.config)
    model(torch.randint(vocab_size, (1, past_len)), past_key_values=cache, use_cache=True)
    tokens = torch.randint(vocab_size, (1, new_tokens))
    position_ids = torch.arange(past_len, past_len + new_tokens)[None]
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        model(tokens, position_ids=position_ids, past_key_values=cache, use_cache=True)
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


def evaluate_draft(
    target, draft, tokenizer, data_dir: Path, prompts: int, max_new_tokens: int, seed: int, batch_size: int = 16
) -> dict:
    """Acceptance on held-out prompts (continuations generated once into `data_dir`) and relative cost."""
    prompt_texts = heldout_prompts(prompts, tokenizer)
    target_head = target.get_output_embeddings()
    continuations = {
        "sampled": generate_teacher_data(
            target, tokenizer, prompt_texts, data_dir / "sampled", batch_size, max_new_tokens, seed
        ),
        "greedy": generate_teacher_data(
            target, tokenizer, prompt_texts, data_dir / "greedy", batch_size, max_new_tokens, seed, greedy=True
        ),
    }
    sampled, greedy = (acceptance(draft, target_head, samples) for samples in continuations.values())
    alpha = sampled["alpha"]
    return {
        "heldout_prompts": prompts,
        "max_new_tokens": max_new_tokens,
        "alpha": alpha,
        "draft_support_mass": sampled["draft_support_mass"],
        "top1_agreement_sampled": sampled["top1_agreement"],
        "greedy_agreement": greedy["top1_agreement"],
        "positions": {"sampled": sampled["positions"], "greedy": greedy["positions"]},
        "chain_block_efficiency": {str(L): chain_block_efficiency(alpha, L) for L in CHAIN_LENGTHS},
        "greedy_chain_block_efficiency": {
            str(L): chain_block_efficiency(greedy["top1_agreement"], L) for L in CHAIN_LENGTHS
        },
        "relative_cost": relative_cost(draft, target),
    }

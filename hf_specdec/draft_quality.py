"""How well a draft matches its target, and what it costs: the two numbers that decide speculative speed-up.

Measured on held-out continuations: the target continues held-out ShareGPT prompts (sampled at temperature 1, and
greedily), generated once and stored (`HeldoutSample`: tokens and the target's LM-head input at every generated
position, so p is exact).
- alpha = E[sum_x min(p(x), q(x))], the probability that one drafted token is accepted by speculative sampling
  (Leviathan et al. 2023), with p and q over the full vocabulary (q = 0 outside a reduced-vocabulary draft).
- greedy agreement: argmax p == argmax q on the target's own greedy continuations.
- for a feature draft both by tree depth: depth 1 reads the target's features; depth d >= 2 its own predicted
  features of the d - 1 tokens before (as deeper tree levels do, the path's tokens being the target's), so alpha at
  depth d is the acceptance of a chain's d-th token given the ones before were accepted.
- chain block efficiency for a chain of L draft tokens with per-depth acceptance a_1, a_2, ...: 1 + a_1 + a_1 a_2 +
  ... (deeper depths than measured repeat the deepest).
- cost: best-of-N wall time of one forward pass of n new tokens after `past_len` cached tokens, draft over target.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from hf_specdec.data import heldout_prompts
from hf_specdec.distill import feature_unrolled
from hf_specdec.feature_draft import reads_target_features, timing_inputs
from hf_specdec.teacher import lm_head_inputs

CHAIN_LENGTHS = (1, 2, 3, 4, 5, 6, 8)
COST_TOKENS = (1, 8, 32)
FEATURE_DEPTHS = 4  # tree depths a feature draft is measured at


# ------------------------------------------------------------------------------------------------ held-out data
@dataclass
class HeldoutSample:
    """One target continuation: `token_ids` = prompt + generated tokens (EOS included when reached).

    Row t of `hidden` is the target's LM-head input for generated token t (position `prompt_len + t` given
    `token_ids[: prompt_len + t]`): p = softmax(lm_head(hidden[t])).
    """

    token_ids: torch.Tensor  # int32 [prompt_len + generated]
    prompt_len: int
    hidden: torch.Tensor  # float32 [generated, hidden_size]

    @property
    def generated_len(self) -> int:
        return len(self.token_ids) - self.prompt_len


@torch.no_grad()
def generate_continuations(target, tokenizer, prompts: list[str], max_new_tokens: int, greedy: bool) -> list[HeldoutSample]:
    """Continue `prompts` with `target` (plain temperature-1 sampling, or greedy), recording the LM-head input at every
    generated position."""
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    recorded = []
    hook = target.get_output_embeddings().register_forward_hook(
        lambda module, inputs, output: recorded.append(inputs[0][:, -1].float()))
    try:
        # no top-k / top-p warper, so the sampled p is exactly the head's softmax
        sampling = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
        sequences = target.generate(**batch, **sampling, max_new_tokens=max_new_tokens,
                                    pad_token_id=tokenizer.pad_token_id)
    finally:
        hook.remove()
    padded_prompt_len = batch.input_ids.shape[1]
    hidden = torch.stack(recorded, dim=1)  # one head call per generated token
    eos = target.generation_config.eos_token_id
    stop_ids = torch.tensor([eos] if isinstance(eos, int) else list(eos or []))
    samples = []
    for row, prompt_mask in enumerate(batch.attention_mask.bool()):
        prompt = sequences[row, :padded_prompt_len][prompt_mask]
        generated = sequences[row, padded_prompt_len:]
        stops = torch.isin(generated, stop_ids).nonzero()
        length = int(stops[0]) + 1 if len(stops) else len(generated)
        samples.append(HeldoutSample(torch.cat([prompt, generated[:length]]).to(torch.int32), len(prompt),
                                     hidden[row, :length].clone()))
    return samples


def heldout_continuations(target, tokenizer, prompts: list[str], out_dir: Path, batch_size: int, max_new_tokens: int,
                          seed: int, greedy: bool) -> list[HeldoutSample]:
    """`generate_continuations` for all `prompts`, one file per batch in `out_dir`; batches already there are
    reused (a resumed run samples exactly what the first run would have)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ordered = sorted(prompts, key=len)  # similar lengths share a batch: less left padding
    samples = []
    batches = [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
    for index, batch in enumerate(tqdm(batches, desc="held-out continuations", unit="batch")):
        path = out_dir / f"batch-{index:05d}.pt"
        recipe = {"prompts": batch, "max_new_tokens": max_new_tokens, "greedy": greedy, "seed": seed + index}
        if path.exists():
            saved = torch.load(path)
            if saved["recipe"] != recipe:
                raise ValueError(f"{path} was generated with other prompts or settings: use another output directory")
            samples.extend(HeldoutSample(**fields) for fields in saved["samples"])
            continue
        torch.manual_seed(recipe["seed"])
        generated = generate_continuations(target, tokenizer, batch, max_new_tokens, greedy)
        staging = path.with_suffix(".tmp")
        torch.save({"recipe": recipe, "samples": [vars(sample) for sample in generated]}, staging)
        staging.replace(path)  # a killed run never leaves half a batch behind
        samples.extend(generated)
    return samples


# ------------------------------------------------------------------------------------------------ acceptance
@torch.no_grad()
def draft_log_probs(draft, target, sample: HeldoutSample) -> list[torch.Tensor]:
    """log q at the sample's generated positions [generated, V], one tensor per depth (a standalone draft: one)."""
    tokens = sample.token_ids[None].long()
    positions = torch.arange(sample.prompt_len - 1, len(sample.token_ids) - 1)
    if not reads_target_features(draft):
        return [torch.log_softmax(draft(tokens).logits[0, positions].float(), dim=-1)]
    features = lm_head_inputs(target, sample.token_ids)[None].to(draft.dtype)
    hidden = feature_unrolled(draft, tokens, features, FEATURE_DEPTHS)
    return [torch.log_softmax(draft.lm_head(h[0, positions]).float(), dim=-1) for h in hidden]


@torch.no_grad()
def acceptance(draft, target, samples: list[HeldoutSample]) -> dict:
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
    model(past, past_key_values=cache, use_cache=True, **timing_inputs(model, past))
    tokens = torch.randint(vocab_size, (1, new_tokens))
    position_ids = torch.arange(past_len, past_len + new_tokens)[None]
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        model(tokens, position_ids=position_ids, past_key_values=cache, use_cache=True, **timing_inputs(model, tokens))
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
        acceptance(draft, target, heldout_continuations(target, tokenizer, prompt_texts, data_dir / kind, batch_size,
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

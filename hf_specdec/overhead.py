"""Step overhead: the time a decoding step spends outside the models' forwards, ours against HF `generate`'s.

With near-free models (1 layer, hidden 64) the forwards cost little and the loop around them shows: drafting
bookkeeping, logits processors, verification, commit, cache moves. Every forward of both models is timed (CUDA
synchronised around it) and subtracted from the call's wall time; what is left, per target step, is the overhead.
HF `generate` is measured the same way, per generated token (its step). `hf-specdec bench --overhead` runs this.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM

TREES = {4: "rsd-s:w=2,d=2", 16: "rsd-s:w=4,d=4", 32: "rsd-s:w=4,d=8"}
VOCABS = (49152, 128256)
BATCHES = (1, 4, 16)


def near_free_model(vocab_size: int, device: str = "cpu", seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                         pad_token_id=0, bos_token_id=1, eos_token_id=None)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).to(device).eval()


@contextlib.contextmanager
def timed_forwards(*models):
    """Sum of the wall time of every forward of `models` (a one-element list, updated in place)."""
    spent = [0.0]
    originals = []
    for model in models:
        original = model.forward
        cuda = model.device.type == "cuda"

        def forward(*args, _original=original, _cuda=cuda, **kwargs):
            if _cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = _original(*args, **kwargs)
            if _cuda:
                torch.cuda.synchronize()
            spent[0] += time.perf_counter() - start
            return out

        model.forward = forward
        originals.append(model)
    try:
        yield spent
    finally:
        for model in originals:
            del model.forward


@dataclass
class OverheadRecord:
    vocab_size: int
    batch: int
    tree_size: int  # 0 for HF generate
    config: str
    steps: int
    overhead_ms_per_step: float
    forward_ms_per_step: float


def _prompt(target, batch: int) -> torch.Tensor:
    return torch.randint(3, target.config.vocab_size, (batch, 16), device=target.device)


def _timed(run, models, steps_of, repeats: int) -> list[tuple[int, float, float]]:
    """`run()` once to warm up, then `repeats` times: per run (steps, seconds outside the forwards, seconds in them)."""
    run()
    device = models[0].device
    runs = []
    for _ in range(repeats):
        with timed_forwards(*models) as spent:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            total = time.perf_counter() - start
        runs.append((steps_of(out), total - spent[0], spent[0]))
    return runs


def loop_run(target, draft, config: str, batch: int, new_tokens: int, sampling: dict, repeats: int = 3):
    """Our loop (`generation.decode`, what `generate` runs, without recording planner statistics for the stand-ins)
    on `config`: per run (steps, seconds outside the forwards, seconds in them)."""
    from transformers import GenerationConfig

    from hf_specdec.backends.hf import HFBackend
    from hf_specdec.generation import decode

    prompt = _prompt(target, batch)
    generation_config = GenerationConfig(max_new_tokens=new_tokens, pad_token_id=0, **sampling)
    backends = HFBackend(target, "target"), HFBackend(draft, "draft")

    def run():
        return decode(*backends, prompt, generation_config, config)

    return _timed(run, (target, draft), lambda out: out.stats.target_calls, repeats)


def plain_run(target, batch: int, new_tokens: int, sampling: dict, repeats: int = 3):
    """HF `generate` (every step makes one token): per run (steps, seconds outside the forwards, seconds in them)."""
    prompt = _prompt(target, batch)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0, **sampling)
    return _timed(lambda: target.generate(prompt, **kwargs), (target,), lambda out: new_tokens, repeats)


def _least_per_step(runs) -> float:
    """The least seconds per step outside the forwards among `runs` (the noise of a shared machine only adds)."""
    return min(outside / steps for steps, outside, _ in runs)


def loop_overhead(target, draft, config: str, batch: int, new_tokens: int, sampling: dict, repeats: int = 1) -> float:
    """Seconds per step our loop spends outside the forwards: the least of `repeats` runs after one warm-up."""
    return _least_per_step(loop_run(target, draft, config, batch, new_tokens, sampling, repeats))


def plain_overhead(target, batch: int, new_tokens: int, sampling: dict, repeats: int = 1) -> float:
    """Seconds per token HF `generate` spends outside the forward: the least of `repeats` runs after one warm-up."""
    return _least_per_step(plain_run(target, batch, new_tokens, sampling, repeats))


def _measure(target, draft, config: str | None, batch: int, new_tokens: int, repeats: int) -> tuple[int, float, float]:
    sampling = {"do_sample": True}  # generate's default top-k 50 on both sides
    if config is None:
        runs = plain_run(target, batch, new_tokens, sampling, repeats)
    else:
        runs = loop_run(target, draft, config, batch, new_tokens, sampling, repeats)
    steps, outside, forwards = (sum(column) for column in zip(*runs))
    return steps, 1e3 * outside / steps, 1e3 * forwards / steps


def step_overhead(vocabs=VOCABS, batches=BATCHES, trees=tuple(TREES), new_tokens: int = 32, repeats: int = 3,
                  device: str = "cpu", progress=print) -> list[OverheadRecord]:
    records = []
    for vocab in vocabs:
        target, draft = near_free_model(vocab, device), near_free_model(vocab, device, seed=1)
        for batch in batches:
            for tree in (0, *trees):
                config = TREES[tree] if tree else None
                steps, overhead, forward = _measure(target, draft, config, batch, new_tokens, repeats)
                record = OverheadRecord(vocab, batch, tree, config or "hf-generate", steps, overhead, forward)
                records.append(record)
                progress(f"vocab {vocab:6d}  batch {batch:2d}  {record.config:15s} overhead {overhead:7.2f} ms/step "
                         f"(forwards {forward:6.2f} ms/step)")
    return records


def format_overhead(records: list[OverheadRecord]) -> str:
    lines = ["| vocab | batch | HF generate ms/token | tree 4 | tree 16 | tree 32 |", "|---|---|---|---|---|---|"]
    keys = sorted({(r.vocab_size, r.batch) for r in records})
    for vocab, batch in keys:
        row = {r.tree_size: r.overhead_ms_per_step for r in records if (r.vocab_size, r.batch) == (vocab, batch)}
        cells = [f"{row[t]:.2f}" if t in row else "" for t in (0, 4, 16, 32)]
        lines.append(f"| {vocab} | {batch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

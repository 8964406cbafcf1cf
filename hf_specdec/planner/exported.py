"""`auto` for an exported pair: the tree shape (or plain decoding) chosen at export, from forwards timed on the
exported graphs themselves on the machine that exports them.

The PyTorch planner calibrates the PyTorch models; an exported graph runs other kernels, whose cost by token count
that calibration does not know (ONNX Runtime's exact 4-bit products: a 7-token forward of the int4 SmolLM2 target
costs 2.5-2.8x a one-token one on a 2-core AMD EPYC). So the export times its own graphs on ONNX Runtime (the target at the token counts trees score, the draft at those
it drafts, after `CONTEXT` cached tokens, with the loop's thread setting), and `planning.rank` predicts each shape
from those times, the pair's acceptance (what runs of the PyTorch pair recorded on this machine, else the planner's
conservative default) and the loop's own cost per step (`loop_cost`, measured on the threads the loop gets beside
these backends). The manifest keeps the best shape as the config
`generate --config auto` runs, or `ar` where none is predicted to beat plain decoding of these graphs, with what it
was chosen from (`planned`): on another machine, export again or pass `--config`.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch

from hf_specdec.config import SpeculativeConfig

TIMED_TOKENS = (1, 2, 4, 8, 16, 32)  # new tokens per forward timed; others are interpolated
CONTEXT = 256  # cached tokens before each timed forward (a chat prompt and part of its reply)
REPEATS = 5


@dataclass(frozen=True)
class MeasuredForwards:
    """One backend's forward seconds by new tokens (batch 1, `CONTEXT` cached tokens): piecewise-linear between the
    timed counts, linear beyond the largest (a tree wider than the widest timed forward is not free), the smallest's
    below it. What `planning.estimate` reads from a latency model."""

    tokens: tuple[int, ...]
    times: tuple[float, ...]

    def seconds(self, batch: int, new_tokens: int, context: int) -> float:
        if new_tokens <= self.tokens[-1] or len(self.tokens) == 1:
            return float(np.interp(new_tokens, self.tokens, self.times))
        slope = (self.times[-1] - self.times[-2]) / (self.tokens[-1] - self.tokens[-2])
        return self.times[-1] + max(slope, 0.0) * (new_tokens - self.tokens[-1])

    def forward(self, batch: int, new_tokens: int, context: int) -> dict[str, float]:
        return {"measured": self.seconds(batch, new_tokens, context)}

    def to_json(self) -> dict:
        return {str(n): round(1e3 * s, 3) for n, s in zip(self.tokens, self.times)}


def time_forwards(backend, token_counts=TIMED_TOKENS, context: int = CONTEXT, repeats: int = REPEATS) -> MeasuredForwards:
    """The median of `repeats` forwards of `backend` (the `ModelBackend` protocol) at each token count, each on top of
    the same `context` cached tokens (dropped again after every run). A feature draft reads zero features."""
    total, device = context + max(token_counts), backend.device
    ids = torch.randint(backend.vocab_size, (1, total), generator=torch.Generator().manual_seed(0)).to(device)
    positions = torch.arange(total, device=device)[None]
    causal = torch.ones(total, total, dtype=torch.bool, device=device).tril()[None]
    features = torch.zeros(1, total, backend.hidden_size, device=device) if backend.reads_features else None

    def part(tensor, span):
        return None if tensor is None else tensor[:, span]

    backend.reset(1, torch.tensor([context], device=device))
    prompt = slice(0, context)
    backend.prefill(ids[:, prompt], positions[:, prompt], causal[:, prompt, :context], positions[:, prompt],
                    part(features, prompt))
    times = []
    for count in token_counts:
        new = slice(context, context + count)
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            backend.forward(ids[:, new], positions[:, new], causal[:, new, : context + count],
                            positions[:, : context + count], part(features, new))
            runs.append(time.perf_counter() - start)
            backend.keep(context, torch.empty(1, 0, dtype=torch.long, device=device))  # back to the context alone
        times.append(statistics.median(runs))
    return MeasuredForwards(tuple(token_counts), tuple(times))


def plan_exported(target_backend, draft_backend, target_model, draft_model, max_new_tokens: int, max_past: int
                  ) -> tuple[SpeculativeConfig, dict]:
    """The config `auto` runs on these exported backends (see the module docstring) within the export's bounds
    (tokens per forward, cache slots), and the record of how it was chosen, for the manifest."""
    from hf_specdec.loop import host_threads
    from hf_specdec.planner import dynamic
    from hf_specdec.planner.acceptance import pair_acceptance
    from hf_specdec.planner.loop_cost import Sampling, loop_cost
    from hf_specdec.planner.planning import rank
    from hf_specdec.planner.trees import default_candidates

    candidates = [c for c in default_candidates() if c.tree_size + 1 <= max_new_tokens]
    counts = tuple(n for n in TIMED_TOKENS if n <= max_new_tokens)
    context = min(CONTEXT, max_past - counts[-1])
    with host_threads((target_backend, draft_backend)):  # as the loop runs beside these backends
        target = time_forwards(target_backend, counts, context)
        draft = time_forwards(draft_backend, counts, context)
        loop = loop_cost(target_model, draft_model, 1, Sampling())  # cached per thread count too
    acceptance = pair_acceptance(target_model, draft_model)
    ranked = rank(target, 1, context, acceptance, draft, candidates, loop)
    best = ranked[0] if ranked else None
    config = dynamic(best) if best is not None and best.speedup > 1.0 else SpeculativeConfig.ar()
    record = {
        "config": str(config),
        "device": device_label(target_backend.device),
        "target_forward_ms": target.to_json(),
        "draft_forward_ms": draft.to_json(),
        "acceptance": acceptance.description,
        "best_tree": None if best is None else {"config": str(best.config), "predicted_speedup": round(best.speedup, 3),
                                                "block_efficiency": round(best.block_efficiency, 3)},
        "context": context,
        "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    return config, record


def device_label(device) -> str:
    """What the plan records as where it was measured: the GPU's or the CPU's model name."""
    from hf_specdec.planner.calibration import cpu_name

    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def planned_elsewhere(manifest, device) -> str | None:
    """A note where the export's config was planned on another device than `device` (None where it was not, or the
    config was given rather than planned)."""
    planned = manifest.export.get("planned")
    if planned is None or planned["device"] == device_label(device):
        return None
    return (f"the config this export runs for --config auto ({planned['config']}) was planned on {planned['device']}, "
            f"not on this {device_label(device)}: export again here (hf-specdec export ... --config auto), or pass "
            "--config")

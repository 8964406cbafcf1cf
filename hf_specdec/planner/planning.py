"""Speedup of a tree shape: block efficiency over the step latency normalised by plain decoding.

    speedup = block_efficiency / ((T_target(b, N + 1, s) + sum_passes T_draft(b, tokens_pass, s) + T_loop(shape, b))
                                  / (T_target(b, 1, s) + T_plain_loop(b)))

N is the tree size (the root is scored with it); the draft makes `depth` sequential passes (trees.draft_pass_tokens);
T_loop is the loop's own work per step and T_plain_loop HF generate's per token, both measured here (loop_cost.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from hf_specdec.config import SpeculativeConfig
from hf_specdec.planner.acceptance import AcceptanceModel
from hf_specdec.planner.latency import LatencyModel
from hf_specdec.planner.loop_cost import LoopCost
from hf_specdec.planner.trees import default_candidates, draft_pass_tokens


@dataclass(frozen=True)
class StepEstimate:
    batch: int
    candidates: int  # tokens the target scores per sequence per step (tree size + 1)
    config: SpeculativeConfig | None  # None: a candidate count without a tree shape (the Medusa fit)
    block_efficiency: float
    target_seconds: dict[str, float]  # per operator group
    draft_seconds: float
    baseline_seconds: float  # a token of plain decoding: the target's one-token forward (+ HF generate's own work)
    loop_seconds: float = 0.0  # the speculative loop's own work per step (loop_cost.py; 0 where not measured)

    @property
    def seconds(self) -> float:
        return sum(self.target_seconds.values()) + self.draft_seconds + self.loop_seconds

    @property
    def normalized_latency(self) -> float:
        return self.seconds / self.baseline_seconds

    @property
    def speedup(self) -> float:
        return self.block_efficiency / self.normalized_latency

    def normalized_by_group(self) -> dict[str, float]:
        groups = {g: s / self.baseline_seconds for g, s in self.target_seconds.items()}
        if self.draft_seconds:
            groups["draft"] = self.draft_seconds / self.baseline_seconds
        if self.loop_seconds:
            groups["loop"] = self.loop_seconds / self.baseline_seconds
        return groups

    def to_json(self) -> dict:
        return {
            "batch": self.batch,
            "candidates": self.candidates,
            "config": None if self.config is None else str(self.config),
            "acc_rate": self.block_efficiency,
            "normalized_latency": self.normalized_latency,
            "speedup": self.speedup,
            "latency_by_group": self.normalized_by_group(),
            "latency_ms": 1e3 * self.seconds,
            "baseline_ms": 1e3 * self.baseline_seconds,
        }


def estimate(target: LatencyModel, batch: int, context: int, candidates: int, block_efficiency: float,
             config: SpeculativeConfig | None = None, draft: LatencyModel | None = None,
             loop: LoopCost | None = None) -> StepEstimate:
    """The baseline is plain decoding as `auto` runs it: transformers' loop on the kernels the calibration timed."""
    draft_seconds = 0.0
    if draft is not None and config is not None:
        draft_seconds = sum(draft.seconds(batch, tokens, context) for tokens in draft_pass_tokens(config))
    return StepEstimate(
        batch=batch,
        candidates=candidates,
        config=config,
        block_efficiency=block_efficiency,
        target_seconds=target.forward(batch, candidates, context),
        draft_seconds=draft_seconds,
        baseline_seconds=target.seconds(batch, 1, context) + (loop.plain_seconds if loop else 0.0),
        loop_seconds=loop.seconds(config) if loop is not None and config is not None else 0.0,
    )


def estimate_config(target: LatencyModel, batch: int, context: int, config: SpeculativeConfig,
                    acceptance: AcceptanceModel, draft: LatencyModel | None = None,
                    loop: LoopCost | None = None) -> StepEstimate:
    return estimate(target, batch, context, config.tree_size + 1, acceptance.block_efficiency(config), config, draft,
                    loop)


def estimate_candidates(target: LatencyModel, batch: int, context: int, candidates: int,
                        acceptance: AcceptanceModel, draft: LatencyModel | None = None) -> StepEstimate:
    """A step scoring `candidates` tokens; the acceptance model says which tree that is (if any)."""
    block_efficiency, config = acceptance.for_candidates(candidates)
    if draft is not None and config is None and candidates > 1:
        raise ValueError(f"the {acceptance.description} has no tree shape, so draft passes cannot be counted; "
                         f"give tree shapes (--configs) or a measured acceptance file")
    return estimate(target, batch, context, candidates, block_efficiency, config, draft)


# bounds of the growth threshold `growth_threshold` sets
MIN_GROWTH_Q, MAX_GROWTH_Q = 0.01, 0.5


def growth_threshold(estimate: StepEstimate) -> float:
    """The path probability below which a node of this tree is not worth growing (a dynamic tree's q).

    A node the draft reaches with probability pi adds about pi accepted tokens (a calibrated draft) and costs c, its
    share of the step's extra work over plain decoding (c = (step - one-token forward) / tree size, relative to the
    one-token forward). Growing it raises the speedup S = BE / C iff (BE + pi) / (C + c) > S, i.e. pi > c S: on a CPU,
    where each scored token costs, q is large; on a GPU at small batch, where the tree is nearly free, it is small."""
    size = estimate.candidates - 1
    if size <= 0:
        return 0.0
    node_cost = max(estimate.seconds - estimate.baseline_seconds, 0.0) / size / estimate.baseline_seconds
    return min(max(node_cost * estimate.speedup, MIN_GROWTH_Q), MAX_GROWTH_Q)


def rank(target: LatencyModel, batch: int, context: int, acceptance: AcceptanceModel,
         draft: LatencyModel | None = None, candidates: list[SpeculativeConfig] | None = None,
         loop: LoopCost | None = None) -> list[StepEstimate]:
    """Every candidate shape's estimate, best predicted speedup first."""
    shapes = default_candidates() if candidates is None else candidates
    estimates = [estimate_config(target, batch, context, c, acceptance, draft, loop) for c in shapes
                 if c.is_speculative]
    return sorted(estimates, key=lambda e: e.speedup, reverse=True)

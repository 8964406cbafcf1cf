"""The planner: a per-operator latency model, acceptance models, and the choice of a tree shape.

`choose_config` is what `speculative_config="auto"` calls; `record_acceptance` feeds it measured
block efficiencies. Heavy imports (torch, numpy) stay inside the functions that need them.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics

from hf_specdec.config import SpeculativeConfig
from hf_specdec.planner.hardware import BUILTIN, Hardware, load_hardware
from hf_specdec.planner.latency import LatencyModel
from hf_specdec.planner.operators import FULL, MEDUSA_G3, OPERATOR_SETS, OperatorSet, forward_costs
from hf_specdec.planner.shapes import PRESETS, ModelShape, load_shape, shape_from_config

__all__ = [
    "BUILTIN", "FULL", "MEDUSA_G3", "OPERATOR_SETS", "PRESETS", "Hardware", "LatencyModel", "ModelShape",
    "MachineSpeed", "OperatorSet", "choose_config", "forward_costs", "load_hardware", "load_shape", "machine_speed",
    "predict_step_seconds",
    "record_acceptance", "shape_from_config",
]

logger = logging.getLogger(__name__)

# with no statistics for a pair, a tree predicted at least this fast (under the conservative prior) is tried once
EXPLORE_ABOVE = 0.75


def _latency_model(model):
    """The model's calibrated latency model on its device, meeting the forwards measured there."""
    from hf_specdec.planner.calibration import calibrated_hardware, measured_latency

    hardware = calibrated_hardware(model, progress=True)
    return measured_latency(model, LatencyModel(shape_from_config(model.config), hardware, hardware.dtype, FULL))


def _sampling(sampling, temperature: float | None):
    from hf_specdec.planner.loop_cost import Sampling

    if sampling is not None:
        return sampling
    return Sampling.greedy() if temperature == 0 else Sampling()


def choose_config(target_model, draft_model, batch_size: int, context_length: int,
                  candidates: list[SpeculativeConfig] | None = None, temperature: float | None = None,
                  sampling=None) -> SpeculativeConfig:
    """The tree shape with the best predicted speedup for this pair, device and batch size.

    Latency comes from a calibration of each model's config on its device and of the loop's own work per step with
    these sampling settings (`loop_cost.Sampling`; default: greedy at temperature 0, else generate's top-k 50), each
    measured once, then cached; acceptance from the pair's recorded statistics (a conservative default until there are
    some).
    Returns `SpeculativeConfig.ar()` when no shape is predicted to beat plain decoding, except while nothing is
    recorded for the pair: then the most promising tree runs once to measure it.
    """
    from hf_specdec.planner.acceptance import CONSERVATIVE_DEFAULT, pair_acceptance
    from hf_specdec.planner.loop_cost import loop_cost
    from hf_specdec.planner.planning import rank
    from hf_specdec.planner.step_times import corrected, measured_step_times

    target, draft = _latency_model(target_model), _latency_model(draft_model)
    loop = loop_cost(target_model, draft_model, batch_size, _sampling(sampling, temperature))
    acceptance = pair_acceptance(target_model, draft_model, temperature)
    ranked = rank(target, batch_size, context_length, acceptance, draft, candidates, loop)
    # what steps really took here corrects the latency model (step_times.py)
    ranked = corrected(ranked, measured_step_times(target_model, draft_model, batch_size))
    if acceptance is CONSERVATIVE_DEFAULT and ranked and ranked[0].speedup >= EXPLORE_ABOVE:
        # nothing measured for this pair yet: run the most promising tree once so that its statistics get recorded
        # (choosing `ar` here would never learn the pair's acceptance)
        config = dynamic(ranked[0])
        logger.info("hf_specdec planner: no statistics for this pair yet; exploring with %s", config)
        return config
    if not ranked or ranked[0].speedup <= 1.0:
        logger.info("hf_specdec planner: no tree shape beats plain decoding at batch %d (best %s); using ar",
                    batch_size, f"{ranked[0].config} at {ranked[0].speedup:.2f}x" if ranked else "none")
        return SpeculativeConfig.ar()
    best = ranked[0]
    config = dynamic(best)
    logger.info("hf_specdec planner: %s at batch %d, context %d: predicted %.2fx (block efficiency %.2f, %s)",
                config, batch_size, context_length, best.speedup, best.block_efficiency, acceptance.description)
    return config


def dynamic(estimate) -> SpeculativeConfig:
    """The estimate's tree grown dynamically, with the planner's threshold (`planning.growth_threshold`)."""
    import dataclasses

    from hf_specdec.planner.planning import growth_threshold

    if estimate.config.depth <= 1:
        return estimate.config
    return dataclasses.replace(estimate.config, min_path_q=round(growth_threshold(estimate), 3))


# the target's wide anchor of `machine_speed`: about the largest tree `bench` scores
WIDE_FORWARD_TOKENS = 32


@dataclasses.dataclass(frozen=True)
class MachineSpeed:
    """How much slower (> 1) or faster than calibrated this machine runs each model right now (`machine_speed`).

    A shared machine's speed drifts by tens of percent within an hour, and not alike for every forward: a one-token
    forward streams the weights (memory-bound: it slows down when neighbours use the memory bus), a wide one
    multiplies them (compute-bound). So the target has two anchors, its one-token and its `WIDE_FORWARD_TOKENS`-token
    forward, and a forward in between is scaled log-linearly in its token count; the draft (small enough to stay in
    cache) has one."""

    target_one: float = 1.0
    target_wide: float = 1.0
    draft: float = 1.0

    def target(self, tokens: int) -> float:
        """The factor of a target forward of `tokens` tokens per row."""
        weight = min(max(math.log(tokens) / math.log(WIDE_FORWARD_TOKENS), 0.0), 1.0)
        return self.target_one ** (1 - weight) * self.target_wide ** weight

    @staticmethod
    def median(speeds: list[MachineSpeed]) -> MachineSpeed:
        """Field by field: one timing varies by 10-20% on a shared machine."""
        return MachineSpeed(*(statistics.median(getattr(s, f.name) for s in speeds)
                              for f in dataclasses.fields(MachineSpeed)))


def machine_speed(target_model, draft_model, context_length: int) -> MachineSpeed:
    """Forwards timed now (median of `CHECK_REPEATS` each) over the calibrated model's prediction of them: the
    target's at one and `WIDE_FORWARD_TOKENS` tokens, the draft's at one. Scaling a prediction by this compares the
    model's shape dependence (tree sizes between the anchors, draft passes, loop work) with measurements taken in
    the same phase."""
    from hf_specdec.planner.calibration import CHECK_REPEATS, time_forward

    def ratio(model, tokens):
        now = time_forward(model, 1, tokens, context_length, repeats=CHECK_REPEATS)
        return now / _latency_model(model).seconds(1, tokens, context_length)

    return MachineSpeed(ratio(target_model, 1), ratio(target_model, WIDE_FORWARD_TOKENS), ratio(draft_model, 1))


def predict_step_seconds(target_model, draft_model, config: SpeculativeConfig, batch_size: int,
                         context_length: int, sampling=None, corrections: bool = True,
                         speed: MachineSpeed = MachineSpeed()) -> float:
    """The planner's prediction of one speculative step of `config` here: both models' calibrated forwards and the
    loop's measured work (`sampling` as in `choose_config`), corrected by what steps measured here so far
    (`step_times.corrected`, unless `corrections` is False), as `auto` ranks shapes with it. `speed`: the factors
    of `machine_speed`; the loop's work (small host-side operations) scales with the target's one-token factor."""
    from hf_specdec.planner.acceptance import CONSERVATIVE_DEFAULT
    from hf_specdec.planner.loop_cost import loop_cost
    from hf_specdec.planner.planning import estimate_config
    from hf_specdec.planner.step_times import corrected, measured_step_times

    shape = SpeculativeConfig.parse(config).largest_shape()
    loop = loop_cost(target_model, draft_model, batch_size, _sampling(sampling, 1.0))
    estimate = estimate_config(_latency_model(target_model), batch_size, context_length, shape, CONSERVATIVE_DEFAULT,
                               _latency_model(draft_model), loop)
    if corrections:
        estimate = corrected([estimate], measured_step_times(target_model, draft_model, batch_size))[0]
    return speed.target(estimate.candidates) * sum(estimate.target_seconds.values()) + \
        speed.target_one * estimate.loop_seconds + speed.draft * estimate.draft_seconds


def record_acceptance(target_model, draft_model, config, block_efficiency: float, num_steps: int,
                      temperature: float = 1.0) -> None:
    """Add one run's measured block efficiency to the pair's statistics (what `auto` learns acceptance from);
    `temperature` 0 means greedy decoding."""
    from hf_specdec.planner import acceptance

    acceptance.record_acceptance(target_model, draft_model, config, block_efficiency, num_steps, temperature)

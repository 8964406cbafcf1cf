"""Measured step times: what `auto` learns besides acceptance, so that a wrong latency model corrects itself.

The latency model predicts a step from a roofline fit of the target's and the draft's forwards plus the loop's own work
measured with near-free stand-ins (loop_cost.py); what that misses (kernel effects the fit does not capture, the real
draft's bookkeeping) shows in the step. Every speculative run records what a step really took (seconds per target call,
everything but the prefill), and every plain decoding that `auto` chose what a token took, as it runs it. The
planner then predicts each shape's step as the model's prediction times the measured-to-predicted ratio (the shape's
own, or the median over the shapes measured at this batch size) and divides by the measured plain token where there is
one.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path

from hf_specdec.planner.storage import cache_dir, weights_fingerprint

PLAIN = "plain decoding"  # as auto runs it (with the calibrated kernels; records of stock runs named otherwise)


def step_times_path(target_model, draft_model) -> Path:
    return cache_dir() / "step_times" / f"{weights_fingerprint(target_model)}-{weights_fingerprint(draft_model)}.jsonl"


def record_step_time(target_model, draft_model, config: str, seconds: float, batch: int) -> None:
    """One run's seconds per step (`config` = PLAIN: per token of auto's plain decoding)."""
    if not seconds > 0:
        return
    path = step_times_path(target_model, draft_model)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps({"config": config, "seconds": float(seconds), "batch": int(batch), "time": time.time()}) + "\n")


def measured_step_times(target_model, draft_model, batch: int) -> dict[str, float]:
    """Median seconds per step of every config measured at `batch` (and PLAIN)."""
    path = step_times_path(target_model, draft_model)
    if not path.is_file():
        return {}
    samples: dict[str, list[float]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            entry = json.loads(line)
            if entry["batch"] == batch:
                samples.setdefault(entry["config"], []).append(entry["seconds"])
    return {config: statistics.median(values) for config, values in samples.items()}


def corrected(estimates: list, measured: dict[str, float]) -> list:
    """The estimates with step and baseline times replaced by what was measured (see the module docstring)."""
    if not measured:
        return estimates
    ratios = {str(e.config): measured[str(e.config)] / e.seconds for e in estimates if str(e.config) in measured}
    general = statistics.median(ratios.values()) if ratios else 1.0
    out = []
    for estimate in estimates:
        ratio = ratios.get(str(estimate.config), general)
        out.append(dataclasses.replace(
            estimate,
            target_seconds={group: ratio * seconds for group, seconds in estimate.target_seconds.items()},
            draft_seconds=ratio * estimate.draft_seconds,
            loop_seconds=ratio * estimate.loop_seconds,
            baseline_seconds=measured.get(PLAIN, estimate.baseline_seconds),
        ))
    return sorted(out, key=lambda e: e.speedup, reverse=True)

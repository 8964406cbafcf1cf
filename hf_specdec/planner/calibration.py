"""Calibration: time real forwards on this device and fit the latency model's throughputs to them.

A forward at (batch b, new tokens q, context s) runs on a KV cache of s random keys/values (latency does
not depend on values) with a 4D causal mask over the new tokens, as a tree step does. The fitted
unknowns are the seconds per matmul FLOP, per attention FLOP, per attention (KV) byte, per kernel and per
weight byte packed (a CPU BLAS packs the weights of a matmul with more token rows than it runs row by
row; that threshold is chosen by the fit too);
the bandwidth for weights comes from a streaming probe, because weight traffic and per-kernel overhead
are both constant over the grid and could not be told apart otherwise. A calibrated profile adds each
group's compute and memory time (`overlap=False`): the model is then linear in the unknowns and the fit
is an exact non-negative least squares on relative errors. That is how a CPU core behaves; on a GPU,
which overlaps the two, the fitted throughputs absorb the difference (largest near the ridge point).
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hf_specdec.planner.hardware import Hardware
from hf_specdec.planner.latency import DTYPE_BYTES, LatencyModel, extra_weight_passes
from hf_specdec.planner.operators import FULL, forward_costs
from hf_specdec.planner.shapes import ModelShape, shape_from_config
from hf_specdec.planner.storage import cache_dir, slug

GEMV_ROWS_TRIED = (1, 2, 3, 4, 6, 8)  # candidate row-wise thresholds of the BLAS (see Hardware.gemv_rows)
UNKNOWNS = ("seconds per matmul FLOP", "seconds per attention FLOP", "seconds per KV byte", "seconds per kernel",
            "seconds per weight byte packed")


@dataclass(frozen=True)
class Grid:
    batches: tuple[int, ...]
    new_tokens: tuple[int, ...]
    contexts: tuple[int, ...]

    def points(self) -> list[tuple[int, int, int]]:
        return list(itertools.product(self.batches, self.new_tokens, self.contexts))


# `hf-specdec simulate --measure`: a couple of minutes for SmolLM2-135M on 2 cores
MEASURE_GRID = Grid(batches=(1, 4), new_tokens=(1, 2, 3, 4, 16, 64, 128), contexts=(256, 1024))
# first use of `auto`: well under a minute
QUICK_GRID = Grid(batches=(1, 4), new_tokens=(1, 2, 3, 8, 32), contexts=(128, 512))


@dataclass(frozen=True)
class Sample:
    batch: int
    new_tokens: int
    context: int
    seconds: float


# ------------------------------------------------------------------ measuring
def device_name(device) -> str:
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from hf_specdec.backends.cpu_kernels import prepacking_enabled

    # timings depend on the thread count, and on the linear kernels the speculative loop uses
    kernels = ", prepacked linears" if prepacking_enabled() else ""
    return f"{cpu_name()} x{torch.get_num_threads()} threads{kernels}"


def cpu_name() -> str:
    """The CPU model, as /proc/cpuinfo (and `lscpu`) names it."""
    return next((line.split(":", 1)[1].strip() for line in _read_lines("/proc/cpuinfo")
                 if line.startswith("model name")), "cpu")


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def _synchronize(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def random_model(shape: ModelShape, dtype: str = "float32", device: str = "cpu"):
    """A randomly initialised LlamaForCausalLM of this shape (latency does not depend on the weights)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    needed = shape.num_parameters * DTYPE_BYTES[dtype]
    available = _available_memory(device)
    if available is not None and needed > 0.6 * available:
        raise ValueError(f"{shape.name} needs {needed / 2**30:.1f} GiB in {dtype} and this {device} has "
                         f"{available / 2**30:.1f} GiB: measure a smaller model, or simulate it with --hardware")
    config = LlamaConfig(
        hidden_size=shape.hidden_size, num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads, head_dim=shape.head_dim, intermediate_size=shape.intermediate_size,
        vocab_size=shape.vocab_size, tie_word_embeddings=shape.tie_word_embeddings, max_position_embeddings=8192,
    )
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(getattr(torch, dtype)).eval()


def _available_memory(device) -> int | None:
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def time_forward(model, batch: int, new_tokens: int, context: int, repeats: int = 3, warmup: int = 1,
                 packed: bool | None = None) -> float:
    """Median seconds of one forward of `new_tokens` per sequence over a KV cache of `context` tokens, with the linear
    kernels the speculative loop runs for that many tokens (`packed`: prepacked or stock ones regardless)."""
    import torch
    from transformers import DynamicCache

    from hf_specdec.backends.cpu_kernels import packed_linears, prepacking_pays
    from hf_specdec.compat import cache_argument
    from hf_specdec.feature_draft import timing_inputs
    from hf_specdec.rope import state_preserved

    config, device, dtype = model.config, model.device, model.dtype
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    # its own generator: a calibration inside generate() must not move the random state sampling draws from
    generator = torch.Generator(device).manual_seed(new_tokens)
    past = torch.randn(batch, kv_heads, context, head_dim, device=device, generator=generator).to(dtype)
    input_ids = torch.randint(0, config.vocab_size, (batch, new_tokens), device=device, generator=generator)
    position_ids = torch.arange(context, context + new_tokens, device=device).expand(batch, -1)
    allowed = torch.ones(new_tokens, context + new_tokens, dtype=torch.bool, device=device)
    allowed[:, context:] = torch.ones(new_tokens, new_tokens, dtype=torch.bool, device=device).tril()
    if getattr(config, "_attn_implementation", "sdpa") == "eager":  # eager needs an additive float mask
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    else:
        mask = allowed
    mask = mask[None, None].expand(batch, 1, -1, -1)
    times = []
    packed = prepacking_pays(model, new_tokens) if packed is None else packed
    with torch.inference_mode(), packed_linears(model, packed), state_preserved(model):
        for _ in range(warmup + repeats):
            cache = DynamicCache(ddp_cache_data=[(past, past)] * config.num_hidden_layers)
            _synchronize(device)
            start = time.perf_counter()
            model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, use_cache=True,
                  **cache_argument(model, cache), **timing_inputs(model, input_ids))
            _synchronize(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times[warmup:])


def measure_bandwidth(device, dtype: str, megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes/s of a streaming read (a sum over a buffer far larger than the caches)."""
    import torch

    data = torch.ones(megabytes * 2**20 // DTYPE_BYTES[dtype], dtype=getattr(torch, dtype), device=device)
    times = []
    for _ in range(repeats + 1):
        _synchronize(device)
        start = time.perf_counter()
        data.sum()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return data.numel() * data.element_size() / statistics.median(times[1:])


def measure(model, grid: Grid, repeats: int = 3, progress: bool = True) -> list[Sample]:
    """The median of `repeats` timings of every grid point, taken in rounds (every point once per round): a burst of
    load on a shared machine then touches one timing of many points, not many timings of one point (timed point by
    point, a 2-token forward once came out slower than the 8-token one)."""
    from tqdm.auto import tqdm

    points = grid.points()
    times: dict[tuple[int, int, int], list[float]] = {point: [] for point in points}
    with tqdm(total=repeats * len(points), desc="timing forwards", disable=not progress, unit="forward") as bar:
        for _ in range(repeats):
            for point in points:
                times[point].append(time_forward(model, *point, repeats=1))
                bar.update(1)
    return [Sample(*point, statistics.median(times[point])) for point in points]


# ------------------------------------------------------------------ fitting
def _design_row(shape: ModelShape, dtype: str, sample: Sample, bandwidth: float, gemv_rows: int):
    """The sample's coefficients on UNKNOWNS, and the seconds it spends on weight and activation traffic."""
    costs = forward_costs(shape, sample.batch, sample.new_tokens, sample.context, DTYPE_BYTES[dtype], FULL)
    attention = costs.pop("attention")
    row_wise, packed = (sum(passes) for passes in zip(*(extra_weight_passes(c, gemv_rows, packs=True)
                                                         for c in costs.values())))
    features = np.array([sum(c.flops for c in costs.values()), attention.flops, attention.bytes,
                         attention.kernels + sum(c.kernels for c in costs.values()), packed], dtype=float)
    return features, (sum(c.bytes for c in costs.values()) + row_wise) / bandwidth


def nonnegative_least_squares(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """min |a x - y| with x >= 0, by trying every set of free columns (fine for the 5 unknowns here)."""
    best, best_residual = np.zeros(a.shape[1]), float(np.sum(y**2))
    for size in range(1, a.shape[1] + 1):
        for columns in itertools.combinations(range(a.shape[1]), size):
            solution, *_ = np.linalg.lstsq(a[:, columns], y, rcond=None)
            if np.all(solution >= 0):
                x = np.zeros(a.shape[1])
                x[list(columns)] = solution
                residual = float(np.sum((a @ x - y) ** 2))
                if residual < best_residual:
                    best, best_residual = x, residual
    return best


def fit_hardware(name: str, shape: ModelShape, dtype: str, samples: list[Sample], bandwidth: float) -> Hardware:
    """The throughputs that best explain `samples`; the BLAS's row-wise threshold is chosen by the same fit."""
    measured = np.array([s.seconds for s in samples])
    fits = []
    for gemv_rows in GEMV_ROWS_TRIED:
        rows = [_design_row(shape, dtype, s, bandwidth, gemv_rows) for s in samples]
        a = np.array([features for features, _ in rows]) / measured[:, None]  # relative errors
        y = (measured - np.array([memory for _, memory in rows])) / measured
        x = nonnegative_least_squares(a, y)
        fits.append((float(np.sum((a @ x - y) ** 2)), gemv_rows, x))
    _, gemv_rows, x = min(fits, key=lambda fit: fit[0])
    x = np.maximum(x, 1e-18)  # a zero means "no measurable cost": keep throughputs finite
    return Hardware(name=name, matmul_flops=1 / x[0], attention_flops=1 / x[1], bandwidth=bandwidth,
                    attention_bandwidth=1 / x[2], kernel_overhead=float(x[3]), overlap=False, matmul_tile=1,
                    gemv_rows=gemv_rows, packing_bandwidth=1 / x[4], dtype=dtype,
                    notes=f"calibrated on {len(samples)} timed forwards of {shape.name}")


# ------------------------------------------------------------------ the cache
@dataclass(frozen=True)
class Calibration:
    device: str
    shape: ModelShape
    hardware: Hardware
    samples: tuple[Sample, ...]
    # {new tokens: prepacked linears?} the samples were timed with (`kernel_choices`); None in older caches
    kernels: dict[int, bool] | None = None

    def path(self) -> Path:
        return calibration_path(self.device, self.shape, self.hardware.dtype)

    def save(self) -> Path:
        path = self.path()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({
            "device": self.device, "model": self.shape.name, "model_key": self.shape.key(),
            "hardware": self.hardware.to_json(),
            "samples": [[s.batch, s.new_tokens, s.context, s.seconds] for s in self.samples],
            "kernels": None if self.kernels is None else {str(n): packed for n, packed in self.kernels.items()},
        }, indent=1))
        return path

    def errors(self) -> list[tuple[Sample, float]]:
        """Each sample with the calibrated model's prediction for it."""
        model = LatencyModel(self.shape, self.hardware, self.hardware.dtype, FULL)
        return [(s, model.seconds(s.batch, s.new_tokens, s.context)) for s in self.samples]


def calibration_path(device: str, shape: ModelShape, dtype: str) -> Path:
    return cache_dir() / "calibration" / slug(device) / f"{shape.key()}-{dtype}.json"  # the name is inside


def load_calibration(device: str, shape: ModelShape, dtype: str) -> Calibration | None:
    path = calibration_path(device, shape, dtype)
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    kernels = data.get("kernels")
    return Calibration(device, shape, Hardware.from_json(data["hardware"], origin=str(path)),
                       tuple(Sample(*s) for s in data["samples"]),
                       None if kernels is None else {int(n): bool(packed) for n, packed in kernels.items()})


def kernel_choices(model, samples) -> dict[int, bool]:
    """{new tokens: whether the loop's forwards of that many tokens run prepacked linears here} for the samples' token
    counts (`cpu_kernels.prepacking_pays`, measured once per machine and kept on disk)."""
    from hf_specdec.backends.cpu_kernels import prepacking_pays

    return {n: prepacking_pays(model, n) for n in sorted({s.new_tokens for s in samples})}


def calibrate(model, shape: ModelShape | None = None, grid: Grid = QUICK_GRID, repeats: int = 5,
              progress: bool = True) -> Calibration:
    """Time `model` on `grid`, fit the latency model and save the result to the cache. The kernel choices the loop
    makes from measurements (`cpu_kernels.prepacking_pays`) are timed anew with it: the samples are of those."""
    from hf_specdec.backends.cpu_kernels import forget_prepacking_choices, prepacking_available

    if prepacking_available(model):
        forget_prepacking_choices(model)
    shape = shape or shape_from_config(model.config)
    dtype = str(model.dtype).removeprefix("torch.")
    device = device_name(model.device)
    bandwidth = measure_bandwidth(model.device, dtype)
    samples = measure(model, grid, repeats, progress)
    hardware = fit_hardware(f"{device}, calibrated on {shape.name}", shape, dtype, samples, bandwidth)
    calibration = Calibration(device, shape, hardware, tuple(samples), kernel_choices(model, samples))
    calibration.save()
    return calibration


# a cached calibration whose smallest or largest point now times this much off (relative) is measured again: the
# planner's step predictions are meant to hold within 15% (one-token draft passes make a chain's step, the largest
# point the GEMMs of a tree's); each check is the median of CHECK_REPEATS forwards, as a forward of a few
# milliseconds varies by a quarter from run to run on a shared 2-core machine
DRIFT = 0.15
CHECK_REPEATS = 5
_CHECKED: dict[Path, Calibration] = {}  # this process's calibrations, checked against the machine


def _model_key(model) -> tuple[str, ModelShape, str]:
    """(device name, shape, dtype): what a calibration of `model` is kept under."""
    return device_name(model.device), shape_from_config(model.config), str(model.dtype).removeprefix("torch.")


def drifted(model, calibration: Calibration) -> bool:
    """Whether this machine no longer runs the calibration's quickest and slowest points as measured: a device name
    ("AMD EPYC x2 threads") covers other machines (a cloud host, another session), a cache may outlive the machine it
    was measured on, and a shared machine's speed drifts by tens of percent within an hour. A few forwards, once per
    process and model. Also where the loop's kernels are no longer those the samples were timed with (a calibration
    from before kernel choices were kept: its 8-token points were once stock GEMMs at twice the packed ones' cost,
    and only the ends are timed here)."""
    if calibration.kernels != kernel_choices(model, calibration.samples):
        return True
    ends = {min(calibration.samples, key=lambda s: s.seconds), max(calibration.samples, key=lambda s: s.seconds)}
    return any(abs(time_forward(model, s.batch, s.new_tokens, s.context, repeats=CHECK_REPEATS) / s.seconds - 1) > DRIFT
               for s in ends)


def calibrated_hardware(model, grid: Grid = QUICK_GRID, progress: bool = False) -> Hardware:
    """The cached calibration of this model's config on its device, measuring it on first use and again where the
    machine no longer runs it as measured (`drifted`)."""
    device, shape, dtype = _model_key(model)
    path = calibration_path(device, shape, dtype)
    if path not in _CHECKED:
        cached = load_calibration(device, shape, dtype)
        if cached is None or not cached.samples or drifted(model, cached):
            cached = calibrate(model, shape, grid, progress=progress)
        _CHECKED[path] = cached
    return _CHECKED[path].hardware


# ------------------------------------------------------------------ predictions that meet the measurements
def _interpolate(grid: list[float], values: list[float], x: float) -> float:
    """Piecewise-linear in `grid` (sorted), constant beyond its ends."""
    return float(np.interp(x, grid, values))


@dataclass(frozen=True)
class MeasuredLatency:
    """The calibrated latency model made to meet the forwards it was fitted to: at a calibration point it predicts
    what was measured there (each operator group scaled alike), between points it interpolates the measured-to-model
    ratio (linearly in new tokens, then in context; at the nearest measured batch size), beyond them it keeps the
    nearest ratio. A roofline of five throughputs misses what a 1-layer draft's per-forward Python costs or how a
    CPU GEMM's cost steps with its row count; the measurements have it."""

    model: LatencyModel
    samples: tuple[Sample, ...]

    @functools.cached_property
    def _ratios(self) -> dict[int, dict[int, list[tuple[int, float]]]]:
        """batch -> context -> [(new tokens, measured / model)], sorted: computed once, read by every prediction."""
        table: dict[int, dict[int, list[tuple[int, float]]]] = {}
        for s in sorted(self.samples, key=lambda s: s.new_tokens):
            ratio = s.seconds / self.model.seconds(s.batch, s.new_tokens, s.context)
            table.setdefault(s.batch, {}).setdefault(s.context, []).append((s.new_tokens, ratio))
        return table

    def ratio(self, batch: int, new_tokens: int, context: int) -> float:
        by_context = self._ratios[min(self._ratios, key=lambda b: (abs(b - batch), b))]
        contexts = sorted(by_context)
        per_context = [_interpolate([n for n, _ in by_context[c]], [r for _, r in by_context[c]], new_tokens)
                       for c in contexts]
        return _interpolate(contexts, per_context, context)

    def forward(self, batch: int, new_tokens: int, context: int) -> dict[str, float]:
        scale = self.ratio(batch, new_tokens, context)
        return {group: scale * seconds for group, seconds in self.model.forward(batch, new_tokens, context).items()}

    def seconds(self, batch: int, new_tokens: int, context: int) -> float:
        return sum(self.forward(batch, new_tokens, context).values())


def measured_latency(model, latency: LatencyModel) -> "LatencyModel | MeasuredLatency":
    """`latency` meeting the cached calibration's measured forwards of `model`, where `latency` is that calibration's
    model (else, e.g. a given hardware profile, `latency` as it is)."""
    device = device_name(model.device)
    cached = _CHECKED.get(calibration_path(device, latency.shape, latency.dtype)) or \
        load_calibration(device, latency.shape, latency.dtype)
    if cached is None or cached.hardware != latency.hardware or not cached.samples:
        return latency
    return MeasuredLatency(latency, cached.samples)

"""Planner calibration and `auto`: timing real forwards of tiny random models, fitting, caching."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from hf_specdec.config import SpeculativeConfig
from hf_specdec.planner import LatencyModel, ModelShape, choose_config, record_acceptance, shape_from_config
from hf_specdec.planner.acceptance import CONSERVATIVE_DEFAULT, TreeAcceptance, pair_acceptance
from hf_specdec.planner.calibration import (
    Calibration, Grid, MeasuredLatency, Sample, calibrate, calibrated_hardware, device_name, drifted, fit_hardware,
    load_calibration, measured_latency, random_model, time_forward,
)
from hf_specdec.planner.hardware import Hardware

TINY = ModelShape("tiny-llama", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
                  intermediate_size=128, vocab_size=256)
TINY_GRID = Grid(batches=(1, 2), new_tokens=(1, 4), contexts=(8, 32))


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_SPECDEC_CACHE", str(tmp_path))


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return random_model(TINY)


def test_fit_recovers_known_throughputs():
    truth = Hardware("truth", matmul_flops=2e10, attention_flops=5e9, bandwidth=1e10, attention_bandwidth=4e9,
                     kernel_overhead=3e-5, overlap=False, gemv_rows=3, packing_bandwidth=5e9, dtype="float32")
    model = LatencyModel(TINY, truth, "float32")
    samples = [Sample(b, q, s, model.seconds(b, q, s)) for b in (1, 4) for q in (1, 2, 3, 4, 16, 64) for s in (64, 1024)]
    fitted = fit_hardware("fit", TINY, "float32", samples, truth.bandwidth)
    for field in ("matmul_flops", "attention_flops", "attention_bandwidth", "kernel_overhead", "packing_bandwidth"):
        assert getattr(fitted, field) == pytest.approx(getattr(truth, field), rel=0.02), field
    assert fitted.gemv_rows == 3


def test_measured_latency_meets_the_samples_and_interpolates_between_them(tiny_model):
    """At a calibration point the prediction is the measurement; between points the measured-to-model ratio is
    interpolated (new tokens, then context), beyond them the nearest ratio holds; every group scales alike."""
    hardware = Hardware("fit", matmul_flops=1e10, attention_flops=5e9, bandwidth=1e10, attention_bandwidth=4e9,
                        kernel_overhead=1e-5, overlap=False, dtype="float32")
    model = LatencyModel(TINY, hardware, "float32")
    ratios = {(1, 8): 1.5, (4, 8): 2.5, (1, 32): 1.0, (4, 32): 2.0}  # (new tokens, context) -> measured / model
    samples = tuple(Sample(b, n, c, r * model.seconds(b, n, c)) for b in (1, 4) for (n, c), r in ratios.items())
    measured = MeasuredLatency(model, samples)
    for sample in samples:
        assert measured.seconds(sample.batch, sample.new_tokens, sample.context) == pytest.approx(sample.seconds)
    assert measured.ratio(1, 2, 8) == pytest.approx(1.5 + (2.5 - 1.5) / 3)  # a third of the way from 1 to 4 tokens
    assert measured.ratio(1, 4, 20) == pytest.approx(2.5 - 0.5 * 12 / 24)
    assert measured.ratio(2, 64, 4096) == pytest.approx(2.0)  # beyond the grid: the nearest ratio (batch 1's)
    groups, scaled = model.forward(1, 3, 16), measured.forward(1, 3, 16)
    assert {g: scaled[g] / groups[g] for g in groups} == pytest.approx(dict.fromkeys(groups, measured.ratio(1, 3, 16)))
    # measured_latency uses a cached calibration only for the model it describes
    assert measured_latency(tiny_model, model) is model  # nothing cached yet
    Calibration(device_name("cpu"), TINY, hardware, samples).save()
    assert measured_latency(tiny_model, model) == measured
    other = LatencyModel(TINY, Hardware("a given profile", 1e12, 1e12, 1e12, 1e12, 0.0, dtype="float32"), "float32")
    assert measured_latency(tiny_model, other) is other


def test_a_calibration_this_machine_no_longer_matches_is_measured_again(tiny_model, monkeypatch):
    """A cached calibration is checked once per process against forwards timed now; a drifted one (another
    machine behind the same device name) is replaced, a matching one kept."""
    from hf_specdec.planner import calibration as calibration_module

    monkeypatch.setattr(calibration_module, "_CHECKED", {})
    measured = calibrate(tiny_model, TINY, TINY_GRID, repeats=1, progress=False)
    stale = Calibration(measured.device, TINY, dataclasses.replace(measured.hardware, name="elsewhere"),
                        tuple(dataclasses.replace(s, seconds=50 * s.seconds) for s in measured.samples))
    stale.save()
    assert calibrated_hardware(tiny_model, grid=TINY_GRID).name != "elsewhere"  # measured again here
    assert load_calibration(device_name("cpu"), TINY, "float32").hardware.name != "elsewhere"
    kept = calibrated_hardware(tiny_model)
    calibration_module._CHECKED.clear()
    monkeypatch.setattr(calibration_module, "drifted", lambda model, cached: False)
    assert calibrated_hardware(tiny_model) == kept  # the cache matches: reused


def test_a_calibration_timed_with_other_kernels_is_measured_again(tiny_model, monkeypatch):
    """The samples record the linear kernels they were timed with; a cached calibration whose kernels are not those
    the loop runs now (or that does not say, from before the choices were kept) is stale without timing anything."""
    from hf_specdec.backends import cpu_kernels
    from hf_specdec.planner import calibration as calibration_module

    monkeypatch.setattr(cpu_kernels, "prepacking_pays", lambda model, tokens: tokens >= 3)
    measured = calibrate(tiny_model, TINY, TINY_GRID, repeats=1, progress=False)
    assert measured.kernels == {n: n >= 3 for n in TINY_GRID.new_tokens}
    reloaded = load_calibration(device_name("cpu"), TINY, "float32")
    assert reloaded.kernels == measured.kernels and reloaded.samples == measured.samples
    monkeypatch.setattr(calibration_module, "time_forward", lambda *args, **kwargs: pytest.fail("timed"))
    assert drifted(tiny_model, dataclasses.replace(measured, kernels=None))
    monkeypatch.setattr(cpu_kernels, "prepacking_pays", lambda model, tokens: tokens >= 5)
    assert drifted(tiny_model, measured)


def test_time_forward_runs_a_cached_tree_step(tiny_model):
    assert 0 < time_forward(tiny_model, batch=2, new_tokens=3, context=16, repeats=1) < 5


def test_calibrate_caches_and_reloads(tiny_model, monkeypatch):
    from hf_specdec.planner import calibration as calibration_module

    calibration = calibrate(tiny_model, TINY, TINY_GRID, repeats=1, progress=False)
    assert calibration.path().is_file() and len(calibration.samples) == len(TINY_GRID.points())
    reloaded = load_calibration(device_name("cpu"), TINY, "float32")
    assert reloaded.hardware == calibration.hardware and not reloaded.hardware.overlap
    monkeypatch.setattr(calibration_module, "_CHECKED", {})
    # (a tiny model's sub-millisecond forwards are mostly timing noise: the drift check has its own test)
    monkeypatch.setattr(calibration_module, "drifted", lambda model, cached: False)
    assert calibrated_hardware(tiny_model) == calibration.hardware  # cached: no second measurement
    assert all(predicted > 0 for _, predicted in calibration.errors())


def test_record_acceptance_feeds_the_pair_model(tiny_model, caplog):
    draft = random_model(ModelShape("tiny-draft", 1, 32, 2, 1, 16, 64, 256))
    with caplog.at_level(logging.WARNING):
        assert pair_acceptance(tiny_model, draft) is CONSERVATIVE_DEFAULT
    assert "no acceptance statistics" in caplog.text
    for config, efficiency in (("sd:l=2", 2.1), ("sd:l=6", 3.4), ("rsd-c:b=3-1", 2.6)):
        record_acceptance(tiny_model, draft, config, efficiency, num_steps=50)
    record_acceptance(tiny_model, draft, "ar", 1.0, num_steps=50)  # not a tree: ignored
    fitted = pair_acceptance(tiny_model, draft)
    assert isinstance(fitted, TreeAcceptance) and "3 recorded runs" in fitted.description


def test_choose_config_returns_a_candidate_or_ar(tiny_model):
    draft = random_model(ModelShape("tiny-draft", 1, 32, 2, 1, 16, 64, 256))
    for model in (tiny_model, draft):  # first use measures (on a small grid here), choose_config reuses it
        assert load_calibration(device_name("cpu"), shape_from_config(model.config), "float32") is None
        calibrated_hardware(model, grid=TINY_GRID)
    choices = [SpeculativeConfig.sd(2), SpeculativeConfig.rsd_s(2, 2)]
    chosen = choose_config(tiny_model, draft, batch_size=1, context_length=32, candidates=choices)
    # a chosen tree comes back dynamic (grown only where the draft is confident): its largest shape is a candidate
    assert chosen.largest_shape() in choices + [SpeculativeConfig.ar()]


def test_choose_config_follows_the_latency_model(tiny_model, monkeypatch, free_loop):
    """Weight-bound (GPU-like) hardware rewards a tree at batch 1; compute-bound batches fall back to ar."""
    from hf_specdec.planner import calibration

    gpu_like = Hardware("gpu-like", matmul_flops=1e14, attention_flops=5e13, bandwidth=1e9, attention_bandwidth=1e9,
                        kernel_overhead=0.0, overlap=True, dtype="float32")
    compute_bound = Hardware("slow-math", matmul_flops=1e6, attention_flops=1e6, bandwidth=1e15,
                             attention_bandwidth=1e15, kernel_overhead=0.0, overlap=True, dtype="float32")
    draft = random_model(ModelShape("tiny-draft", 1, 32, 2, 1, 16, 64, 256))
    monkeypatch.setattr(calibration, "calibrated_hardware", lambda model, **_: gpu_like)
    assert choose_config(tiny_model, draft, batch_size=1, context_length=64).is_speculative
    monkeypatch.setattr(calibration, "calibrated_hardware", lambda model, **_: compute_bound)
    assert choose_config(tiny_model, draft, batch_size=16, context_length=64) == SpeculativeConfig.ar()


def test_simulate_measure_and_validate(tmp_path, monkeypatch, capsys):
    import json

    from transformers import LlamaConfig

    from hf_specdec.cli import main
    from hf_specdec.planner import calibration

    monkeypatch.setattr(calibration, "MEASURE_GRID", TINY_GRID)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2, intermediate_size=128, vocab_size=256).to_dict()))
    assert main(["simulate", "--model", str(config), "--measure", "--validate", "--seq-len", "16",
                 "--batch", "1", "--candidates", "1,4"]) == 0
    err = capsys.readouterr().err
    assert "calibration saved to" in err and "validation (timed after the fit)" in err
    assert main(["simulate", "--model", str(config), "--hardware", "cpu", "--seq-len", "16"]) == 0  # reuses it
    assert "no calibration" not in capsys.readouterr().err

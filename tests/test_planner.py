"""The planner: operator arithmetic, latency model, acceptance, seed reproduction, CLI."""

from __future__ import annotations

import json
import math

import pytest

from hf_specdec.config import SpeculativeConfig
from hf_specdec.planner import FULL, MEDUSA_G3, PRESETS, Hardware, LatencyModel, ModelShape, load_hardware, load_shape
from hf_specdec.planner import operators as ops
from hf_specdec.planner.acceptance import (
    CONSERVATIVE_DEFAULT, MedusaFit, MeasuredPoint, TreeAcceptance, load_acceptance, load_bench_points,
)
from hf_specdec.planner import loop_cost as loop_cost_module
from hf_specdec.planner.loop_cost import LoopCost, Sampling, fit, terms
from hf_specdec.planner.planning import estimate_candidates, estimate_config, rank
from hf_specdec.planner.shapes import shape_from_config
from tiny_models import tiny_model
from hf_specdec.planner.trees import accepted_node_children, default_candidates, draft_pass_tokens

# 2 layers, hidden 8, 2 query heads and 1 KV head of dim 4, MLP 16, vocab 32; 2 sequences x 3 new tokens
# (6 token rows) over 5 cached tokens (8 keys), 2 bytes per element.
TINY = ModelShape("tiny", num_layers=2, hidden_size=8, num_heads=2, num_kv_heads=1, head_dim=4,
                  intermediate_size=16, vocab_size=32)
B, Q, S, E = 2, 3, 5, 2


# ------------------------------------------------------------------ FLOPs and bytes, by hand
def test_qkv_projections_by_hand():
    cost = ops.qkv_projections(TINY, B * Q, E)
    # per layer: q 6x8 @ 8x8, k and v 6x8 @ 8x4; bytes = weights + input + output
    assert cost.flops == 2 * (2 * 6 * 8 * 8 + 2 * (2 * 6 * 8 * 4))
    assert cost.bytes == 2 * 2 * ((64 + 48 + 48) + 2 * (32 + 48 + 24))
    assert cost.kernels == 2 * 3 and cost.gemm_rows == 6


def test_attention_by_hand():
    cost = ops.attention(TINY, B, Q, S, E)
    # per layer: qk and pv, each 2 FLOPs x 2 seqs x 3 queries x 8 keys x 2 heads x 4 dims
    assert cost.flops == 2 * (2 * 2 * 2 * 3 * 8 * 2 * 4)
    # per layer: K and V of 2 seqs x 8 keys x 1 head x 4 dims, plus Q in and O out of 2 x 3 x 2 x 4
    assert cost.bytes == 2 * 2 * (2 * 2 * 8 * 4 + 2 * 2 * 3 * 2 * 4)
    once = ops.attention(TINY, B, Q, S, E, kv_sequences=1)
    assert once.bytes == 2 * 2 * (2 * 1 * 8 * 4 + 2 * 2 * 3 * 2 * 4) and once.flops == cost.flops


def test_output_projection_mlp_lm_head_by_hand():
    o_proj = ops.output_projection(TINY, 6, E)
    assert (o_proj.flops, o_proj.bytes) == (2 * 2 * 6 * 8 * 8, 2 * 2 * (64 + 48 + 48))
    mlp = ops.mlp(TINY, 6, E)
    # gate and up 6x8 @ 8x16, down 6x16 @ 16x8: 1536 FLOPs and 544 bytes each
    assert (mlp.flops, mlp.bytes, mlp.kernels) == (2 * 3 * 1536, 2 * 3 * 544, 6)
    assert mlp.weight_bytes == 2 * 3 * 2 * 8 * 16
    head = ops.lm_head(TINY, 6, E)
    assert (head.flops, head.bytes, head.kernels) == (2 * 6 * 8 * 32, 2 * (256 + 48 + 192), 1)


def test_norms_and_elementwise_by_hand():
    norms = ops.norms(TINY, 6, E)
    # 2 per layer + final = 5 RMSNorms of 6x8: 4 FLOPs per element; read x, write y, read the weight
    assert (norms.flops, norms.bytes, norms.kernels) == (5 * 4 * 48, 5 * 2 * (2 * 48 + 8), 5)
    glue = ops.elementwise(TINY, 6, E)
    # per layer: SiLU*mul 3 x 6x16, two residual adds 3 x 6x8 each, rotary in+out of q and k (6 x 3 heads x 4)
    assert glue.bytes == 2 * 2 * 6 * (3 * 16 + 2 * 3 * 8 + 2 * 3 * 4) and glue.kernels == 8


def test_operator_sets():
    assert set(ops.forward_costs(TINY, B, Q, S, E, FULL)) == {"qkv", "attention", "o_proj", "mlp", "elementwise",
                                                              "norms", "lm_head"}
    g3 = ops.forward_costs(TINY, B, Q, S, E, MEDUSA_G3)
    assert set(g3) == {"qkv", "attention", "mlp"}
    assert g3["attention"] == ops.attention(TINY, B, Q, S, E, kv_sequences=1)


# ------------------------------------------------------------------ shapes
def test_presets_and_parameter_counts():
    assert abs(PRESETS["llama-7b"].num_parameters / 6.74e9 - 1) < 0.01
    assert abs(PRESETS["smollm2-135m"].num_parameters / 134.5e6 - 1) < 0.01
    assert load_shape("smollm2-135m") is PRESETS["smollm2-135m"]


def test_shape_from_hf_configs(tmp_path):
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    llama = shape_from_config(LlamaConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=8,
                                          num_key_value_heads=2, head_dim=16, intermediate_size=128,
                                          vocab_size=100, tie_word_embeddings=True))
    assert (llama.num_kv_heads, llama.head_dim, llama.tie_word_embeddings) == (2, 16, True)
    qwen = shape_from_config(Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=4, intermediate_size=96, vocab_size=50))
    assert qwen.head_dim == 16 and qwen.num_kv_heads == 4
    with pytest.raises(ValueError, match="Llama-family.*preset"):
        shape_from_config(GPT2Config())
    (tmp_path / "config.json").write_text(json.dumps(LlamaConfig(num_hidden_layers=2).to_dict()))
    assert load_shape(str(tmp_path)).num_layers == 2
    with pytest.raises(ValueError, match="no config file"):
        load_shape(str(tmp_path / "missing.json"))


# ------------------------------------------------------------------ hardware and latency
def test_hardware_loading(tmp_path):
    assert load_hardware("a100-80gb").matmul_flops == 256.4e12
    with pytest.raises(ValueError, match="a100-80gb, h100-sxm, h200, cpu"):
        load_hardware("tpu-v9")
    spec = tmp_path / "gpu.json"
    spec.write_text(json.dumps({"name": "mine", "matmul_flops": 1e14, "bandwidth": 1e12}))
    mine = load_hardware(str(spec))
    assert mine.attention_flops == 0.5e14 and mine.attention_bandwidth == 1e12
    spec.write_text(json.dumps({"name": "mine", "matmul_flops": 1e14, "bandwith": 1e12}))
    with pytest.raises(ValueError, match="missing \\['bandwidth'\\], unknown \\['bandwith'\\]"):
        load_hardware(str(spec))


def _hardware(**overrides) -> Hardware:
    fields = dict(name="test", matmul_flops=1e3, attention_flops=1e2, bandwidth=1e3, attention_bandwidth=1e2,
                  kernel_overhead=0.5, overlap=True, matmul_tile=1)
    return Hardware(**{**fields, **overrides})


def test_latency_combines_compute_and_memory_per_group():
    costs = ops.forward_costs(TINY, B, Q, S, E, FULL)
    for overlap in (True, False):
        seconds = LatencyModel(TINY, _hardware(overlap=overlap), "float16").forward(B, Q, S)
        mlp, attention = costs["mlp"], costs["attention"]
        combine = max if overlap else (lambda a, b: a + b)
        assert seconds["mlp"] == pytest.approx(combine(mlp.flops / 1e3, mlp.bytes / 1e3))
        assert seconds["attention"] == pytest.approx(combine(attention.flops / 1e2, attention.bytes / 1e2))
        assert seconds["overhead"] == 0.5 * sum(c.kernels for c in costs.values())


def test_cpu_blas_weight_passes():
    """Up to gemv_rows rows: one weight pass per row; more rows: one pass plus a packing pass."""
    blas = _hardware(overlap=False, gemv_rows=3, packing_bandwidth=1e3)
    plain = _hardware(overlap=False)
    weights = ops.mlp(TINY, 1, E).weight_bytes
    for rows, extra in ((1, 0.0), (3, 2 * weights / 1e3), (4, weights / 1e3)):
        seconds = LatencyModel(TINY, blas, "float16").forward(1, rows, S)["mlp"]
        assert seconds == pytest.approx(LatencyModel(TINY, plain, "float16").forward(1, rows, S)["mlp"] + extra)


def test_tile_quantization_pads_matmul_rows():
    plain = LatencyModel(TINY, _hardware(matmul_tile=1, bandwidth=1e30), "float16").forward(B, Q, S)
    tiled = LatencyModel(TINY, _hardware(matmul_tile=64, bandwidth=1e30), "float16").forward(B, Q, S)
    assert tiled["mlp"] == pytest.approx(plain["mlp"] * 64 / 6)  # 6 token rows computed as one 64-row tile
    assert tiled["attention"] == plain["attention"]


def test_a100_constants_reproduce_the_measurement_they_came_from():
    # gpt-fast: Llama-2-7B decodes at 104.9 tokens/s on an A100-80GB (the per-kernel overhead was derived from it)
    seconds = LatencyModel(PRESETS["llama-7b"], load_hardware("a100-80gb"), "float16").seconds(1, 1, 8)
    assert seconds == pytest.approx(1 / 104.9, rel=0.05)


# ------------------------------------------------------------------ the seeds: Medusa appendix G.3
# speedup read off the charts (shared/seeds/medusa-g3-simulated-speedup-*.txt), by batch then candidates
SEED_SPEEDUP = {
    1: {16: 2.4, 32: 2.7, 48: 2.85, 64: 2.95, 80: 2.8, 96: 2.85, 112: 2.85},
    2: {16: 2.25, 64: 2.6, 112: 2.4},
    4: {32: 2.25, 64: 2.15, 80: 1.55, 112: 1.5},
    8: {16: 1.8, 32: 1.8, 64: 1.3, 112: 0.9},
    16: {16: 1.4, 64: 0.7, 112: 0.5},
    32: {16: 0.85, 64: 0.4, 112: 0.25},
    64: {16: 0.45, 64: 0.2, 112: 0.15},
}


@pytest.fixture(scope="module")
def g3_speedup():
    model = LatencyModel(PRESETS["llama-7b"], load_hardware("a100-80gb"), "float16", MEDUSA_G3)
    return {(b, n): estimate_candidates(model, b, 1024, n, MedusaFit()).speedup
            for b in SEED_SPEEDUP for n in (1, 16, 32, 48, 64, 80, 96, 112)}


@pytest.mark.parametrize("batch, candidates", [(1, n) for n in SEED_SPEEDUP[1]] + [(2, 16), (2, 64), (16, 16)])
def test_seed_points_within_10_percent(g3_speedup, batch, candidates):
    assert g3_speedup[batch, candidates] == pytest.approx(SEED_SPEEDUP[batch][candidates], rel=0.10)


def test_seed_shape_claims(g3_speedup):
    assert g3_speedup[1, 1] == pytest.approx(1.0)
    for batch in (32, 64):  # "bs >= 32 never helps"
        assert all(g3_speedup[batch, n] < 1 for n in (16, 32, 48, 64, 80, 96, 112))
    best_bs8 = max((16, 32, 48, 64, 80, 96, 112), key=lambda n: g3_speedup[8, n])
    assert best_bs8 in (16, 32)  # "bs 8 peaks at 16-32"
    for n in (16, 64, 112):  # a larger batch never gains more from a tree of the same size
        speedups = [g3_speedup[b, n] for b in sorted(SEED_SPEEDUP)]
        assert speedups == sorted(speedups, reverse=True)


# ------------------------------------------------------------------ trees and acceptance
def test_tree_facts():
    assert draft_pass_tokens(SpeculativeConfig.parse("rsd-c:b=2-2-1")) == (2, 2, 4)
    assert draft_pass_tokens(SpeculativeConfig.ar()) == ()
    assert accepted_node_children(SpeculativeConfig.parse("spectr:k=4,l=3")) == (4, 1, 1)
    assert accepted_node_children(SpeculativeConfig.parse("rsd-s:w=3,d=3")) == (3, 2, 2)
    family = default_candidates()
    assert SpeculativeConfig.parse("rsd-c:b=2-2-1-1-1") in family and max(c.tree_size for c in family) <= 64
    assert {c.method for c in family} == {"sd", "spectr", "rsd-c", "rsd-s"}


def test_medusa_fit_and_chain_formula():
    assert MedusaFit().for_candidates(64)[0] == pytest.approx(1 + 0.477 * math.log(64))
    assert MedusaFit().block_efficiency(SpeculativeConfig.sd(3)) == pytest.approx(1 + 0.477 * math.log(4))
    chain = TreeAcceptance(0.7, 0.4)
    assert chain.block_efficiency(SpeculativeConfig.sd(4)) == pytest.approx((1 - 0.7**5) / (1 - 0.7))
    assert chain.block_efficiency(SpeculativeConfig.rsd_c((3, 1))) > chain.block_efficiency(SpeculativeConfig.sd(2))


def test_fit_recovers_a_known_pair():
    truth = TreeAcceptance(0.62, 0.35)
    shapes = [SpeculativeConfig.parse(s) for s in ("sd:l=3", "sd:l=6", "rsd-c:b=4-1-1", "rsd-s:w=4,d=4", "spectr:k=3,l=4")]
    fitted = TreeAcceptance.fit([MeasuredPoint(c, truth.block_efficiency(c)) for c in shapes], "test")
    assert fitted.token_acceptance == pytest.approx(0.62, abs=0.011)
    assert fitted.sibling_exponent == pytest.approx(0.35, abs=0.011)
    chains_only = TreeAcceptance.fit([MeasuredPoint(SpeculativeConfig.sd(4), 2.5)], "test")
    assert chains_only.sibling_exponent == CONSERVATIVE_DEFAULT.sibling_exponent


def test_bench_file_and_its_errors(tmp_path):
    path = tmp_path / "bench.json"
    rows = [{"method": "ar", "config": "ar", "budget": 0, "temperature": 0, "block_efficiency": 1.0},
            {"method": "sd", "config": "sd:l=4", "budget": 4, "temperature": 0, "block_efficiency": 2.6},
            {"method": "rsd-s", "config": "rsd-s:w=2,d=3", "budget": 6, "temperature": 1, "block_efficiency": 2.4}]
    path.write_text(json.dumps(rows))
    assert len(load_bench_points(path)) == 2
    assert [p.config.method for p in load_bench_points(path, temperature=1.0)] == ["rsd-s"]
    model = load_acceptance(str(path))
    assert isinstance(model, TreeAcceptance) and "2 measurements" in model.description
    bad = tmp_path / "bad.json"
    for content, message in [("{", "not JSON"), ('{"a": 1}', "JSON list"), ('[{"config": "sd:l=4"}]', "block_efficiency"),
                             ('[{"config": "sd:x=4", "block_efficiency": 2}]', "cannot parse"),
                             ('[{"config": "sd:l=4", "block_efficiency": 0.5}]', ">= 1")]:
        bad.write_text(content)
        with pytest.raises(ValueError, match=message):
            load_bench_points(bad)


def test_measured_acceptance_picks_shapes_for_candidate_counts():
    acceptance = TreeAcceptance(0.6, 0.5)
    efficiency, shape = acceptance.for_candidates(9)
    assert shape.tree_size <= 8 and efficiency == acceptance.block_efficiency(shape)
    assert acceptance.for_candidates(1) == (1.0, SpeculativeConfig.ar())


# ------------------------------------------------------------------ planning
def test_draft_passes_are_charged_and_rank_orders_by_speedup():
    target = LatencyModel(PRESETS["smollm2-135m"], load_hardware("a100-80gb"), "float16")
    draft = LatencyModel(TINY, load_hardware("a100-80gb"), "float16")
    acceptance = TreeAcceptance(0.7, 0.5)
    config = SpeculativeConfig.parse("rsd-c:b=2-2-1")
    with_draft = estimate_config(target, 1, 256, config, acceptance, draft)
    expected_draft = sum(draft.seconds(1, n, 256) for n in (2, 2, 4))
    assert with_draft.draft_seconds == pytest.approx(expected_draft)
    assert with_draft.candidates == config.tree_size + 1
    assert with_draft.speedup < estimate_config(target, 1, 256, config, acceptance).speedup
    ranked = rank(target, 1, 256, acceptance, draft)
    assert [e.speedup for e in ranked] == sorted((e.speedup for e in ranked), reverse=True)
    with pytest.raises(ValueError, match="no tree shape"):
        estimate_candidates(target, 1, 256, 16, MedusaFit(), draft)


# ------------------------------------------------------------------ the command line
def test_simulate_cli_json_csv_and_plots(tmp_path, capsys):
    from hf_specdec.cli import main

    out, report = tmp_path / "out", tmp_path / "sim.json"
    assert main(["simulate", "--operators", "medusa-g3", "--batch", "1,8", "--candidates", "1,16,64",
                 "--json", str(report), "--out", str(out)]) == 0
    rows = json.loads(report.read_text())
    assert len(rows) == 6
    assert {"batch", "candidates", "acc_rate", "normalized_latency", "speedup", "latency_by_group"} <= set(rows[0])
    assert {"qkv", "attention", "mlp"} <= set(rows[0]["latency_by_group"])
    assert sum(rows[1]["latency_by_group"].values()) == pytest.approx(rows[1]["normalized_latency"])
    assert {p.name for p in out.iterdir()} >= {"simulate.csv", "best.csv", "latency_bs1.png", "latency_bs8.png",
                                               "speedup_by_batch.png", "best_by_batch.png"}
    assert "best per batch size" in capsys.readouterr().out


def test_simulate_cli_configs_with_draft(tmp_path, capsys):
    from hf_specdec.cli import main

    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps([{"method": "sd", "config": "sd:l=4", "budget": 4, "temperature": 0,
                                  "block_efficiency": 2.8}]))
    assert main(["simulate", "--model", "smollm2-135m", "--draft", "smollm2-135m", "--hardware", "h100-sxm",
                 "--configs", "sd:l=2;rsd-s:w=2,d=3", "--acceptance", str(bench), "--seq-len", "256"]) == 0
    assert "rsd-s:w=2,d=3" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--hardware", "tpu"], "unknown hardware 'tpu'"),
    (["--model", "gpt2-config.json"], "no config file"),
    (["--acceptance", "missing.json"], "cannot read acceptance file"),
    (["--configs", "sd:l=x"], "cannot parse speculative_config"),
    (["--measure", "--hardware", "h200"], "--measure times this machine"),
    (["--temperature", "1"], "--acceptance medusa has none: drop --temperature"),
    (["--validate", "--device", "cuda"], "only --measure reads --validate and --device"),
])
def test_simulate_cli_bad_input(argv, message, capsys):
    from hf_specdec.cli import main

    assert main(["simulate", *argv]) == 2
    assert message in capsys.readouterr().err


def test_shipped_draft_is_modelled_with_its_reduced_head():
    from hf_specdec.models import DRAFT_DIRS

    draft = load_shape(str(DRAFT_DIRS["standalone"]))
    assert (draft.num_layers, draft.hidden_size, draft.vocab_size) == (2, 576, 8192)


def test_measured_step_times_correct_the_latency_model(tmp_path, monkeypatch):
    """A shape measured slower than predicted is predicted as measured; unmeasured shapes take the median ratio;
    the measured plain-generate token replaces the modelled one-token forward as the baseline."""
    from hf_specdec.planner.planning import StepEstimate
    from hf_specdec.planner.step_times import PLAIN, corrected

    def estimate(config, seconds, efficiency):
        return StepEstimate(batch=1, candidates=4, config=SpeculativeConfig.parse(config), block_efficiency=efficiency,
                            target_seconds={"mlp": seconds}, draft_seconds=0.0, baseline_seconds=1.0)

    estimates = [estimate("sd:l=3", 1.2, 2.0), estimate("rsd-s:w=2,d=3", 1.5, 2.4)]
    assert [round(e.speedup, 3) for e in estimates] == [1.667, 1.6]
    fixed = corrected(estimates, {"sd:l=3": 3.0, PLAIN: 1.5})
    by_config = {str(e.config): e for e in fixed}
    assert by_config["sd:l=3"].seconds == pytest.approx(3.0)
    assert by_config["rsd-s:w=2,d=3"].seconds == pytest.approx(1.5 * 2.5)  # the median ratio 3.0 / 1.2
    assert by_config["sd:l=3"].speedup == pytest.approx(2.0 * 1.5 / 3.0)
    assert corrected(estimates, {}) == estimates


def test_auto_learns_that_trees_do_not_pay_from_measured_steps(tmp_path, monkeypatch, free_loop):
    """Once a step was measured far slower than the latency model said, auto stops choosing trees."""
    from hf_specdec.planner import Hardware, calibration, choose_config, record_acceptance
    from hf_specdec.planner.step_times import PLAIN, record_step_time

    monkeypatch.setenv("HF_SPECDEC_CACHE", str(tmp_path))
    weight_bound = Hardware("weight-bound", matmul_flops=1e14, attention_flops=5e13, bandwidth=1e9,
                            attention_bandwidth=1e9, kernel_overhead=0.0, overlap=True, dtype="float32")
    monkeypatch.setattr(calibration, "calibrated_hardware", lambda model, **_: weight_bound)
    target, draft = tiny_model("llama", vocab_size=96), tiny_model("llama", vocab_size=96, seed=2, num_hidden_layers=1)
    record_acceptance(target, draft, "sd:l=4", 4.5, 100, 1.0)  # a draft that is nearly always right
    chosen = choose_config(target, draft, batch_size=1, context_length=64, temperature=1.0)
    assert chosen.is_speculative
    record_step_time(target, draft, PLAIN, 0.01, 1)
    record_step_time(target, draft, str(chosen.largest_shape()), 0.05, 1)  # five plain tokens' time for one step
    assert choose_config(target, draft, batch_size=1, context_length=64, temperature=1.0).method == "ar"


def test_the_machine_speed_scales_each_model_s_part_of_a_step(tmp_path, monkeypatch):
    """`speed`: the target's forward scales with its factor at the tree's width, the loop's work with the target's
    one-token factor, the draft's passes with the draft's, so the three parts add up to the step."""
    from hf_specdec.planner import MachineSpeed, calibration, machine_speed, predict_step_seconds

    monkeypatch.setenv("HF_SPECDEC_CACHE", str(tmp_path))
    hardware = Hardware("fake", matmul_flops=1e10, attention_flops=1e10, bandwidth=1e9, attention_bandwidth=1e9,
                        kernel_overhead=1e-5, dtype="float32")
    monkeypatch.setattr(calibration, "calibrated_hardware", lambda model, **_: hardware)
    monkeypatch.setattr(loop_cost_module, "loop_cost", lambda *args, **kwargs: LoopCost((1e-3,) + (0.0,) * 5, 0.0))
    target, draft = tiny_model("llama", vocab_size=96), tiny_model("llama", vocab_size=96, seed=2, num_hidden_layers=1)

    def step(speed):
        return predict_step_seconds(target, draft, "rsd-c:b=2-2", 1, 64, corrections=False, speed=speed)

    assert step(MachineSpeed(2.0, 2.0, 2.0)) == pytest.approx(2 * step(MachineSpeed()))
    draft_passes, target_side = step(MachineSpeed(0, 0, 1)), step(MachineSpeed(1, 1, 0))
    assert draft_passes > 0 and target_side + draft_passes == pytest.approx(step(MachineSpeed()))
    target_forward = target_side - 1e-3  # the loop's millisecond is on the target's side
    assert target_forward > 0
    slower = MachineSpeed(2, 1, 0)  # rsd-c:b=2-2 scores 7 tokens: between the anchors
    assert step(slower) == pytest.approx(2 * 1e-3 + slower.target(7) * target_forward)
    monkeypatch.setattr(calibration, "time_forward", lambda model, *args, **kwargs: 3 * 1e-3)
    speed = machine_speed(target, draft, 64)
    assert speed.target_one > speed.target_wide > 0  # the same 3 ms measured: the wide forward is modelled dearer
    assert speed.draft > speed.target_one  # and the draft cheaper


def test_a_forward_between_the_anchors_takes_a_factor_between_theirs():
    from hf_specdec.planner import WIDE_FORWARD_TOKENS, MachineSpeed

    speed = MachineSpeed(target_one=2.0, target_wide=1.0)
    assert speed.target(1) == 2.0 and speed.target(WIDE_FORWARD_TOKENS) == 1.0 and speed.target(64) == 1.0
    assert speed.target(2) > speed.target(7) > speed.target(16) > 1.0
    assert speed.target(4) == pytest.approx(2 ** (1 - math.log(4) / math.log(WIDE_FORWARD_TOKENS)))  # log-linear
    middle = MachineSpeed.median([MachineSpeed(1, 2, 3), MachineSpeed(3, 1, 2), MachineSpeed(2, 3, 1)])
    assert middle == MachineSpeed(2, 2, 2)


def test_growth_threshold_is_the_node_cost_times_the_speedup():
    """A node pays when the probability of reaching it exceeds its share of the step's extra cost times the speedup:
    large where every scored token costs (a CPU), small where the tree is nearly free (a GPU at small batch)."""
    from hf_specdec.planner import dynamic
    from hf_specdec.planner.planning import MAX_GROWTH_Q, MIN_GROWTH_Q, StepEstimate, growth_threshold

    def estimate(step_seconds, efficiency, config="rsd-c:b=2-2-1"):
        shape = SpeculativeConfig.parse(config)
        return StepEstimate(batch=1, candidates=shape.tree_size + 1, config=shape, block_efficiency=efficiency,
                            target_seconds={"mlp": step_seconds}, draft_seconds=0.0, baseline_seconds=1.0)

    cpu = estimate(2.0, 3.0)  # a 10-node tree costs twice one token: each node 1/10 of a token, speedup 1.5
    assert growth_threshold(cpu) == pytest.approx(1 / 10 * 1.5)
    assert growth_threshold(estimate(1.02, 3.0)) == MIN_GROWTH_Q  # nearly free nodes: grow almost everything
    assert growth_threshold(estimate(20.0, 9.0)) == MAX_GROWTH_Q
    assert dynamic(cpu) == SpeculativeConfig.parse("rsd-c:b=2-2-1,q=0.15")
    assert dynamic(estimate(2.0, 1.5, "sd:l=1")) == SpeculativeConfig.parse("sd:l=1")  # nothing to grow


@pytest.mark.parametrize("config, do_sample, expected", [
    # 1, passes, drafted nodes (the pending inputs and the root, then each level's frontier), scored tokens, walk
    # steps (RRS on a tree: min(N, L + P); greedy: L; an RRS chain and SpecTr: none), SpecTr depths
    ("rsd-c:b=2-2", True, [1, 2, 4, 7, 6, 0]),
    ("rsd-c:b=4-1-1", True, [1, 3, 10, 13, 7, 0]),
    ("sd:l=5", True, [1, 5, 6, 6, 0, 0]),
    ("spectr:k=3,l=4", True, [1, 4, 11, 13, 0, 4]),
    ("rsd-s:w=3,d=4", False, [1, 4, 11, 13, 4, 0]),
])
def test_loop_cost_terms_by_hand(config, do_sample, expected):
    assert terms(SpeculativeConfig.parse(config), do_sample).tolist() == expected


def test_loop_cost_fit_recovers_known_coefficients_and_predicts_other_shapes():
    truth = LoopCost((2e-3, 1e-3, 3e-4, 1e-4, 5e-4, 3e-3), 1e-3)
    design = list(loop_cost_module.DESIGN)
    fitted = fit([(c, truth.seconds(SpeculativeConfig.parse(c))) for c in design], 1e-3, do_sample=True)
    assert fitted.coefficients == pytest.approx(truth.coefficients, rel=1e-6)
    for config in ("rsd-s:w=3,d=10", "spectr:k=3,l=10", "sd:l=30"):
        shape = SpeculativeConfig.parse(config)
        assert fitted.seconds(shape) == pytest.approx(truth.seconds(shape), rel=1e-6)
    assert fitted.seconds(SpeculativeConfig.ar()) == 1e-3  # plain decoding: HF generate's own work per token
    assert LoopCost.from_json(json.loads(json.dumps(fitted.to_json()))) == fitted


def test_the_loop_cost_is_charged_per_step_and_to_plain_decoding():
    """The step adds the loop's work; the baseline adds HF generate's: a deep tree's loop cost can sink its speedup."""
    target = LatencyModel(PRESETS["llama-7b"], load_hardware("a100-80gb"), "float16")
    acceptance = TreeAcceptance(0.8, 0.5)
    config = SpeculativeConfig.parse("rsd-s:w=4,d=8")
    bare = estimate_config(target, 1, 256, config, acceptance)
    loop = LoopCost((1e-3, 0.0, 0.0, 0.0, 0.0, 0.0), 2e-4)
    charged = estimate_config(target, 1, 256, config, acceptance, loop=loop)
    assert charged.seconds == pytest.approx(bare.seconds + 1e-3)
    assert charged.baseline_seconds == pytest.approx(bare.baseline_seconds + 2e-4)
    assert charged.normalized_by_group()["loop"] == pytest.approx(1e-3 / charged.baseline_seconds)
    slow_loop = LoopCost((0.0, 0.0, 0.0, 0.0, 0.1, 0.0), 0.0)  # 100 ms per verification walk step
    assert rank(target, 1, 256, acceptance, candidates=[config, SpeculativeConfig.parse("sd:l=2")],
                loop=slow_loop)[0].config == SpeculativeConfig.parse("sd:l=2")


def test_sampling_settings_key_the_measurement():
    from transformers import GenerationConfig

    assert Sampling.of(GenerationConfig(do_sample=False, top_k=5)) == Sampling.greedy()
    assert Sampling.of(GenerationConfig(do_sample=True, top_k=0, top_p=0.9)) == Sampling(True, 0, 0.9, None)
    keys = {Sampling.greedy().key(), Sampling().key(), Sampling(True, 0, 1.0).key(), Sampling(True, 50, 0.9).key()}
    assert len(keys) == 4
    assert Sampling.greedy().generate_kwargs() == {"do_sample": False}


@pytest.mark.parametrize("kind", ["standalone", "feature"])
def test_loop_cost_is_measured_once_with_near_free_stand_ins(kind, tmp_path, monkeypatch):
    """The design shapes run in the real loop with stand-ins of the pair's kind and vocabulary; the result is cached."""
    from feature_fixtures import tiny_feature_draft

    from hf_specdec.feature_draft import reads_target_features

    monkeypatch.setenv("HF_SPECDEC_CACHE", str(tmp_path))
    target = tiny_model("llama", vocab_size=96)
    draft = tiny_feature_draft(target, kept_token_ids=list(range(0, 96, 2))) if kind == "feature" else \
        tiny_model("llama", vocab_size=96, seed=2, num_hidden_layers=1)
    stand_in_target, stand_in_draft = loop_cost_module.near_free_pair(target, draft)
    assert stand_in_target.config.vocab_size == 96
    assert reads_target_features(stand_in_draft) == (kind == "feature")
    if kind == "feature":
        assert stand_in_draft.config.kept_token_ids == draft.config.kept_token_ids
    monkeypatch.setattr(loop_cost_module, "DESIGN", ("sd:l=1", "sd:l=3", "rsd-c:b=2-2", "spectr:k=2,l=2"))
    cost = loop_cost_module.loop_cost(target, draft, 2, Sampling(), progress=False)
    assert [config for config, _ in cost.samples] == list(loop_cost_module.DESIGN)
    assert all(seconds > 0 for _, seconds in cost.samples) and cost.plain_seconds > 0
    assert cost.seconds(SpeculativeConfig.parse("rsd-c:b=2-2")) > 0

    def measured_again(*args, **kwargs):
        raise RuntimeError("measured again")

    monkeypatch.setattr(loop_cost_module, "measure_loop_cost", measured_again)
    assert loop_cost_module.loop_cost(target, draft, 2, Sampling(), progress=False) == cost
    monkeypatch.setattr(loop_cost_module, "_LOADED", {})  # another process: read back from the cache
    assert loop_cost_module.loop_cost(target, draft, 2, Sampling(), progress=False) == cost
    monkeypatch.setattr(loop_cost_module, "_LOADED", {})
    monkeypatch.setattr(loop_cost_module, "loop_code_fingerprint", lambda: "another loop")  # a new release's loop
    with pytest.raises(RuntimeError, match="measured again"):
        loop_cost_module.loop_cost(target, draft, 2, Sampling(), progress=False)
    for batch, sampling in ((2, Sampling.greedy()), (1, Sampling())):  # another setting is another measurement
        with pytest.raises(RuntimeError, match="measured again"):
            loop_cost_module.loop_cost(target, draft, batch, sampling, progress=False)

"""The bench plumbing on a tiny pair: every method runs, metrics are consistent, outputs are written."""

from __future__ import annotations

import argparse
import json
import math
import re
from types import SimpleNamespace

import pytest
import torch
from feature_fixtures import tiny_feature_draft
from tiny_models import character_tokenizer, perturbed_copy, tiny_model, word_tokenizer

from hf_specdec.bench import Bench, bootstrap_ratio_ci, config_for_budget, relate_to_plain, settings_for
from hf_specdec.config import SpeculativeConfig
from hf_specdec.cli import build_parser
from hf_specdec.cli import main as cli_main
from hf_specdec.cli.bench import format_table, load_export, plot_grid, resolve_defaults, write_csv, write_json
from hf_specdec.export.manifest import MANIFEST_FILE

KEYS = {"method", "config", "budget", "temperature", "block_efficiency", "mbsu", "tokens_per_s", "speedup", "accuracy"}


@pytest.fixture(scope="module")
def records():
    target = tiny_model("llama", vocab_size=96, scale=0.3)
    target.generation_config.eos_token_id = None
    drafts = {"feature": tiny_feature_draft(target), "standalone": perturbed_copy(target, noise=0.05)}
    bench = Bench(target, drafts, character_tokenizer(), ["abc", "hello world"], max_new_tokens=12, predict=False)
    settings = settings_for(["ar", "ar-loop", "hf-assisted", "sd", "spectr", "rsd-c", "rsd-s", "auto"], [6, 10], [1.0, 0.0],
                            drafts=["feature", "standalone"], assistant="standalone")
    out = [bench.run(setting) for setting in settings]
    relate_to_plain(out)
    return out


def test_every_setting_is_measured(records):
    methods = {r.method for r in records}
    assert methods == {"ar", "ar-loop", "hf-assisted", "sd", "spectr", "rsd-c", "rsd-s", "auto"}
    for r in records:
        assert r.generated_tokens == 24 and r.tokens_per_s > 0 and r.target_calls > 0
        assert 1.0 <= r.block_efficiency <= r.budget + 1 or r.method in ("ar", "auto")
        assert r.mbsu <= r.block_efficiency
    assert all(r.block_efficiency == 1.0 for r in records if r.method in ("ar", "ar-loop"))
    assert {(r.budget, r.draft) for r in records if r.method == "rsd-s"} == {
        (b, d) for b in (6, 10) for d in ("feature", "standalone")}
    assert {r.draft for r in records if r.method == "hf-assisted"} == {"standalone"}
    assert all(r.draft == "" and r.draft_calls == 0 for r in records if r.method in ("ar", "ar-loop"))
    assert all(r.ran for r in records if r.method == "auto") and not any(r.ran for r in records if r.method != "auto")


def test_block_efficiency_interval_over_prompts(records):
    """Each record keeps every prompt's tokens and target forwards; the block efficiency is their ratio of sums, and
    its 95% interval (prompts resampled) lies between the least and the most efficient prompt's."""
    for r in records:
        assert len(r.prompt_tokens) == len(r.prompt_target_calls) == 2
        assert sum(r.prompt_tokens) == r.generated_tokens and sum(r.prompt_target_calls) == r.target_calls
        per_prompt = [tokens / calls for tokens, calls in zip(r.prompt_tokens, r.prompt_target_calls)]
        low, high = r.block_efficiency_ci
        assert min(per_prompt) - 1e-9 <= low <= r.block_efficiency <= high <= max(per_prompt) + 1e-9, r.config
    assert all(r.block_efficiency_ci == (1.0, 1.0) for r in records if r.method in ("ar", "ar-loop"))


def test_bootstrap_interval_of_a_ratio():
    assert bootstrap_ratio_ci([4, 6, 8], [2, 3, 4]) == pytest.approx((2.0, 2.0))  # every prompt at 2: no spread
    low, high = bootstrap_ratio_ci([10, 30], [10, 10])
    assert low == pytest.approx(1.0) and high == pytest.approx(3.0)  # a resample of prompt 1 only, of prompt 2 only


def test_greedy_accuracy_is_exactly_one(records):
    """Greedy speculative decoding reproduces plain greedy decoding, so the log-likelihood ratio is exactly 1."""
    for r in records:
        if r.temperature == 0:
            assert r.accuracy == pytest.approx(1.0, abs=1e-6), r.config


def test_outputs(records, tmp_path):
    write_json(records, tmp_path / "bench.json")
    data = json.loads((tmp_path / "bench.json").read_text())
    assert len(data) == len(records) and all(KEYS <= set(item) for item in data)
    assert all(len(item["block_efficiency_ci"]) == 2 and len(item["prompt_target_calls"]) == 2 for item in data)
    write_csv(records, tmp_path / "bench.csv")
    assert (tmp_path / "bench.csv").read_text().count("\n") == len(records) + 1
    plot_grid(records, tmp_path / "bench.png")
    assert (tmp_path / "bench.png").stat().st_size > 10_000
    assert "rsd-s:w=2,d=3" in format_table(records)


def test_plot_titles_name_the_metrics(records, tmp_path, monkeypatch):
    import matplotlib.figure

    titles = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda figure, *args, **kwargs: titles.extend(axis.get_title() for axis in figure.axes))
    plot_grid(records, tmp_path / "bench.png")
    assert titles == [f"{metric}, {temperature}" for temperature in ("T=1", "greedy")
                      for metric in ("block efficiency", "MBSU", "token rate (x plain)", "accuracy")]


def test_the_planner_predicts_the_steps_at_the_depths_they_drafted(monkeypatch):
    """The prediction covers the steps that ran: near the end of a generation the loop drafts no deeper than the
    tokens left allow, and each step is predicted at its own depth."""
    from hf_specdec import planner

    target = tiny_model("llama", vocab_size=96, scale=0.3)
    draft = perturbed_copy(target, noise=0.05)
    bench = Bench(target, {"draft": draft}, character_tokenizer(), ["abc"], max_new_tokens=8)
    speculative, plain = settings_for(["sd", "ar"], [6], [0.0])  # sd:l=6, 8 new tokens
    record = bench.run(speculative)  # the real planner
    assert record.predicted_step_ms > 0 and record.step_ms > 0
    assert math.isnan(bench.run(plain).predicted_step_ms)

    # a step model of 1 ms per drafted token (a plain step: 1 ms): the steps' mean at their depths
    monkeypatch.setattr(planner, "predict_step_seconds", lambda target, draft, config, *args, **kwargs:
                        1e-3 * max(config.tree_size, 1))
    torch.manual_seed(bench.seed)
    _, stats = bench._generate(speculative, bench.prompt_ids[0], bench.max_new_tokens)
    depths = bench.drafted_depths(speculative, stats)
    generated = [0]
    for accepted in stats.accepted_lengths[0][:-1]:
        generated.append(generated[-1] + accepted + 1)
    assert depths == [min(6, 8 - g - 1) for g in generated] and min(depths) < 6
    record = bench.run(speculative)
    assert record.predicted_step_ms == pytest.approx(sum(max(d, 1) for d in depths) / len(depths))


def test_a_config_truncated_to_fewer_levels():
    assert SpeculativeConfig.parse("rsd-c:b=3-2-1,q=0.1").truncated(2) == SpeculativeConfig.parse("rsd-c:b=3-2")
    assert SpeculativeConfig.parse("rsd-s:w=3,d=5").truncated(2) == SpeculativeConfig.parse("rsd-s:w=3,d=2")
    assert SpeculativeConfig.parse("spectr:k=2,l=4").truncated(9) == SpeculativeConfig.parse("spectr:k=2,l=4")
    assert SpeculativeConfig.parse("sd:l=4").truncated(0) == SpeculativeConfig.ar()


def test_budget_shapes():
    for budget in (6, 10, 14, 21, 30):
        for method in ("sd", "spectr", "rsd-c", "rsd-s"):
            assert config_for_budget(method, budget).tree_size == budget
    assert math.isclose(config_for_budget("sd", 6).depth, 6)


def test_onnxruntime_settings_run_on_the_exported_pair(tmp_path_factory):
    """`--backends pytorch,onnxruntime`: the same pair on both runtimes, speedups relative to plain generate."""
    from onnx_fixtures import export_tiny_pair, tiny_pair

    from hf_specdec.export.ort_backend import load_onnxruntime_pair

    target, draft = tiny_pair("llama")  # the models `export_tiny_pair` exports (seeded)
    model_dir = export_tiny_pair(tmp_path_factory, "llama")
    bench = Bench(target, {"draft": draft}, word_tokenizer(96), ["t1 t5 t9 t4", "t1 t7"], max_new_tokens=10,
                  exported=load_onnxruntime_pair(model_dir))
    settings = settings_for(["ar", "rsd-s", "auto"], [6], [0.0], ["pytorch", "onnxruntime"])
    records = [bench.run(setting) for setting in settings]
    relate_to_plain(records)
    assert [(r.backend, r.method) for r in records] == [
        ("pytorch", "ar"), ("pytorch", "rsd-s"), ("pytorch", "auto"),
        ("onnxruntime", "ar"), ("onnxruntime", "rsd-s"), ("onnxruntime", "auto")]
    # auto on the export runs the config its manifest keeps
    assert records[-1].ran == bench.exported.manifest.speculative_config
    for r in records:  # greedy: every backend and method generates the same tokens
        assert r.accuracy == pytest.approx(1.0, abs=1e-5) and r.generated_tokens == 20
    assert records[0].speedup == 1.0


def test_step_overhead_table(tmp_path):
    """`hf-specdec bench --overhead`: every (vocabulary, batch, tree) cell is measured, forwards are subtracted."""
    from hf_specdec.cli import main

    path = tmp_path / "overhead.json"
    assert main(["bench", "--overhead", "--vocabs", "512", "--batches", "1,2", "--max-new-tokens", "6",
                 "--json", str(path)]) == 0
    records = json.loads(path.read_text())
    assert {(r["batch"], r["tree_size"]) for r in records} == {(b, t) for b in (1, 2) for t in (0, 4, 16, 32)}
    for record in records:
        assert record["steps"] > 0 and record["forward_ms_per_step"] > 0 and math.isfinite(record["overhead_ms_per_step"])


@pytest.mark.parametrize("arguments, message", [
    (["--methods", "ar,bogus"], "unknown --methods bogus"),
    (["--backends", "pytorch,tpu"], "unknown --backends tpu"),
    (["--budgets", "7"], "no spectr shape for budget 7"),
    (["--backends", "onnxruntime", "--model-dir", "d", "--methods", "ar,sd,ar-loop"], "run none of --methods ar-loop"),
    (["--backends", "llama.cpp", "--methods", "ar,sd"], "run none of --methods sd"),
    (["--target", "t", "--draft", "d", "--draft-kinds", "feature"], "--draft-kinds picks embedded drafts"),
    (["--model-dir", "d"], "--model-dir is for --backends onnxruntime"),
    (["--quantize", "int4"], "--quantize is for --backends onnxruntime"),
    (["--gguf", "x.gguf"], "--gguf is for --backends llama.cpp or --quantize"),
    (["--methods", "ar,sd", "--assistant", "a"], "--assistant is for --methods hf-assisted"),
    (["--methods", "ar,sd", "--assistant-tokens", "3"], "--assistant-tokens is for --methods hf-assisted"),
    (["--backends", "pytorch,onnxruntime", "--model-dir", "d", "--quantize", "int4", "--gguf", "missing.gguf"],
     "--gguf missing.gguf: no such file"),
    (["--overhead", "--prompts", "3", "--seed", "0", "--csv", "x.csv"], "would ignore --prompts, --seed, --csv"),
    (["--overhead", "--max-new-tokens", "64"], "at most 32 new tokens"),
    (["--vocabs", "512", "--device", "cpu"], "only --overhead reads --vocabs, --device"),
])
def test_command_line_refuses_what_it_would_not_run_or_would_ignore(arguments, message):
    """Each refusal comes before any model loads (a traceback or a load would fail differently)."""
    with pytest.raises(SystemExit, match=re.escape(message)):
        cli_main(["bench", *arguments])


def test_quick_sizes_never_override_explicit_ones():
    """`--quick --prompts 10`: 10 prompts, although 10 is also the full run's default."""
    args = build_parser().parse_args(["bench", "--quick", "--prompts", "10", "--budgets", "6,10,14,21,30"])
    resolve_defaults(args)
    assert (args.prompts, args.max_new_tokens, args.budgets) == (10, 64, [6, 10, 14, 21, 30])
    args = build_parser().parse_args(["bench"])
    resolve_defaults(args)
    assert (args.prompts, args.max_new_tokens, args.budgets, args.backends) == (10, 128, [6, 10, 14, 21, 30], ["pytorch"])


def test_onnxruntime_rows_refuse_an_export_of_another_draft_kind(tmp_path, monkeypatch):
    """An export in --model-dir with a feature draft is not timed as the standalone draft's rows, nor the other way."""
    (tmp_path / MANIFEST_FILE).write_text("{}")  # an export is there: none is made
    manifest = SimpleNamespace(target=SimpleNamespace(quantization=None), draft=SimpleNamespace(reads_features=True))
    monkeypatch.setattr("hf_specdec.export.ort_backend.load_onnxruntime_pair",
                        lambda model_dir: SimpleNamespace(manifest=manifest))
    args = argparse.Namespace(model_dir=tmp_path, quantize="none", target=None, draft=None, gguf=None)
    feature_draft = SimpleNamespace(reads_target_features=True)
    assert load_export(args, None, feature_draft, None).manifest is manifest
    with pytest.raises(SystemExit, match="holds an export with a feature draft but the onnxruntime rows run a "
                                         "standalone draft: give --model-dir another directory"):
        load_export(args, None, SimpleNamespace(), None)

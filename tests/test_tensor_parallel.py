"""A target sharded with transformers' tensor parallelism (tp_plan="auto", 2 processes, gloo on the CPU) runs the same
speculative loop in lockstep: greedy output identical to the unsharded model for every method, batch 1 and 3 with
left padding; sampled output identical on both ranks and equal to the unsharded run with the same seed; a rank made
to diverge fails fast with RanksDivergedError instead of hanging. The ranks run tests/tensor_parallel_worker.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from tiny_models import character_tokenizer, perturbed_copy, tiny_model

from hf_specdec import speculative_generate
from hf_specdec.distributed import check_sharded_pair, fingerprint

WORKER = Path(__file__).parent / "tensor_parallel_worker.py"
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tp-models")
    for family in ("llama", "qwen2"):
        target = tiny_model(family, vocab_size=96, scale=0.3)
        target.generation_config.eos_token_id = None
        target.save_pretrained(root / family / "target")
        character_tokenizer().save_pretrained(root / family / "target")
        perturbed_copy(target, noise=0.05).save_pretrained(root / family / "draft")
    return root


def torchrun(*arguments: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """2 processes on this machine; fails the test with the ranks' own tracebacks."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parent.parent))
    # --standalone: a rendezvous on a free port of this machine
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *arguments]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    ranks = "\n".join(line for line in finished.stderr.splitlines() if line.startswith("[rank"))
    assert finished.returncode == 0, ranks[-4000:] or finished.stderr[-4000:]
    return finished


def run_ranks(models: Path, out: Path, *extra: str, timeout: int = 600) -> list[dict]:
    out.mkdir()
    torchrun(str(WORKER), str(models), str(out), *extra, timeout=timeout)
    return [json.loads((out / f"rank-{rank}.json").read_text()) for rank in range(2)]


@pytest.fixture(scope="module")
def reports(saved_models, tmp_path_factory) -> list[dict]:
    return run_ranks(saved_models, tmp_path_factory.mktemp("tp-out") / "compare")


def test_greedy_output_is_the_unsharded_models(reports):
    greedy = [case for case in reports[0]["cases"] if not case["do_sample"]]
    assert {case["method"] for case in greedy} >= {"sd:l=4", "spectr:k=3,l=3", "rsd-c:b=2-2-1", "rsd-s:w=3,d=4"}
    assert {case["family"] for case in greedy} == {"llama", "qwen2"} and {case["batch"] for case in greedy} == {1, 3}
    for case in greedy:  # the unsharded model's speculative run and its plain generate()
        assert case["sharded"] == case["unsharded"], f"{case['family']} {case['method']} batch {case['batch']}"
        assert case["sharded"] == case["plain generate"], f"{case['family']} {case['method']} batch {case['batch']}"


def test_sampled_output_is_the_same_on_every_rank_and_the_unsharded_runs(reports):
    assert any(case["do_sample"] for case in reports[0]["cases"])
    for first, second in zip(reports[0]["cases"], reports[1]["cases"]):
        assert first["sharded"] == second["sharded"], f"ranks disagree: {first['method']} batch {first['batch']}"
        if first["do_sample"]:
            # the same seed gives the unsharded run the same draws; the logits agree to rounding
            assert first["sharded"] == first["unsharded"], f"{first['family']} {first['method']} batch {first['batch']}"


def test_collective_calls_per_step(reports):
    """A speculative step makes the collectives of one target forward plus one lockstep check (all-gather); the
    replicated draft makes none. Plain decoding makes one forward's worth per token."""
    counts = reports[0]["collectives"]
    per_forward = counts["plain generate"]["calls"] / (counts["plain generate"]["target_calls"])
    tree = counts["rsd-s:w=3,d=4"]
    # prefill + steps forwards, each with a lockstep check, + the check of the output and the random-state broadcast
    # (broadcast_object_list: the sizes, then the states)
    assert tree["calls"] == (tree["target_calls"] + 1) * (per_forward + 1) + 1 + 2, counts
    assert tree["target_calls"] < tree["generated_tokens"]


def test_clear_errors(reports):
    errors = reports[0]["errors"]
    assert "not available on a tensor-parallel target" in errors["auto"]
    assert "shards none of the weights of decoder layers [1]" in errors["layer 1 unsharded"]


def test_a_diverging_rank_fails_fast(saved_models, tmp_path):
    reports = run_ranks(saved_models, tmp_path / "diverge", "--diverge", timeout=300)
    for report in reports:
        assert report["error"] is not None and "disagree with rank 0" in report["error"]


def test_fingerprint_tells_tensors_apart():
    tokens = torch.tensor([[5, 7, 9]])
    assert torch.equal(fingerprint([tokens]), fingerprint([tokens.clone()]))
    assert not torch.equal(fingerprint([tokens]), fingerprint([tokens.flip(-1)]))
    assert not torch.equal(fingerprint([tokens]), fingerprint([tokens[:, :2]]))


def test_unsharded_pair_is_left_alone():
    target = tiny_model("llama")
    assert check_sharded_pair(target, perturbed_copy(target, 0.1)) is None
    out = target.generate(torch.tensor([[5, 6, 7]]), do_sample=False, max_new_tokens=4, pad_token_id=0,
                          custom_generate=speculative_generate, draft_model=perturbed_copy(target, 0.1),
                          speculative_config="sd:l=2")
    assert out.shape == (1, 7)


def test_generate_command_prints_once(saved_models, tmp_path):
    # each rank's stdout and stderr in its own file (--redirects 3), so that lines of the two ranks cannot interleave
    torchrun("--log-dir", str(tmp_path), "--redirects", "3", "-m", "hf_specdec", "generate", "--tp-plan", "auto",
             "--target", str(saved_models / "llama" / "target"), "--draft", str(saved_models / "llama" / "draft"),
             "--raw", "--config", "rsd-s:w=2,d=3", "--greedy", "--max-new-tokens", "12", "--no-stream", "hello",
             timeout=300)
    logs = {path.parent.name + "/" + path.name: path.read_text() for path in tmp_path.rglob("std*.log")}
    stdout = {name: text for name, text in logs.items() if name.endswith("stdout.log")}
    stderr = {name: text for name, text in logs.items() if name.endswith("stderr.log")}
    assert len(stdout) == 2 and sum(bool(text.strip()) for text in stdout.values()) == 1, logs
    assert sum(text.count("[rsd-s:w=2,d=3: 12 tokens") for text in stderr.values()) == 1, logs

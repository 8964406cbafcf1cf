"""The prepared GPU check (`examples/gpu_check.py`) runs its CPU part here, so that it works the day a GPU is lent, and
it fails, exit status 1, when a check it runs fails."""

import dataclasses
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "gpu_check.py"


@pytest.fixture
def gpu_check(monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "DEVICE", "cpu")
    return module


def test_dry_run_passes(gpu_check, capsys):
    assert gpu_check.main(["--dry-run"]) == 0
    assert "all checks passed" in capsys.readouterr().out


def test_a_wrong_verifier_fails_the_check(gpu_check, monkeypatch, capsys):
    import hf_specdec.verify_batched as verify_batched

    correct = verify_batched.verify_tree_batched

    def off_by_one(inputs):
        result = correct(inputs)
        return dataclasses.replace(result, next_tokens=result.next_tokens + 1)

    monkeypatch.setattr(verify_batched, "verify_tree_batched", off_by_one)
    results = {}
    gpu_check.check_verifiers(results, cases=1)
    assert results["failures"] == [f"verifier mismatches vs reference ({rule}, 1 batches of 8)"
                                   for rule in ("rrs", "spectr", "greedy")]
    assert all(results[name]["triton"] == 0 and results[name]["batched"] == 1 for name in results["failures"])
    assert gpu_check.verdict(results) == 1
    assert "FAILED: verifier mismatches" in capsys.readouterr().out

"""The llama.cpp rows of the bench: plain decoding through llama-cpp-python (an optional dependency, not installed by
default: the tests that run it skip without it), and the bench plumbing around it with a stand-in runner."""

from __future__ import annotations

import argparse
import sys

import pytest
import torch
from tiny_models import tiny_model, word_tokenizer

from hf_specdec import llama_cpp_runner
from hf_specdec.bench import Bench, relate_to_plain, settings_for
from hf_specdec.llama_cpp_runner import CMAKE_ARGS, LlamaCppGeneration, LlamaCppRunner, LlamaCppUnavailable


def test_without_llama_cpp_python_the_error_says_how_to_build_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    with pytest.raises(LlamaCppUnavailable) as error:
        LlamaCppRunner(tmp_path / "model.gguf")
    message = str(error.value)
    assert "pip install llama-cpp-python" in message and CMAKE_ARGS in message and "Illegal instruction" in message
    for flag in ("-DGGML_NATIVE=OFF", "-DGGML_AVX2=ON", "-DGGML_AVX512=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF"):
        assert flag in CMAKE_ARGS


def test_the_bench_skips_llama_cpp_rows_without_it(monkeypatch, capsys):
    from hf_specdec.cli.bench import load_llama_cpp

    monkeypatch.setattr(llama_cpp_runner, "available", lambda: False)
    assert load_llama_cpp(argparse.Namespace(gguf=None, target=None), tokenizer=None) is None
    assert "skipping the llama.cpp rows" in capsys.readouterr().err


class StandInRunner:
    """Replays the PyTorch target's own greedy continuation, as llama.cpp would on the same weights; with prompt
    lookup, as if every step kept `accepted` tokens."""

    path = None

    def __init__(self, target, accepted: int = 1):
        self.target, self.calls, self.accepted, self.lookups = target, [], accepted, {}

    def prompt_lookup(self, tokens):
        return self.lookups.setdefault(tokens, StandInRunner(self.target, accepted=3))

    def generate(self, prompt_ids, max_new_tokens, temperature=0.0, seed=0, eos_token_ids=None):
        self.calls.append((len(prompt_ids), max_new_tokens, temperature, seed, eos_token_ids))
        out = self.target.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=max_new_tokens,
                                   pad_token_id=0)
        tokens = out[0, len(prompt_ids):].tolist()
        return LlamaCppGeneration(tokens, 0.001, 0.01, -(-len(tokens) // self.accepted))


def test_llama_cpp_rows_in_the_bench():
    target = tiny_model("llama", vocab_size=96, scale=0.3)
    target.generation_config.eos_token_id = None
    runner = StandInRunner(target)
    bench = Bench(target, {}, word_tokenizer(96), ["t1 t5 t9 t4", "t1 t7"], max_new_tokens=6, llama_cpp=runner,
                  predict=False)
    settings = settings_for(["ar", "rsd-s", "prompt-lookup"], [6], [0.0, 1.0], ["pytorch", "llama.cpp"], drafts=(),
                            weights={"llama.cpp": "gguf:Q4_1"})
    assert [(s.backend, s.method, s.temperature, s.weights) for s in settings if s.backend == "llama.cpp"] == [
        ("llama.cpp", "ar", 0.0, "gguf:Q4_1"), ("llama.cpp", "prompt-lookup", 0.0, "gguf:Q4_1"),
        ("llama.cpp", "ar", 1.0, "gguf:Q4_1"), ("llama.cpp", "prompt-lookup", 1.0, "gguf:Q4_1")]  # no trees there
    assert all(s.backend == "llama.cpp" for s in settings if s.method == "prompt-lookup")
    lookup = bench.run(next(s for s in settings if s.method == "prompt-lookup"))
    # its own runner (llama-cpp-python's prompt lookup), its forwards counted: 3 tokens a forward here
    assert runner.lookups[10].calls and lookup.target_calls == 4 and lookup.block_efficiency == 3.0
    records = [bench.run(s) for s in settings if s.method == "ar"]
    relate_to_plain(records)
    greedy = next(r for r in records if r.backend == "llama.cpp" and r.temperature == 0)
    assert greedy.generated_tokens == 12 and greedy.target_calls == 12 and greedy.block_efficiency == 1.0
    assert greedy.weights == "gguf:Q4_1" and greedy.accuracy == pytest.approx(1.0, abs=1e-6)
    assert greedy.step_ms == pytest.approx(1.5)  # (0.01 - 0.001) s after the first token, 6 tokens per prompt
    assert {call[2] for call in runner.calls} == {0.0, 1.0}
    assert [call[1] for call in runner.calls] == [4, 6, 6] * 2  # per setting: a warm-up, then each prompt


@pytest.fixture(scope="module")
def packaged_gguf():
    pytest.importorskip("llama_cpp", reason=llama_cpp_runner.INSTALL_HINT)
    from hf_specdec import models

    try:
        return models._target_package_dir() / models.TARGET_GGUF_FILE
    except ImportError as error:
        pytest.skip(str(error))


def test_llama_cpp_decodes_the_packaged_gguf(packaged_gguf):
    runner = LlamaCppRunner(packaged_gguf, threads=1, context=256)
    assert runner.vocab_size == 49152
    prompt = [1, 504, 3458, 282]  # any ids of the vocabulary
    greedy = runner.generate(prompt, 8)
    assert len(greedy.tokens) <= 8 and all(0 <= t < runner.vocab_size for t in greedy.tokens)
    assert runner.generate(prompt, 8).tokens == greedy.tokens  # greedy: the same tokens from an empty cache
    sampled = runner.generate(prompt, 8, temperature=1.0, seed=3)
    assert runner.generate(prompt, 8, temperature=1.0, seed=3).tokens == sampled.tokens  # seeded
    assert 0 < greedy.prefill_seconds <= greedy.seconds
    assert greedy.forwards == len(greedy.tokens)  # plain decoding: the prompt's forward, then one per token


def test_prompt_lookup_speculation_in_llama_cpp(packaged_gguf):
    """llama-cpp-python's prompt lookup on the same GGUF: a prompt that repeats itself is copied several tokens a
    forward, and the greedy text is plain decoding's."""
    runner = LlamaCppRunner(packaged_gguf, threads=1, context=256)
    lookup = runner.prompt_lookup(10)
    assert runner.prompt_lookup(10) is lookup and lookup.prompt_lookup_tokens == 10
    prompt = [1, 504, 3458, 282, 1116, 314, 253, 504, 3458, 282, 1116, 314, 253, 504, 3458]
    plain, fast = runner.generate(prompt, 24), lookup.generate(prompt, 24)
    assert fast.tokens == plain.tokens
    assert fast.forwards < plain.forwards

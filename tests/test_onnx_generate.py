"""The speculative loop on ONNX Runtime: greedy output token-identical to PyTorch for every method, generation options
applied as generate applies them, and the command line end to end."""

from __future__ import annotations

import re

import pytest
import torch
from onnx_fixtures import export_tiny_pair, tiny_pair
from tiny_models import left_padded_prompts
from transformers import GenerationConfig

from hf_specdec import speculative_generate
from hf_specdec.cli import main as cli_main
from hf_specdec.export.ort_backend import load_onnxruntime_pair
from hf_specdec.generation import decode

METHODS = ["ar", "sd:l=4", "spectr:k=3,l=3", "rsd-c:b=2-2-1", "rsd-s:w=3,d=4"]
NEW_TOKENS = 40


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def pair(request, tmp_path_factory):
    """(PyTorch target, PyTorch draft, the exported pair on ONNX Runtime)."""
    target, draft = tiny_pair(request.param)
    return target, draft, load_onnxruntime_pair(export_tiny_pair(tmp_path_factory, request.param))


@pytest.fixture(scope="module")
def batch():
    return left_padded_prompts([0, 2, 4], 9, 96, seed=7)


def decode_onnxruntime(exported, batch, method, **options):
    config = GenerationConfig(do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=0, **options)
    return decode(exported.target, exported.draft, batch["input_ids"], config, method, batch["attention_mask"])


@pytest.mark.parametrize("method", METHODS)
def test_greedy_is_token_identical_to_pytorch(pair, batch, method):
    target, draft, exported = pair
    speculative = dict(custom_generate=speculative_generate, draft_model=draft, speculative_config=method)
    reference = target.generate(**batch, do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=0, **speculative)
    assert torch.equal(reference, target.generate(**batch, do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=0))
    result = decode_onnxruntime(exported, batch, method)
    assert torch.equal(result.sequences, reference), f"{method}: ONNX Runtime differs from PyTorch"
    if method != "ar":
        assert result.stats.block_efficiency > 1.2, "the draft should be accepted often enough to exercise the tree"

    # an eos inside the output stops each row where plain generate stops it (rows then finish at different steps)
    eos = int(reference[0, batch["input_ids"].shape[1] + 10])
    reference = target.generate(**batch, do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=0, eos_token_id=eos)
    result = decode_onnxruntime(exported, batch, method, eos_token_id=eos)
    assert torch.equal(result.sequences, reference), f"{method}: differs with eos={eos}"


def test_the_loop_runs_on_one_pytorch_thread_beside_onnx_runtime(pair, batch, monkeypatch):
    """ONNX Runtime on the CPU has its own threads: the loop's tensor work between its runs uses one PyTorch thread
    (PyTorch's spinning OpenMP threads would take the cores from the next run), and the setting comes back after
    the call, also when it fails."""
    _, _, exported = pair
    assert exported.target.host_threads == exported.draft.host_threads == 1
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # as on a 2-core machine, wherever the test runs
    settings = []
    monkeypatch.setattr(torch, "set_num_threads", settings.append)
    seen = []
    original = type(exported.target).forward

    def forward(self, *args, **kwargs):
        seen.append(settings[-1] if settings else None)
        if len(seen) == 3 and fail:
            raise RuntimeError("a failing run")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(exported.target), "forward", forward)
    fail = False
    decode_onnxruntime(exported, batch, "rsd-s:w=2,d=2")
    assert seen and set(seen) == {1} and settings[-1] == 2
    settings.clear(), seen.clear()
    fail = True
    with pytest.raises(RuntimeError, match="a failing run"):
        decode_onnxruntime(exported, batch, "rsd-s:w=2,d=2")
    assert settings == [1, 2]


@pytest.mark.parametrize(
    "options",
    [{"repetition_penalty": 1.5}, {"no_repeat_ngram_size": 2}, {"min_new_tokens": 20, "eos_token_id": [5, 9, 17]}],
    ids=["repetition-penalty", "no-repeat-ngram", "min-new-tokens"],
)
def test_generation_options_match_generate(pair, batch, options):
    target, _, exported = pair
    reference = target.generate(**batch, do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=0, **options)
    result = decode_onnxruntime(exported, batch, "rsd-s:w=3,d=4", **options)
    assert torch.equal(result.sequences, reference)


def test_unsupported_generation_option(pair, batch):
    _, _, exported = pair
    with pytest.raises(ValueError, match="num_beams=2 is not supported outside model.generate"):
        decode_onnxruntime(exported, batch, "sd:l=2", num_beams=2)


def test_command_line_generate(tmp_path_factory, capsys):
    """`hf-specdec generate --backend onnxruntime` on an export made by `hf-specdec export` prints what the PyTorch
    models generate greedily."""
    model_dir = export_tiny_pair(tmp_path_factory, "gpt2")
    target, _ = tiny_pair("gpt2")
    exported = load_onnxruntime_pair(model_dir)
    prompt = "t5 t17 t33 t40"
    code = cli_main(["generate", "--backend", "onnxruntime", "--model-dir", str(model_dir), "--raw", "--greedy",
                     "--no-stream", "--max-new-tokens", "12", "--config", "rsd-c:b=2-2", prompt])
    assert code == 0
    printed = capsys.readouterr()
    inputs = exported.tokenizer(prompt, return_tensors="pt")
    reference = target.generate(**inputs, do_sample=False, max_new_tokens=12, pad_token_id=0)
    new_tokens = reference[0, inputs["input_ids"].shape[1]:]
    assert printed.out.strip() == exported.tokenizer.decode(new_tokens, skip_special_tokens=True)
    assert "block efficiency" in printed.err


def test_command_line_needs_a_model_dir():
    with pytest.raises(SystemExit, match="--model-dir DIR: create one with `hf-specdec export --out DIR`"):
        cli_main(["generate", "--backend", "onnxruntime", "hello"])


@pytest.mark.parametrize("arguments, message", [
    (["--greedy", "--temperature", "0.5"], "--greedy does not sample, so --temperature would be ignored"),
    (["--greedy", "--top-k", "5", "--top-p", "0.9"], "--greedy does not sample, so --top-k, --top-p would be ignored"),
    (["--target", "t", "--draft", "d", "--draft-kind", "standalone"], "--draft-kind picks an embedded draft"),
    (["--backend", "onnxruntime", "--model-dir", "d", "--draft-kind", "feature"],
     "--target/--draft/--draft-kind pick PyTorch models"),
    (["--target", "t"], "add --draft DIR, or use --config ar"),
    (["--target", "t", "--config", "sd:l=4"], "add --draft DIR, or use --config ar"),
])
def test_command_line_refusals(arguments, message):
    """Refused before any model loads, instead of an option silently dropped or a traceback from generate()."""
    with pytest.raises(SystemExit, match=re.escape(message)):
        cli_main(["generate", *arguments, "hello"])


def test_export_command_reads_every_option_the_model_loader_needs(monkeypatch):
    """`hf-specdec export` without --target loads the embedded pair through generate's loader: its parser must define
    what that loader reads (it once lacked --draft-kind and failed before loading anything)."""
    import argparse

    from hf_specdec.cli import export, generate

    parser = argparse.ArgumentParser()
    export.add_parser(parser.add_subparsers())
    args = parser.parse_args(["export", "--out", "unused"])
    loaded = {}
    monkeypatch.setattr("hf_specdec.models.load_default_pair",
                        lambda **kwargs: loaded.update(kwargs) or ("target", "draft", "tokenizer"))
    assert generate.load_models(args) == ("target", "draft", "tokenizer")
    assert loaded["draft_kind"] == "feature"

"""TensorRT: engines for a tiny Llama draft and target and the verify engines (the VerifyTree plugin), and for a
feature pair (the target engine returning `hidden_states`, the draft engine reading `features`), build on this CPU-only
machine with TensorRT for RTX; running them needs a supported GPU (those tests skip without one)."""

from __future__ import annotations

import importlib
import shutil
from types import SimpleNamespace

import pytest
import tensorrt_rtx as trt  # the dev extra installs it: missing, these engine builds must fail, not skip
import torch

from hf_specdec.export.manifest import Manifest  # noqa: E402
from hf_specdec.export.tensorrt_build import (  # noqa: E402
    DEFAULT_RTX_CAPABILITIES,
    EngineIOError,
    IOTensor,
    build_engines,
    check_io,
    declared_io,
    verify_specs,
)
from hf_specdec.trt_plugins import tensorrt_library  # noqa: E402
from hf_specdec.verification import RULES, VerifyInputs, verify_tree  # noqa: E402
from onnx_fixtures import MAX_NEW_TOKENS, export_feature_pair  # noqa: E402
from tiny_models import perturbed_copy, tiny_model, word_tokenizer  # noqa: E402
from verify_cases import random_case  # noqa: E402

LIMITS = dict(max_batch=4, max_new_tokens=24, max_past=96)
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="running TensorRT engines needs a CUDA GPU")


@pytest.fixture(scope="module")
def engines_dir(tmp_path_factory):
    """A tiny Llama pair exported to ONNX, then built into TensorRT engines (build only)."""
    from hf_specdec.export.onnx_export import export_pair

    model_dir = tmp_path_factory.mktemp("tensorrt_pair")
    target = tiny_model("llama")
    export_pair(target, perturbed_copy(target, 0.5), word_tokenizer(64), model_dir, {"target": "tiny", "draft": "tiny"},
                speculative_config="rsd-c:b=2-2", **LIMITS)
    build_engines(model_dir)
    return model_dir


def test_engines_build_on_cpu_and_match_the_manifest_execution_needs_gpu(engines_dir):
    manifest = Manifest.load(engines_dir)
    record = manifest.tensorrt
    assert record["library"] == "tensorrt_rtx" and record["version"] == trt.__version__
    assert record["compute_capabilities"] == list(DEFAULT_RTX_CAPABILITIES)
    assert set(record["engines"]) == {"target", "draft", *(f"verify_{rule}" for rule in RULES)}
    for name, engine in record["engines"].items():
        assert (engines_dir / engine["file"]).stat().st_size > 0, name
    # the profiles span the export's limits on every dynamic axis
    profile = record["engines"]["target"]["profile"]
    assert profile["input_ids"] == [[1, 1], [1, 16], [LIMITS["max_batch"], LIMITS["max_new_tokens"]]]
    assert profile["past_key_0"][2] == [LIMITS["max_batch"], 2, LIMITS["max_past"], 8]
    assert profile["attention_mask"][2] == [LIMITS["max_batch"], LIMITS["max_new_tokens"], LIMITS["max_past"] + LIMITS["max_new_tokens"]]
    assert record["engines"]["verify_rrs"]["profile"]["target_probs"][2] == [LIMITS["max_batch"], LIMITS["max_new_tokens"], 64]

    # the command line rebuilds them from the export for one GPU generation
    from hf_specdec.cli import main

    assert main(["export", "--tensorrt", "--engines-only", "--compute-capability", "SM89", "--out", str(engines_dir)]) == 0
    assert Manifest.load(engines_dir).tensorrt["compute_capabilities"] == ["SM89"]
    with pytest.raises(ValueError, match="not supported by TensorRT for RTX"):
        build_engines(engines_dir, capabilities=["SM90"])
    build_engines(engines_dir)  # back to every default generation, for the GPU tests


@pytest.fixture(scope="module")
def feature_engines_dir(tmp_path_factory):
    """A copy of the tiny Llama feature pair's export with its target and draft engines (build only; the verify
    engines do not depend on the models and are built above)."""
    model_dir = shutil.copytree(export_feature_pair(tmp_path_factory, "llama"), tmp_path_factory.mktemp("tensorrt_feature_pair") / "pair")
    build_engines(model_dir, rules=())
    return model_dir


def test_feature_pair_engines_build_with_the_feature_io(feature_engines_dir):
    manifest = Manifest.load(feature_engines_dir)
    record = manifest.tensorrt
    assert set(record["engines"]) == {"target", "draft"}
    for name, engine in record["engines"].items():
        assert (feature_engines_dir / engine["file"]).stat().st_size > 0, name
    # the engines' I/O was checked against these when built: the target returns hidden_states, the draft also reads
    # features, whose profile spans the export's batch and tokens per forward at the hidden size
    io = {role: {(t.name, t.is_input) for t in declared_io(manifest.entry(role).inputs, manifest.entry(role).outputs)}
          for role in ("target", "draft")}
    assert ("hidden_states", False) in io["target"] and ("features", True) not in io["target"]
    assert {("hidden_states", False), ("features", True)} <= io["draft"]
    max_batch = manifest.max_dims["batch"]
    assert record["engines"]["draft"]["profile"]["features"] == [[1, 1, 32], [1, 16, 32], [max_batch, MAX_NEW_TOKENS, 32]]
    assert "features" not in record["engines"]["target"]["profile"]


def test_engine_io_not_matching_the_manifest_is_a_clear_error():
    inputs, outputs = verify_specs()
    expected = declared_io(inputs, outputs)
    found = [IOTensor(t.name, t.dtype, [-1] * len(t.shape), t.is_input) for t in expected]
    check_io(found, expected, "verify_rrs.engine", "rebuild")
    wrong = [IOTensor(t.name, "int64", t.shape, t.is_input) if t.name == "next_tokens" else t for t in found[1:]]
    with pytest.raises(EngineIOError, match=r"missing \['paths'\].*next_tokens: engine int64.*: rebuild"):
        check_io(wrong, expected, "verify_rrs.engine", "rebuild")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where there is no GPU")
def test_tensorrt_backend_without_a_gpu_says_so(tmp_path):
    from hf_specdec.export.trt_backend import check_gpu

    built = SimpleNamespace(tensorrt={"library": "tensorrt_rtx", "compute_capabilities": ["SM89"]})
    with pytest.raises(RuntimeError, match="needs a CUDA GPU.*--backend onnxruntime"):
        check_gpu(built, tmp_path)
    with pytest.raises(ValueError, match="has no TensorRT engines.*hf-specdec export --tensorrt"):
        check_gpu(SimpleNamespace(tensorrt={}), tmp_path)


def test_missing_tensorrt_names_the_install(monkeypatch):
    real_import = importlib.import_module

    def without_tensorrt(name, *args):
        if name in tensorrt_library.MODULES:
            raise ImportError(name)
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_tensorrt)
    with pytest.raises(ImportError, match="pip install tensorrt-rtx-cu12"):
        tensorrt_library.import_tensorrt.__wrapped__()


@pytest.mark.gpu
@needs_gpu
def test_tensorrt_backend_generates_what_onnxruntime_generates(engines_dir):
    from hf_specdec.export.ort_backend import load_onnxruntime_pair
    from hf_specdec.export.trt_backend import load_tensorrt_pair
    from hf_specdec.generation import decode

    prompt = torch.randint(4, 64, (2, 7))
    outputs = []
    for pair, device in ((load_onnxruntime_pair(engines_dir), "cpu"), (load_tensorrt_pair(engines_dir), "cuda")):
        pair.generation_config.update(do_sample=False, max_new_tokens=12)
        result = decode(pair.target, pair.draft, prompt.to(device), pair.generation_config, "rsd-c:b=2-2",
                        verifier=pair.verifier)
        outputs.append(result.sequences.cpu())
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.gpu
@needs_gpu
def test_tensorrt_feature_pair_generates_what_onnxruntime_generates(feature_engines_dir):
    from transformers import GenerationConfig

    from hf_specdec.export.ort_backend import load_onnxruntime_pair
    from hf_specdec.export.trt_backend import load_tensorrt_pair
    from hf_specdec.generation import decode

    prompt = torch.randint(4, 96, (2, 7))
    config = GenerationConfig(do_sample=False, max_new_tokens=12, pad_token_id=0)
    outputs = []
    for pair, device in ((load_onnxruntime_pair(feature_engines_dir, device="cpu"), "cpu"),
                         (load_tensorrt_pair(feature_engines_dir), "cuda")):
        # the device's default verifier: no verify engines were built for this pair
        result = decode(pair.target, pair.draft, prompt.to(device), config, "rsd-c:b=2-2")
        outputs.append(result.sequences.cpu())
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.gpu
@needs_gpu
def test_verify_engines_match_the_reference(engines_dir):
    from hf_specdec.export.trt_backend import TensorRTVerifier

    verifier = TensorRTVerifier(engines_dir, Manifest.load(engines_dir))
    generator = torch.Generator().manual_seed(3)
    for rule in RULES:
        for _ in range(10):
            case = random_case(rule, batch=4, vocab=64, max_nodes=12, generator=generator)
            expected = verify_tree(VerifyInputs(**case))
            found = verifier(VerifyInputs(**{k: v.cuda() if torch.is_tensor(v) else v for k, v in case.items()}))
            assert torch.equal(expected.next_tokens, found.next_tokens.cpu())
            assert torch.equal(expected.accepted_nodes, found.accepted_nodes.cpu())

"""The VerifyTree operator: every implementation returns the reference's tokens for the same random numbers.

Reference: `hf_specdec.verification.verify_tree`. Implementations: ONNX Runtime's (the verify graph with the custom
node), the Triton kernel (on CPU through Triton's interpreter, TRITON_INTERPRET=1 set in conftest without a GPU; on a
GPU where one is present), and its compiled form for GPUs this machine does not have.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import onnx
import pytest
import torch

from hf_specdec.trt_plugins.verify_op import INPUTS, OP_TYPE, OUTPUTS, PLUGIN_NAMESPACE, PLUGIN_VERSION, verify_model
from hf_specdec.verification import RULES, VerifyInputs, VerifyResult, verify_tree
from verify_cases import random_case

FIELDS = ("accepted_nodes", "accepted_tokens", "num_accepted", "next_tokens")


def assert_same(expected: VerifyResult, found: VerifyResult, case: dict) -> None:
    for name in FIELDS:
        assert torch.equal(getattr(expected, name), getattr(found, name).to(getattr(expected, name).device)), (
            f"{case['rule']}: {name} {getattr(found, name).tolist()} != reference {getattr(expected, name).tolist()}"
        )


def test_verify_graph_is_one_plugin_node():
    model = verify_model("rrs")
    onnx.checker.check_model(model)
    (node,) = model.graph.node
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert node.op_type == OP_TYPE
    assert attributes == {"rule": b"rrs", "plugin_namespace": PLUGIN_NAMESPACE.encode(), "plugin_version": PLUGIN_VERSION.encode()}
    assert [i.name for i in model.graph.input] == [s.name for s in INPUTS]
    assert [o.name for o in model.graph.output] == [s.name for s in OUTPUTS]
    with pytest.raises(ValueError, match="unknown verification rule"):
        verify_model("typical")


@pytest.mark.parametrize("rule", RULES)
def test_onnxruntime_node_matches_reference(rule):
    from hf_specdec.trt_plugins.onnxruntime_op import verify_tree_onnxruntime

    generator = torch.Generator().manual_seed(RULES.index(rule))
    for _ in range(30):
        case = random_case(rule, batch=4, vocab=29, max_nodes=14, generator=generator)
        assert_same(verify_tree(VerifyInputs(**case)), verify_tree_onnxruntime(VerifyInputs(**case)), case)


def test_onnxruntime_node_accepts_empty_trees():
    from hf_specdec.trt_plugins.onnxruntime_op import verify_tree_onnxruntime

    probs = torch.rand(2, 1, 11).softmax(-1)
    case = dict(rule="rrs", paths=torch.zeros(2, 0, 0, dtype=torch.long), node_tokens=torch.zeros(2, 1, dtype=torch.long),
                target_probs=probs, draft_probs=probs, accept_uniforms=torch.zeros(2, 0, 0), sample_uniforms=torch.rand(2))
    assert_same(verify_tree(VerifyInputs(**case)), verify_tree_onnxruntime(VerifyInputs(**case)), case)


@pytest.mark.parametrize("rule", RULES)
def test_triton_kernel_matches_reference(rule):
    """On CPU this runs Triton's interpreter (slow per op: small batches and vocabularies)."""
    from hf_specdec.trt_plugins.triton_kernel import verify_tree_triton

    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator().manual_seed(10 + RULES.index(rule))
    for _ in range(4 if rule == "spectr" else 8):  # K-SEQ bisects rho with 41 vocabulary passes per node
        case = random_case(rule, batch=3, vocab=40, max_nodes=12, generator=generator)
        on_device = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in case.items()}
        assert_same(verify_tree(VerifyInputs(**case)), verify_tree_triton(VerifyInputs(**on_device)), case)


def test_triton_kernel_compiles_for_gpus():
    """Compiles the kernel to GPU machine code (cubin) for SM89 (RTX 40) without a GPU: type errors that Triton's
    interpreter lets through fail here. Execution needs a GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = (
        "from hf_specdec.trt_plugins.triton_kernel import compile_kernel\n"
        "for rule in ('rrs', 'spectr', 'greedy'):\n"
        "    assert compile_kernel(rule, 89)\n"
    )
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=300)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the kernel's speed and its results there)")
@pytest.mark.parametrize("batch,vocab", [(1, 128256), (8, 49152), (64, 32000), (64, 128256)])
def test_triton_kernel_on_gpu_matches_reference_and_is_timed(batch, vocab):
    from hf_specdec.trt_plugins.triton_kernel import verify_tree_triton

    generator = torch.Generator().manual_seed(batch)
    for rule in RULES:
        for _ in range(5):
            case = random_case(rule, batch=batch, vocab=vocab, max_nodes=16, generator=generator)
            on_gpu = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in case.items()}
            assert_same(verify_tree(VerifyInputs(**on_gpu)), verify_tree_triton(VerifyInputs(**on_gpu)), case)
        timings = {}
        for name, implementation in (("reference", verify_tree), ("triton", verify_tree_triton)):
            implementation(**on_gpu)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(5):
                implementation(**on_gpu)
            torch.cuda.synchronize()
            timings[name] = (time.perf_counter() - start) / 5 * 1e3
        print(f"\n{rule} batch {batch} vocab {vocab}: reference {timings['reference']:.2f} ms, triton {timings['triton']:.2f} ms")

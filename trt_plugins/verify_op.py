"""The verification step as one operator: its contract, its ONNX node, and the reference it stands for.

Semantics: exactly `hf_specdec.verification.verify_tree` (tree encoding, candidate order, numerics are defined there).
Implementations: the PyTorch reference itself (`run_reference`, also ONNX Runtime's implementation of the node), the
Triton kernel (`triton_kernel.py`) and the TensorRT plugin that launches it (`tensorrt_plugin.py`).

Node: op_type `VerifyTree`, attributes `rule` ("rrs" | "spectr" | "greedy"), `plugin_namespace` and `plugin_version`
(TensorRT's ONNX parser turns a node it has no importer for into the plugin registered under those three names).
Integer tensors are int32 (TensorRT's index type); probabilities are float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hf_specdec.verification import RULES, VerifyInputs, VerifyResult, verify_tree

OP_TYPE = "VerifyTree"
PLUGIN_NAMESPACE = "hf_specdec"
PLUGIN_VERSION = "1"
# onnxruntime-extensions runs Python ops of this domain; TensorRT's parser ignores the domain
ONNX_DOMAIN = "ai.onnx.contrib"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: type  # numpy scalar type
    dims: tuple[str, ...]  # symbolic axis names


INPUTS = (
    TensorSpec("paths", np.int32, ("batch", "paths", "depth")),  # node of each root-to-leaf path per depth, -1 padded
    TensorSpec("node_tokens", np.int32, ("batch", "nodes")),  # node 0 is the root
    TensorSpec("target_probs", np.float32, ("batch", "nodes", "vocab")),  # greedy: any scores with the target's argmax
    TensorSpec("draft_probs", np.float32, ("batch", "nodes", "draft_vocab")),  # greedy: ignored (any shape)
    TensorSpec("accept_uniforms", np.float32, ("batch", "paths", "depth")),
    TensorSpec("sample_uniforms", np.float32, ("batch",)),
)
OUTPUTS = (
    TensorSpec("accepted_nodes", np.int32, ("batch", "depth")),  # -1 after the accepted path's end
    TensorSpec("accepted_tokens", np.int32, ("batch", "depth")),  # -1 after the accepted path's end
    TensorSpec("num_accepted", np.int32, ("batch",)),
    TensorSpec("next_tokens", np.int32, ("batch",)),  # the correction or bonus token after the path
)


def check_rule(rule: str) -> str:
    if rule not in RULES:
        raise ValueError(f"unknown verification rule {rule!r}; expected one of {RULES}")
    return rule


def verify_node(rule: str, inputs: list[str] | None = None, outputs: list[str] | None = None, name: str = "verify"):
    """The operator as an ONNX node (tensor names default to the spec's)."""
    from onnx import helper

    return helper.make_node(
        OP_TYPE,
        inputs or [spec.name for spec in INPUTS],
        outputs or [spec.name for spec in OUTPUTS],
        name=name,
        domain=ONNX_DOMAIN,
        rule=check_rule(rule),
        plugin_namespace=PLUGIN_NAMESPACE,
        plugin_version=PLUGIN_VERSION,
    )


def verify_model(rule: str):
    """The verify graph: the operator alone, every axis dynamic."""
    from onnx import helper

    def value_info(spec: TensorSpec):
        return helper.make_tensor_value_info(spec.name, helper.np_dtype_to_tensor_dtype(np.dtype(spec.dtype)), list(spec.dims))

    graph = helper.make_graph(
        [verify_node(rule)], f"verify_{rule}", [value_info(s) for s in INPUTS], [value_info(s) for s in OUTPUTS]
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ONNX_DOMAIN, 1)])


def run_reference(rule: str, paths, node_tokens, target_probs, draft_probs, accept_uniforms, sample_uniforms):
    """The operator on numpy inputs through the PyTorch reference; returns the outputs of `OUTPUTS` as int32 arrays."""
    as_tensor = torch.from_numpy
    result = verify_tree(VerifyInputs(
        check_rule(rule),
        as_tensor(np.asarray(paths, np.int64)),
        as_tensor(np.asarray(node_tokens, np.int64)),
        as_tensor(np.asarray(target_probs)),
        None if rule == "greedy" else as_tensor(np.asarray(draft_probs)),
        as_tensor(np.asarray(accept_uniforms)),
        as_tensor(np.asarray(sample_uniforms)),
    ))
    return outputs_of(result)


def outputs_of(result: VerifyResult) -> tuple[np.ndarray, ...]:
    """The operator's outputs (int32, in `OUTPUTS` order) from the reference's result."""
    fields = (result.accepted_nodes, result.accepted_tokens, result.num_accepted, result.next_tokens)
    return tuple(field.cpu().numpy().astype(np.int32) for field in fields)


def result_of(outputs) -> VerifyResult:
    """The reference's result type (int64 tensors) from the operator's outputs."""
    return VerifyResult(*(torch.as_tensor(np.asarray(output)).long() for output in outputs))

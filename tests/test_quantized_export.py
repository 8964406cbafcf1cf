"""Block-quantized exports (`hf-specdec export --quantize int4`): the quantizer's round trip, GGUF blocks carried over
exactly (MatMulNBits multiplies d q + m), and speculative decoding on the quantized graphs exact with respect to the
quantized target graph itself (greedy identity with its own one-token decoding, sampled distribution)."""

from __future__ import annotations

import dataclasses

import gguf
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx_fixtures import write_llama_gguf
from statistics_helpers import chi_square_pvalue
from tiny_models import left_padded_prompts, perturbed_copy, tiny_model, word_tokenizer
from transformers import GenerationConfig

from hf_specdec.cli import export as export_cli
from hf_specdec.cli import main as cli_main
from hf_specdec.export import quantize
from hf_specdec.export.ort_backend import OrtBackend, load_onnxruntime_pair
from hf_specdec.config import SpeculativeConfig
from hf_specdec.export.quantize import QuantizationSpec
from hf_specdec.generation import decode
from hf_specdec.planner import exported as exported_plan

VOCAB = 12  # small enough to enumerate the first 3 generated tokens (the chi-square test)
SAMPLES = 4000


# ------------------------------------------------------------------------------------------------ block layouts
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("quantizer", ["onnxruntime", "numpy"])
def test_rtn_round_trip_within_half_a_step(bits, quantizer):
    rng = np.random.default_rng(bits)
    weight = rng.standard_normal((80, 24)).astype(np.float32)  # K = 80: the last block padded
    weight[:32, 0] = 0.0  # an all-zero block
    weight[32:64, 1] += 5.0  # a block far from 0
    blocks = quantize.rtn_quantize(weight, bits) if quantizer == "onnxruntime" else quantize.rtn_blocks(weight, bits)
    assert blocks.packed.shape == (24, 3, 32 * bits // 8) and blocks.scales.shape == (24, 3)
    error = np.abs(blocks.dequantize() - weight)
    assert (error <= blocks.max_step() / 2 * (1 + 1e-5) + 1e-7).all()
    assert (blocks.dequantize()[:32, 0] == 0).all()


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_are_the_gguf_weights_in_matmulnbits(type_name):
    """The GGUF's blocks repacked for MatMulNBits dequantize to exactly gguf-py's values, and ONNX Runtime's
    MatMulNBits (with the Q4_1 block-minimum correction) multiplies those values."""
    rng = np.random.default_rng(0)
    k, n = 96, 40
    qtype = gguf.GGMLQuantizationType[type_name]
    raw = gguf.quants.quantize(rng.standard_normal((n, k)).astype(np.float32), qtype)  # rows: output features
    expected = gguf.quants.dequantize(raw, qtype).T  # [K, N]
    blocks = quantize.gguf_blocks(raw, type_name, k)
    assert blocks.source == f"gguf:{type_name}" and (blocks.offsets is not None) == (type_name == "Q4_1")
    assert np.array_equal(blocks.dequantize(), expected)
    x = rng.standard_normal((2, 3, k)).astype(np.float32)
    head = "int8" if blocks.bits == 8 else "int4"
    found = run_matmul(expected, x, gguf=blocks, spec=QuantizationSpec("int4", head, accuracy_level=0, head_accuracy_level=0))
    np.testing.assert_allclose(found, x.astype(np.float64) @ expected, rtol=0, atol=2e-5 * np.abs(found).max())


def weight_model(weight: np.ndarray, op: str = "MatMul", bias: np.ndarray | None = None) -> onnx.ModelProto:
    """y = x W (+ bias) as one MatMul or Gemm node, W an initializer [K, N]."""
    k, n = weight.shape
    initializers = [numpy_helper.from_array(weight, "W")] + ([numpy_helper.from_array(bias, "C")] if bias is not None else [])
    x_shape = ["b", "t", k] if op == "MatMul" else ["m", k]
    y_shape = x_shape[:-1] + [n]
    node = helper.make_node(op, ["x", "W"] + (["C"] if bias is not None else []), ["logits"], name="product")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, y_shape)], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def run_matmul(weight, x, gguf=None, op="MatMul", bias=None, spec=QuantizationSpec("int4", "int4", accuracy_level=0)):
    """`weight_model` quantized by `quantize.quantize_graph` (with `gguf`'s blocks for W where given), run on ONNX
    Runtime."""
    model = weight_model(weight, op, bias)
    names = {quantize._digest(weight): ["lm_head.weight"]}
    source = FixedBlocks(gguf) if gguf is not None else None
    record = quantize.quantize_graph(model, spec, names, source)
    assert [node.op_type for node in model.graph.node if node.domain == quantize.OP_DOMAIN] == ["MatMulNBits"]
    assert not any(node.op_type in ("MatMul", "Gemm") and "W" in node.input for node in model.graph.node)
    if gguf is not None:
        assert record["head_source"] == gguf.source
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


class FixedBlocks:
    """A stand-in for `GgufWeights` holding one weight's blocks."""

    path = type("P", (), {"name": "fixed.gguf"})()
    sha256 = "-"

    def __init__(self, blocks):
        self._blocks = blocks

    def blocks(self, parameters, k, n, dtype=np.float32):
        return self._blocks


def test_gemm_with_bias_and_a_gguf_that_does_not_match():
    """GPT-2's Conv1D (Gemm with a bias) becomes MatMulNBits with its bias input; blocks whose values are not the
    weight's (another model's GGUF) are not used: the weight is quantized from its own values instead."""
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((64, 24)).astype(np.float32)
    bias = rng.standard_normal(24).astype(np.float32)
    x = rng.standard_normal((5, 64)).astype(np.float32)
    expected = quantize.rtn_quantize(weight, 4).dequantize()
    found = run_matmul(weight, x, op="Gemm", bias=bias)
    np.testing.assert_allclose(found, x @ expected + bias, rtol=1e-5, atol=1e-4)
    other = quantize.gguf_blocks(gguf.quants.quantize(rng.standard_normal((24, 64)).astype(np.float32),
                                                      gguf.GGMLQuantizationType.Q4_1), "Q4_1", 64)
    model = weight_model(weight)
    record = quantize.quantize_graph(model, QuantizationSpec("int4", "int4"), {quantize._digest(weight): ["x"]},
                                     FixedBlocks(other))
    assert record["head_source"] == "rtn"


def test_a_weight_shared_by_two_products_is_stored_once():
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((64, 16)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("MatMul", ["x", "W"], ["g"]),
             helper.make_node("Add", ["h", "g"], ["logits"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", 64])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["m", 16])],
                              [numpy_helper.from_array(weight, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    record = quantize.quantize_graph(model, QuantizationSpec("int4", "int4", accuracy_level=0))
    assert record["quantized_matmuls"] == 2  # both int4 (one of them taken for the head): the same blocks
    assert sorted(init.name for init in model.graph.initializer) == ["W_q4", "W_q4_scales", "W_q4_zero_points"]
    x = rng.standard_normal((3, 64)).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = 2 * x @ quantize.rtn_quantize(weight, 4).dequantize()
    np.testing.assert_allclose(session.run(None, {"x": x})[0], expected, rtol=1e-5, atol=1e-5)


class BlocksByName:
    """A stand-in for `GgufWeights`: blocks per parameter name."""

    path = type("P", (), {"name": "named.gguf"})()
    sha256 = "-"

    def __init__(self, blocks: dict):
        self._blocks = blocks

    def blocks(self, parameters, k, n, dtype=np.float32):
        return next((self._blocks[p] for p in parameters if p in self._blocks), None)


@pytest.mark.parametrize("source", ["rtn", "gguf:Q4_1"])
def test_products_of_one_input_share_a_node_with_the_same_outputs(source):
    """q/k/v-like products of one input (different widths) become one MatMulNBits and a Split, with the Q4_1
    block-minimum correction joined too; the outputs are those of the separate products, bit for bit. The head and
    a product of another input stay apart."""
    rng = np.random.default_rng(4)
    k, widths = 64, (32, 16, 16)
    weights = {f"w{i}": rng.standard_normal((k, n)).astype(np.float32) for i, n in enumerate(widths)}
    weights["other"] = rng.standard_normal((k, 32)).astype(np.float32)
    weights["head"] = rng.standard_normal((sum(widths) + 32, 24)).astype(np.float32)
    names, blocks = {}, {}
    if source != "rtn":  # the weights as a Q4_1 GGUF holds them: its blocks dequantize to exactly these values
        for name in list(weights):
            raw = gguf.quants.quantize(np.ascontiguousarray(weights[name].T), gguf.GGMLQuantizationType.Q4_1)
            blocks[name] = quantize.gguf_blocks(raw, "Q4_1", weights[name].shape[0])
            weights[name] = blocks[name].dequantize()
            names[quantize._digest(weights[name])] = [name]
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"h{i}"]) for i in range(3)]
    nodes += [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("MatMul", ["r", "other"], ["h3"]),
              helper.make_node("Concat", ["h0", "h1", "h2", "h3"], ["h"], axis=-1),
              helper.make_node("MatMul", ["h", "head"], ["logits"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["m", 24]),
                               helper.make_tensor_value_info("h", TensorProto.FLOAT, ["m", sum(widths) + 32])],
                              [numpy_helper.from_array(w, name) for name, w in weights.items()])
    x = rng.standard_normal((5, k)).astype(np.float32)
    outputs, records = [], []
    for fuse in (True, False):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        records.append(quantize.quantize_graph(model, QuantizationSpec("int4", "int4", accuracy_level=0), names,
                                               BlocksByName(blocks) if blocks else None, fuse_siblings=fuse))
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, {"x": x}))
    assert records[0]["source"] == records[1]["source"] == source
    assert records[0]["quantized_matmuls"] == records[1]["quantized_matmuls"] == 5
    assert (records[0]["matmulnbits_nodes"], records[1]["matmulnbits_nodes"]) == (3, 5)
    for fused, apart in zip(*outputs):
        assert np.array_equal(fused, apart)


def test_a_tied_head_traced_as_a_transposed_embedding_is_quantized():
    """A tied LM head too large for the exporter's constant folding is traced as MatMul(h, Transpose(table)): it
    becomes MatMulNBits over the table's rows (no float copy of the head left), the embedding's Gather keeps the
    table, and the Transpose goes."""
    rng = np.random.default_rng(3)
    table = rng.standard_normal((40, 64)).astype(np.float32)  # [vocab, hidden]
    nodes = [helper.make_node("Gather", ["table", "ids"], ["h"]),
             helper.make_node("Transpose", ["table"], ["table_t"], perm=[1, 0]),
             helper.make_node("MatMul", ["h", "table_t"], ["logits"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["m"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["m", 40])],
                              [numpy_helper.from_array(table, "table")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    record = quantize.quantize_graph(model, QuantizationSpec("int4", "int8"))
    assert [node.op_type for node in model.graph.node] == ["Gather", "MatMulNBits"]
    assert record["head"] == "int8" and record["quantized_matmuls"] == 1 and record["float_matmuls"] == 0
    assert "table" in {init.name for init in model.graph.initializer}
    ids = np.array([0, 7, 39])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    found = session.run(None, {"ids": ids})[0]
    expected = table[ids] @ quantize.rtn_quantize(np.ascontiguousarray(table.T), 8).dequantize()
    np.testing.assert_allclose(found, expected, rtol=0, atol=0.05 * np.abs(expected).max())  # int8 activations


def test_unpermute_rows_inverts_llama_cpp():
    from onnx_fixtures import llama_cpp_permute

    rows = np.arange(48)
    for heads in (2, 3, 6):
        permuted = llama_cpp_permute(rows, heads)
        assert np.array_equal(permuted[quantize.unpermute_rows(48, heads)], rows)


def test_command_line_choices_are_the_quantizers():
    assert export_cli.WEIGHT_SCHEMES == quantize.WEIGHT_SCHEMES and export_cli.HEAD_SCHEMES == quantize.HEAD_SCHEMES
    assert export_cli.DEFAULT_HEAD == quantize.DEFAULT_HEAD
    assert export_cli.ACCURACY_LEVELS == quantize.ACCURACY_LEVELS


def test_default_accuracy_levels():
    """Float activations for 4-bit decoder layers (exact as float graphs), int8 activations for 8-bit weights."""
    spec = QuantizationSpec("int4")
    assert (spec.accuracy_level, spec.head, spec.head_accuracy_level) == (0, "int8", 4)
    assert QuantizationSpec("int4", "int4").head_accuracy_level == 0
    assert QuantizationSpec("int4", "int4", accuracy_level=4).head_accuracy_level == 4
    assert QuantizationSpec("int8").accuracy_level == 4


@pytest.mark.parametrize("arguments, message", [
    (["--quantize", "int4", "--tensorrt"], "TensorRT cannot parse"),
    (["--gguf", "x.gguf"], "apply to a quantized export"),
    (["--quantize-head", "int4"], "apply to a quantized export"),
    (["--accuracy-level", "4"], "apply to a quantized export"),
    (["--tensorrt", "--engines-only", "--max-batch", "8", "--config", "ar"], "so --max-batch, --config would be ignored"),
    (["--tensorrt", "--engines-only", "--target", "t", "--draft", "d", "--draft-kind", "feature"],
     "so --target, --draft, --draft-kind would be ignored"),
    (["--compute-capability", "SM89"], "--compute-capability picks the GPUs TensorRT engines are built for: add --tensorrt"),
    (["--target", "t", "--draft", "d", "--draft-kind", "standalone"], "--draft-kind picks an embedded draft"),
    (["--tensorrt", "--config", "auto"], "times the exported graphs on ONNX Runtime, not on the GPU"),
])
def test_command_line_refusals(tmp_path, arguments, message):
    with pytest.raises(SystemExit, match=message):
        cli_main(["export", "--out", str(tmp_path), *arguments])


# ------------------------------------------------------------------------------------------------ an exported pair
@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """(the float model, the target: that model written as a Q4_1 GGUF (Q8_0 embedding, tied head) and holding
    exactly the file's weights, the pair on ONNX Runtime): exported by `hf-specdec export --quantize int4 --gguf FILE`
    (the defaults: float activations in the decoder layers, an int8 head at accuracy level 4) with a near draft
    (round-to-nearest). A peaky vocab-12 Llama, so that the first 3 generated tokens can be enumerated."""
    from onnx_fixtures import export_once

    original = tiny_model("llama", vocab_size=VOCAB, seed=0, scale=0.6, tie_word_embeddings=True)
    original.tie_weights()
    original.generation_config.eos_token_id = None
    target = perturbed_copy(original, noise=0.0)
    source = tmp_path_factory.mktemp("gguf-source")
    write_llama_gguf(target, source / "tiny.Q4_1.gguf")
    draft = perturbed_copy(target, noise=0.1)

    def export(out):
        tokenizer = word_tokenizer(VOCAB)
        target.save_pretrained(source / "target")
        tokenizer.save_pretrained(source / "target")
        draft.save_pretrained(source / "draft")
        assert cli_main(["export", "--target", str(source / "target"), "--draft", str(source / "draft"), "--out",
                         str(out), "--max-batch", str(SAMPLES), "--quantize", "int4", "--gguf",
                         str(source / "tiny.Q4_1.gguf")]) == 0

    return original, target, load_onnxruntime_pair(export_once(tmp_path_factory, "quantized-gguf", export))


def test_gguf_target_runs_the_gguf_blocks(quantized):
    _, target, pair = quantized
    record = pair.manifest.target.quantization
    layers = target.config.num_hidden_layers
    # every linear from the GGUF's Q4_1 blocks (q/k rows un-permuted), the tied head from its Q8_0 token_embd
    assert record["source"] == "gguf:Q4_1" and record["head_source"] == "gguf:Q8_0"
    assert record["weights"] == "int4" and record["head"] == "int8" and record["block_size"] == 32
    assert record["quantized_matmuls"] == 7 * layers + 1 and record["float_matmuls"] == 0
    assert record["gguf"]["file"] == "tiny.Q4_1.gguf"
    assert record["op"] == "com.microsoft.MatMulNBits"
    assert record["accuracy_level"] == 0 and record["head_accuracy_level"] == 4
    # against the PyTorch model holding the same weights: the int8 activations of the head's accuracy level 4 only
    parity = record["parity"]
    assert 0.8 < parity["top1_agreement"] <= 1 and 0 < parity["max_logit_diff"] < 0.25 * parity["max_abs_logit"]
    # one forward vs one token at a time: float rounding only (the decoder layers' activations are float)
    consistency = record["consistency"]
    assert consistency["max_logit_diff"] < 1e-3 and consistency["top1_agreement"] == 1.0
    draft = pair.manifest.draft.quantization
    assert draft["source"] == draft["head_source"] == "rtn" and "gguf" not in draft and "consistency" not in draft
    assert draft["quantized_matmuls"] == 7 * layers + 1
    assert pair.manifest.export["quantization"]["weights"] == "int4"
    for role, block_sums in (("target", True), ("draft", False)):
        entry = pair.manifest.entry(role)
        assert entry.quantized
        graph = onnx.load(str(pair.model_dir / entry.file), load_external_data=False).graph
        nodes = [node for node in graph.node if node.op_type == "MatMulNBits"]
        # q/k/v and gate/up share a node each (`quantize._siblings`)
        assert len(nodes) == entry.quantization["matmulnbits_nodes"] == 4 * layers + 1
        assert {n.domain for n in nodes} == {"com.microsoft"}
        # no product by a float weight is left, but the Q4_1 block sums (x S) and their minimums (M)
        weights = {init.name for init in graph.initializer}
        floats = [n.input[1] for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]
        assert all(name.startswith("block_sum") or name.endswith("_offsets") for name in floats)
        assert bool(floats) == block_sums


# ------------------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("method", ["sd:l=4", "rsd-c:b=2-2-1", "rsd-s:w=3,d=4"])
@pytest.mark.parametrize("pads", [[0], [0, 2, 4]], ids=["batch1", "batch3-left-padded"])
def test_greedy_identity_with_the_quantized_target(quantized, method, pads):
    """Greedy speculative decoding on the quantized graphs gives the tokens the same quantized target graph gives
    decoding one token at a time."""
    _, _, pair = quantized
    batch = left_padded_prompts(pads, 9, VOCAB, seed=7)
    config = GenerationConfig(do_sample=False, max_new_tokens=40, pad_token_id=0)
    result = decode(pair.target, pair.draft, batch["input_ids"], config, method, batch["attention_mask"])
    reference = one_token_at_a_time(pair.target, batch["input_ids"], batch["attention_mask"], 40)
    assert torch.equal(result.sequences, reference), method
    assert result.stats.block_efficiency > 1.2


def one_token_at_a_time(target: OrtBackend, input_ids, attention_mask, new_tokens: int) -> torch.Tensor:
    """Greedy decoding with the backend alone (none of the loop's code): the prompt, then one token per forward
    over the graph's KV cache."""
    real = attention_mask.bool()
    batch, length = input_ids.shape
    positions = torch.where(real, real.long().cumsum(1) - 1, 1)
    # causal over real keys; a padding query sees itself only (its output is never used)
    allowed = torch.ones(length, length, dtype=torch.bool).tril() & (real[:, None, :] | torch.eye(length, dtype=torch.bool))
    target.reset(batch, real.sum(1))
    logits = target.forward(input_ids, positions, allowed, positions).logits[:, -1]
    sequences, key_positions = input_ids, positions
    for _ in range(new_tokens):
        token = logits.argmax(-1, keepdim=True)
        sequences = torch.cat([sequences, token], 1)
        position = key_positions.max(1, keepdim=True).values + 1
        key_positions = torch.cat([key_positions, position], 1)
        real = torch.cat([real, torch.ones(batch, 1, dtype=torch.bool)], 1)
        logits = target.forward(token, position, real[:, None, :], key_positions).logits[:, -1]
    return sequences


PROMPT = [1, 5, 7, 3]


def quantized_joint(target: OrtBackend) -> torch.Tensor:
    """p(x1, x2, x3 | PROMPT) of the quantized target graph itself, enumerated from its logits: [V, V, V]."""
    sequences = torch.cat([torch.tensor(PROMPT).expand(VOCAB * VOCAB, -1),
                           torch.cartesian_prod(torch.arange(VOCAB), torch.arange(VOCAB))], 1)
    batch, length = sequences.shape
    positions = torch.arange(length).expand(batch, -1).contiguous()
    target.reset(batch)
    mask = torch.ones(length, length, dtype=torch.bool).tril().expand(batch, -1, -1).contiguous()
    probs = target.forward(sequences, positions, mask, positions).logits.double().softmax(-1)
    first = probs[0, len(PROMPT) - 1]
    second = probs[::VOCAB, len(PROMPT)]  # rows with x1 = 0 .. V-1
    third = probs[:, len(PROMPT) + 1].view(VOCAB, VOCAB, VOCAB)
    return first[:, None, None] * second[:, :, None] * third


def test_sampling_follows_the_quantized_target(quantized):
    """RSD-S sampling on the quantized pair draws from the quantized target graph's own distribution (not the float
    model's, which differs from it)."""
    original, _, pair = quantized
    exact = quantized_joint(pair.target)
    torch.manual_seed(1234)
    config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, max_new_tokens=3, pad_token_id=0)
    new = decode(pair.target, pair.draft, torch.tensor(PROMPT).expand(SAMPLES, -1), config,
                 "rsd-s:w=4,d=3").sequences[:, len(PROMPT):]
    counts = torch.bincount((new[:, 0] * VOCAB + new[:, 1]) * VOCAB + new[:, 2], minlength=VOCAB**3).double()
    assert chi_square_pvalue(counts, exact) > 1e-4
    # the test tells the two apart: these samples reject the float model's distribution (before 4 bits)
    assert chi_square_pvalue(counts, float_joint(original)) < 1e-4


def float_joint(model) -> torch.Tensor:
    """p(x1, x2, x3 | PROMPT) of the float PyTorch model: [V, V, V]."""
    sequences = torch.cat([torch.tensor(PROMPT).expand(VOCAB * VOCAB, -1),
                           torch.cartesian_prod(torch.arange(VOCAB), torch.arange(VOCAB))], 1)
    with torch.no_grad():
        probs = model(sequences).logits.double().softmax(-1)
    first, second = probs[0, len(PROMPT) - 1], probs[::VOCAB, len(PROMPT)]
    return first[:, None, None] * second[:, :, None] * probs[:, len(PROMPT) + 1].view(VOCAB, VOCAB, VOCAB)


def test_bench_onnxruntime_rows_use_the_asked_quantization(quantized):
    """`hf-specdec bench --quantize int4 --model-dir DIR` runs the int4 export in DIR, and refuses one of another
    scheme instead of timing it under the wrong name."""
    import argparse

    from hf_specdec.cli.bench import load_export

    _, _, pair = quantized
    args = argparse.Namespace(model_dir=pair.model_dir, quantize="int4", target="tiny", draft="tiny", gguf=None)
    assert load_export(args, None, None, None).manifest.target.quantization["weights"] == "int4"
    args.quantize = "none"
    with pytest.raises(SystemExit, match="holds an int4 export but --quantize is none"):
        load_export(args, None, None, None)


# ------------------------------------------------------------------------------------------------ auto at export
def test_auto_config_is_planned_from_the_exported_graphs(quantized):
    """A quantized export (default --config auto) keeps the config its own graphs' timed forwards predict fastest,
    with what it was chosen from; `generate --config auto` runs it."""
    _, _, pair = quantized
    planned = pair.manifest.export["planned"]
    assert planned["config"] == pair.manifest.speculative_config
    SpeculativeConfig.parse(pair.manifest.speculative_config)  # a config the loop runs (ar included)
    for timed in (planned["target_forward_ms"], planned["draft_forward_ms"]):
        assert sorted(map(int, timed)) == list(exported_plan.TIMED_TOKENS) and all(ms > 0 for ms in timed.values())
    assert planned["best_tree"]["predicted_speedup"] > 0


@pytest.mark.parametrize("target_ms, expected", [((10, 20, 40, 80, 160, 320), "ar"), ((10,) * 6, "tree")],
                         ids=["forward-cost-grows-with-tokens", "tokens-nearly-free"])
def test_the_plan_follows_the_timed_forwards(quantized, monkeypatch, target_ms, expected):
    """Where a forward costs in proportion to its tokens no tree can pay and the export plans plain decoding; where
    extra tokens are free it plans a tree."""
    _, target, pair = quantized
    draft = perturbed_copy(target, noise=0.1)
    timed = {"target": target_ms, "draft": (0.01,) * 6}

    def time_forwards(backend, counts, context):
        return exported_plan.MeasuredForwards(exported_plan.TIMED_TOKENS, tuple(ms / 1e3 for ms in timed[backend.role]))

    monkeypatch.setattr(exported_plan, "time_forwards", time_forwards)
    config, record = exported_plan.plan_exported(pair.target, pair.draft, target, draft, 32, 256)
    assert record["config"] == str(config)
    assert (config.is_speculative, record["target_forward_ms"]["4"]) == (expected == "tree", target_ms[2])


def test_measured_forwards_interpolate_and_extend():
    forwards = exported_plan.MeasuredForwards((1, 2, 4), (1.0, 2.0, 3.0))
    assert [forwards.seconds(1, n, 0) for n in (1, 3, 4, 8)] == [1.0, 2.5, 3.0, 5.0]
    assert forwards.forward(1, 2, 0) == {"measured": 2.0}


def test_a_plan_from_another_machine_is_pointed_out(quantized):
    _, _, pair = quantized
    assert exported_plan.planned_elsewhere(pair.manifest, "cpu") is None  # planned here
    manifest = dataclasses.replace(pair.manifest, export={
        **pair.manifest.export, "planned": {**pair.manifest.export["planned"], "device": "Another CPU"}})
    note = exported_plan.planned_elsewhere(manifest, "cpu")
    assert "planned on Another CPU" in note and "--config" in note
    given = dataclasses.replace(pair.manifest, export={k: v for k, v in pair.manifest.export.items() if k != "planned"})
    assert exported_plan.planned_elsewhere(given, "cpu") is None  # a config given at export, not planned

"""Block-quantized weights for ONNX Runtime (`hf-specdec export --quantize int4|int8`): a pass over an exported float
graph that stores every linear weight in blocks of `BLOCK_SIZE` along its input dimension and multiplies it with ONNX
Runtime's `com.microsoft.MatMulNBits` (its CPU 4/8-bit GEMM, which reads the packed weights directly).

The pass finds each `MatMul` whose B input is a 2-D initializer [K, N] (and each plain `Gemm`: GPT-2's Conv1D, bias
kept as MatMulNBits' bias input), quantizes that weight and replaces the node; everything else in the graph (and its
I/O) stays as traced. The LM head (the weight MatMul nearest the `logits` output) gets its own scheme (`head`), int8
by default. Weights that are not 2-D initializers (the experts of a densely traced MoE) stay in float and are counted.

Where the weights come from:

* `rtn`: round-to-nearest from the float weights, per block a scale and an integer zero point (asymmetric, the range
  widened to include 0), by ONNX Runtime's own block quantizer (`quantize_matmul_4bits` / `_8bits`, what its
  `MatMulNBitsQuantizer` runs) or, without it, the same arithmetic in numpy (`rtn_blocks`). Every weight is within
  half a quantization step of the float one.
* `gguf:<type>`: a GGUF file's own blocks, where the GGUF stores the weight in blocks of 32 that MatMulNBits can
  represent: Q4_0 (w = d (q - 8): scale d, zero point 8), Q8_0 (w = d q: q + 128, zero point 128) and Q4_1
  (w = d q + m). MatMulNBits computes (q - zp) scale with an integer zero point, so Q4_1 becomes MatMulNBits with
  scale d and zero point 0, plus the block minimums m as a small float correction: x W = MatMulNBits(x) +
  (x S) M, where S [K, K/32] sums x over each block (ones) and M [K/32, N] holds m (1 float per 32 weights; one x S
  per input shared by the q/k/v or gate/up projections). The weights ONNX Runtime multiplies are then d q + m, the
  very values llama.cpp multiplies, up to float rounding of the sum. Each GGUF tensor is matched to a model weight by
  name (llama.cpp's names, Llama's q/k rows un-permuted as transformers' GGUF loader does) and used only if its
  dequantized values equal the weight being exported; any other tensor (another block type, another model) is
  quantized by `rtn` instead, and the record says which source each weight came from.

Float zero points, which ONNX Runtime's MatMulNBits also accepts (zero_points of the scales' type, so Q4_1 would be
scale d, zero point -m / d, and computes correctly), are not used: ONNX Runtime 1.32 runs them on its unpacked path
(the whole weight dequantized to float at every run, then an fp32 GEMM), measured more than 10x slower than the fp32
MatMul; the correction above keeps the packed kernels (measured: 5-10% over plain 4-bit blocks).

`accuracy_level` is MatMulNBits' attribute: 0 keeps the activations in float (the weights' exact products), 4
quantizes them to int8 blocks per row (ONNX Runtime's fastest CPU kernels, as llama.cpp does for its Q4/Q8 dot
products). Int8 activations make the graph's output jump wherever an activation crosses a rounding boundary, so the
float rounding by which a tree forward and one-token decoding differ (the split past/new attention, other GEMM
shapes) can move a logit by far more than rounding: on tiny models, greedy decoding at level 4 in every layer differed
from the same graph's own one-token decoding in 15 and 22 of 36 runs (vocabularies 12 and 96). Hence the defaults (`default_accuracy_level`): 4-bit
decoder layers at level 0 (greedy identity holds as on float graphs: 0 of 72 runs differed), 8-bit weights at level
4 (ONNX Runtime 1.32 has no packed 8-bit kernel with float activations on x86; the int8 head's int8 activations only
perturb the logits); `--accuracy-level 4` trades that for speed (2-3x on 4-bit products, export/README.md).

Products of one input (q/k/v, gate/up) become one MatMulNBits over their weights side by side and a `Split`
(`_siblings`): the same outputs bit for bit, fewer and larger kernels.

The quantized graphs hold `com.microsoft` nodes: they are for ONNX Runtime only (TensorRT parses the float export).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from hf_specdec.export.manifest import sha256

BLOCK_SIZE = 32
BITS = {"int4": 4, "int8": 8}
WEIGHT_SCHEMES = ("none", "int8", "int4")  # --quantize
HEAD_SCHEMES = ("int8", "int4", "none")  # --quantize-head
DEFAULT_HEAD = "int8"
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
OP_DOMAIN = "com.microsoft"
OP_TYPE = "MatMulNBits"
# the fixed inputs of the parity measured at export (`measure_parity`)
PARITY_INPUTS = {"batch": 2, "prompt_length": 12, "left_padding": 4, "tree": (2, 2, 1), "seed": 0}


@dataclass(frozen=True)
class QuantizationSpec:
    """What `hf-specdec export --quantize` asks for: `weights` for the decoder layers' linears, `head` for the LM
    head ("none": left in float), blocks of `block_size` along the input dimension, MatMulNBits' accuracy levels
    (`accuracy_level` for the decoder layers, `head_accuracy_level` for the head; None: `default_accuracy_level`),
    and the target's GGUF file whose blocks are used where they represent the weights exactly (None: `rtn` only)."""

    weights: str
    head: str = DEFAULT_HEAD
    block_size: int = BLOCK_SIZE
    accuracy_level: int | None = None
    head_accuracy_level: int | None = None
    gguf: str | None = None

    def __post_init__(self):
        if self.weights not in BITS:
            raise ValueError(f"quantization {self.weights!r}: expected one of {', '.join(BITS)}")
        if self.head not in HEAD_SCHEMES:
            raise ValueError(f"head quantization {self.head!r}: expected one of {', '.join(HEAD_SCHEMES)}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block size {self.block_size}: MatMulNBits needs a power of two >= 16")
        if self.accuracy_level is None:
            object.__setattr__(self, "accuracy_level", default_accuracy_level(BITS[self.weights], is_head=False))
        if self.head_accuracy_level is None:
            head_level = default_accuracy_level(BITS.get(self.head, 0), is_head=True, layers=self.accuracy_level)
            object.__setattr__(self, "head_accuracy_level", head_level)
        for level in (self.accuracy_level, self.head_accuracy_level):
            if level not in ACCURACY_LEVELS:
                raise ValueError(f"accuracy level {level}: expected one of {ACCURACY_LEVELS}")

    @classmethod
    def from_options(cls, quantize: str | None, head: str | None = None, gguf: "str | Path | None" = None,
                     accuracy_level: int | None = None, head_accuracy_level: int | None = None,
                     block_size: int = BLOCK_SIZE) -> "QuantizationSpec | None":
        """The spec of the command line's options; None for `--quantize none` (the float export, unchanged)."""
        if quantize in (None, "none"):
            if head not in (None, "none") or gguf is not None:
                raise ValueError("--quantize-head and --gguf apply to a quantized export: add --quantize int4 or int8")
            return None
        return cls(quantize, head or DEFAULT_HEAD, block_size, accuracy_level, head_accuracy_level,
                   None if gguf is None else str(gguf))

    def bits_for(self, is_head: bool) -> int | None:
        return BITS.get(self.head if is_head else self.weights)

    def level_for(self, is_head: bool) -> int:
        return self.head_accuracy_level if is_head else self.accuracy_level


def default_accuracy_level(bits: int, is_head: bool, layers: int = 0) -> int:
    """MatMulNBits' accuracy level where none is asked for. Decoder layers: 0 for 4 bits (float activations: the
    graph is a function of the prefix up to float rounding, so a tree forward and one-token decoding agree, as on
    float graphs), 4 for 8 bits (ONNX Runtime 1.32 has no packed 8-bit kernel with float activations on x86: at
    level 0 it dequantizes the whole weight at every run). The head: 4 for 8 bits (its int8 activations perturb the
    logits only, and nothing is carried on to later layers), else the decoder layers' level."""
    if bits == 8:
        return 4
    return layers if is_head else 0


# ---------------------------------------------------------------------------------------------- block layouts
@dataclass
class BlockQuantized:
    """A weight [K, N] in MatMulNBits' layout: w[k, n] = (q[n, k] - zero_point[n, b]) * scale[n, b] (+ offset[n, b]),
    b = k // block_size; K padded to whole blocks (with q = zero point, so w = 0 there)."""

    bits: int
    block_size: int
    k: int
    n: int
    packed: np.ndarray  # uint8 [N, blocks, block_size * bits / 8]: element 2i in the low nibble of byte i (4 bits)
    scales: np.ndarray  # [N, blocks], the graph's float type
    zero_points: np.ndarray  # uint8 [N, blocks], unpacked (0 .. 2^bits - 1)
    offsets: np.ndarray | None = None  # [N, blocks] (GGUF Q4_1's block minimums), None where there are none
    source: str = "rtn"

    @property
    def blocks(self) -> int:
        return -(-self.k // self.block_size)

    def quantized(self) -> np.ndarray:
        """q unpacked: uint8 [N, blocks * block_size]."""
        return unpack_bits(self.packed, self.bits).reshape(self.n, -1)

    def packed_zero_points(self) -> np.ndarray:
        """The zero points as MatMulNBits reads them: uint8 [N, ceil(blocks * bits / 8)] (4 bits: two per byte, the
        even block in the low nibble, each row padded to whole bytes)."""
        if self.bits == 8:
            return self.zero_points.astype(np.uint8)
        padded = np.zeros((self.n, 2 * -(-self.blocks // 2)), dtype=np.uint8)
        padded[:, : self.blocks] = self.zero_points
        return pack_bits(padded, 4)

    def dequantize(self) -> np.ndarray:
        """The weights this layout represents, [K, N] float32 (computed as the GGUF reference does: d q + m)."""
        q = self.quantized().reshape(self.n, self.blocks, self.block_size).astype(np.float32)
        scales = self.scales.astype(np.float32)[..., None]
        if self.offsets is None:
            w = (q - self.zero_points.astype(np.float32)[..., None]) * scales
        else:  # zero points are 0 here: d * q + m, in the order gguf-py and transformers' loader use
            w = scales * (q - self.zero_points.astype(np.float32)[..., None]) + self.offsets.astype(np.float32)[..., None]
        return np.ascontiguousarray(w.reshape(self.n, -1)[:, : self.k].T)

    def max_step(self) -> np.ndarray:
        """The quantization step of each weight's block, [K, N] (for the half-step round trip bound)."""
        step = np.repeat(self.scales.astype(np.float32), self.block_size, axis=1)[:, : self.k]
        return np.abs(step.T)


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """uint8 values < 2^bits, last axis packed: 4 bits two per byte (element 2i low nibble, 2i + 1 high)."""
    values = values.astype(np.uint8)
    if bits == 8:
        return values
    pairs = values.reshape(*values.shape[:-1], -1, 2)
    return pairs[..., 0] | (pairs[..., 1] << np.uint8(4))


def unpack_bits(packed: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return packed
    return np.stack([packed & np.uint8(0x0F), packed >> np.uint8(4)], axis=-1).reshape(*packed.shape[:-1], -1)


def _layout(q: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, bits: int, block_size: int, k: int,
            offsets: np.ndarray | None = None, source: str = "rtn") -> BlockQuantized:
    """From q [N, blocks * block_size] (unpacked), scales and zero points [N, blocks]."""
    n, blocks = scales.shape
    packed = pack_bits(q.reshape(n, blocks, block_size), bits)
    return BlockQuantized(bits, block_size, k, n, packed, scales, zero_points.astype(np.uint8), offsets, source)


# ---------------------------------------------------------------------------------------------- round to nearest
def rtn_blocks(weight: np.ndarray, bits: int, block_size: int = BLOCK_SIZE) -> BlockQuantized:
    """Round-to-nearest block quantization of `weight` [K, N] (numpy): per block of `block_size` input rows and
    column, the range [min(0, w), max(0, w)] in 2^bits - 1 steps, an integer zero point (the arithmetic of ONNX
    Runtime's asymmetric block quantizer). |w - dequantized| <= step / 2."""
    k, n = weight.shape
    blocks = -(-k // block_size)
    levels = (1 << bits) - 1
    w = np.zeros((blocks * block_size, n), dtype=np.float32)
    w[:k] = weight
    w = w.T.reshape(n, blocks, block_size)
    low = np.minimum(w.min(-1), 0)
    high = np.maximum(w.max(-1), 0)
    scale = (high - low) / levels
    inverse = np.where(scale == 0, 0, 1 / np.where(scale == 0, 1, scale))
    zero_point = np.clip(np.round(-low * inverse), 0, levels)
    q = np.clip(np.round(w * inverse[..., None]) + zero_point[..., None], 0, levels)
    return _layout(q.reshape(n, -1), scale.astype(weight.dtype), zero_point, bits, block_size, k)


def _ort_rtn(weight: np.ndarray, bits: int, block_size: int) -> BlockQuantized | None:
    """ONNX Runtime's own block quantizer (C++, what `MatMulNBitsQuantizer` runs), None where it is not there."""
    try:
        from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits
    except ImportError:
        return None
    k, n = weight.shape
    blocks = -(-k // block_size)
    padded = np.zeros((blocks * block_size, n), dtype=weight.dtype)
    padded[:k] = weight
    packed = np.zeros((n, blocks, block_size * bits // 8), dtype=np.uint8)
    zero_point = np.zeros((n, -(-blocks * bits // 8)), dtype=np.uint8)
    scales = np.zeros((n, blocks), dtype=weight.dtype)
    quantize = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    quantize(packed, padded, scales, zero_point, block_size, n, blocks * block_size, False)
    zero_points = unpack_bits(zero_point, bits)[:, :blocks]
    return BlockQuantized(bits, block_size, k, n, packed, scales, zero_points)


def rtn_quantize(weight: np.ndarray, bits: int, block_size: int = BLOCK_SIZE) -> BlockQuantized:
    """`weight` [K, N] by ONNX Runtime's block quantizer where it has one for this dtype, else by `rtn_blocks`."""
    if weight.dtype == np.float32:
        quantized = _ort_rtn(weight, bits, block_size)
        if quantized is not None:
            return quantized
    return rtn_blocks(weight, bits, block_size)


# ---------------------------------------------------------------------------------------------- GGUF blocks
GGUF_BLOCK = 32  # Q4_0, Q4_1, Q8_0: blocks of 32 along each row (the input dimension)
GGUF_BLOCK_TYPES = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}  # GGUF block type -> MatMulNBits bits


def gguf_blocks(raw: np.ndarray, type_name: str, k: int, dtype=np.float32) -> BlockQuantized:
    """A GGUF tensor's raw blocks (uint8 [N, K / 32 * block bytes], rows = output features) in MatMulNBits'
    layout, exactly: Q4_0 {d, qs}: d (q - 8); Q4_1 {d, m, qs}: d q + m (scale d, zero point 0, offset m); Q8_0
    {d, int8 qs}: d q (q + 128, zero point 128). ggml packs 4-bit element j in the low nibble of byte j and element
    j + 16 in its high nibble; MatMulNBits packs consecutive pairs."""
    n = raw.shape[0]
    blocks = k // GGUF_BLOCK
    if type_name not in GGUF_BLOCK_TYPES or k % GGUF_BLOCK:
        raise ValueError(f"GGUF {type_name} blocks of a {k}-wide row cannot be stored as MatMulNBits blocks")
    raw = np.ascontiguousarray(raw).reshape(n, blocks, -1)
    d = raw[..., 0:2].copy().view(np.float16)[..., 0]
    offsets = None
    if type_name == "Q8_0":
        q = raw[..., 2:].view(np.int8).astype(np.int16) + 128
        zero_points = np.full((n, blocks), 128)
    else:
        if type_name == "Q4_1":
            offsets = raw[..., 2:4].copy().view(np.float16)[..., 0].astype(dtype)
        qs = raw[..., 4:] if type_name == "Q4_1" else raw[..., 2:]
        q = np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1)  # elements 0..15, then 16..31
        zero_points = np.full((n, blocks), 0 if type_name == "Q4_1" else 8)
    return _layout(q.reshape(n, -1), d.astype(dtype), zero_points, GGUF_BLOCK_TYPES[type_name], GGUF_BLOCK, k, offsets,
                   f"gguf:{type_name}")


# transformers parameter name -> llama.cpp tensor name
GGUF_NAMES = [
    (re.compile(r"^model\.layers\.(\d+)\.self_attn\.(q|k|v|o)_proj\.weight$"),
     lambda m: f"blk.{m[1]}.attn_{'output' if m[2] == 'o' else m[2]}.weight"),
    (re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight$"), lambda m: f"blk.{m[1]}.ffn_{m[2]}.weight"),
    (re.compile(r"^model\.embed_tokens\.weight$"), lambda m: "token_embd.weight"),
    (re.compile(r"^lm_head\.weight$"), lambda m: "output.weight"),
]


def gguf_name(parameter: str) -> str | None:
    for pattern, name in GGUF_NAMES:
        match = pattern.match(parameter)
        if match:
            return name(match)
    return None


def unpermute_rows(rows: int, heads: int) -> np.ndarray:
    """Llama q/k rows: llama.cpp's converter permutes each head's rows for its rotary layout; the inverse (as
    transformers' GGUF loader applies it) as an index: the model's row r is the GGUF's row index[r]."""
    return np.arange(rows).reshape(heads, rows // heads // 2, 2).swapaxes(2, 1).reshape(rows)


class GgufWeights:
    """The quantized tensors of a GGUF file, by the transformers parameter names they hold."""

    def __init__(self, path: "str | Path", config=None):
        import gguf

        self.path = Path(path)
        reader = gguf.GGUFReader(str(self.path))
        self.tensors = {tensor.name: tensor for tensor in reader.tensors}
        field = reader.fields.get("general.architecture")
        self.architecture = bytes(field.parts[field.data[0]]).decode() if field is not None else None
        self.config = config
        self.sha256 = sha256(self.path)

    def blocks(self, parameters: list[str], k: int, n: int, dtype=np.float32) -> BlockQuantized | None:
        """The GGUF blocks of the weight named (any of) `parameters`, [K, N] once dequantized; None where the file
        has no such tensor, or not in a block type MatMulNBits represents."""
        names = [gguf_name(p) for p in parameters]
        if "output.weight" in names and "output.weight" not in self.tensors:
            names.append("token_embd.weight")  # a tied head: llama.cpp reads it from the embedding
        tensor = next((self.tensors[name] for name in names if name in self.tensors), None)
        if tensor is None or tensor.tensor_type.name not in GGUF_BLOCK_TYPES:
            return None
        raw = np.asarray(tensor.data)
        if raw.shape[0] != n or tuple(int(d) for d in tensor.shape[:2]) != (k, n):
            return None
        permuted = self._row_order(tensor.name, n)
        if permuted is not None:
            raw = raw[permuted]
        return gguf_blocks(raw, tensor.tensor_type.name, k, dtype)

    def _row_order(self, name: str, rows: int) -> np.ndarray | None:
        if self.architecture != "llama" or self.config is None or not re.search(r"\.attn_[qk]\.", name):
            return None
        heads = self.config.num_attention_heads
        if ".attn_k." in name:
            heads = getattr(self.config, "num_key_value_heads", None) or heads
        return unpermute_rows(rows, heads)


# ---------------------------------------------------------------------------------------------- the graph pass
def _digest(array: np.ndarray) -> tuple:
    return array.shape, array.dtype.str, hashlib.blake2b(np.ascontiguousarray(array).tobytes(), digest_size=16).digest()


def parameter_names(model) -> dict[tuple, list[str]]:
    """The model's 2-D weights by value, as they appear in the traced graph ([K, N], the transposed parameter, or the
    parameter itself for Conv1D-style [in, out] weights): digest -> parameter names (tied ones all listed)."""
    names: dict[tuple, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if parameter.dim() != 2:
            continue
        array = parameter.detach().cpu().numpy()
        for view in (array.T, array):
            names.setdefault(_digest(view), []).append(name)
    return names


def _attribute(node, name: str, default):
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


@dataclass
class _Candidate:
    node: onnx.NodeProto
    weight: str  # initializer name
    transposed: bool  # Gemm transB=1: the initializer is [N, K]
    bias: str | None  # Gemm's C, a 1-D initializer [N]


def _transposed_weights(graph, initializers: dict) -> dict[str, str]:
    """Outputs of `Transpose(perm=[1, 0])` nodes over 2-D initializers -> those initializers: how a tied LM head is
    traced (MatMul by the embedding table transposed)."""
    return {node.output[0]: node.input[0] for node in graph.node
            if node.domain in ("", "ai.onnx") and node.op_type == "Transpose" and node.input[0] in initializers
            and len(initializers[node.input[0]].dims) == 2 and list(_attribute(node, "perm", [1, 0])) == [1, 0]}


def _candidate(node, initializers: dict, transposed_weights: dict[str, str]) -> _Candidate | None:
    """A node multiplying by a constant 2-D weight (or its transpose) that MatMulNBits can take over, or None."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
        return None
    name = transposed_weights.get(node.input[1]) if node.op_type == "MatMul" else None
    weight = initializers.get(name or node.input[1])
    if weight is None or len(weight.dims) != 2 or weight.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16):
        return None
    if node.op_type == "MatMul":
        return _Candidate(node, name or node.input[1], name is not None, None)
    if _attribute(node, "alpha", 1.0) != 1.0 or _attribute(node, "transA", 0) != 0:
        return None
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if bias is not None:
        c = initializers.get(bias)
        n = weight.dims[0] if _attribute(node, "transB", 0) else weight.dims[1]
        if c is None or list(c.dims) != [n] or _attribute(node, "beta", 1.0) != 1.0:
            return None
    return _Candidate(node, node.input[1], bool(_attribute(node, "transB", 0)), bias)


def _head_node(graph, candidates: dict[str, _Candidate]) -> str | None:
    """The weight product nearest the `logits` output, walking back through producers (the LM head; a reduced
    vocabulary head scatters it into -inf first)."""
    producers = {output: node for node in graph.node for output in node.output}
    frontier, seen = ["logits"], set()
    while frontier:
        value = frontier.pop(0)
        node = producers.get(value)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.output[0] in candidates:
            return node.output[0]
        frontier.extend(i for i in node.input if i)
    return None


def quantize_graph(model: onnx.ModelProto, spec: QuantizationSpec, names: dict[tuple, list[str]] | None = None,
                   gguf: GgufWeights | None = None, fuse_siblings: bool = True) -> dict:
    """Replace, in place, the weight products of `model` by MatMulNBits (see the module doc), products of one input
    by one node each where `fuse_siblings` (`_siblings`); return the record for the manifest: scheme, sources (how
    many weights each), MatMulNBits nodes, and the weight products left in float."""
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    transposed_weights = _transposed_weights(graph, initializers)
    candidates = {}
    for node in graph.node:
        candidate = _candidate(node, initializers, transposed_weights)
        if candidate is not None:
            candidates[node.output[0]] = candidate
    head = _head_node(graph, candidates)
    uses = Counter(i for node in graph.node for i in node.input)
    sources: Counter = Counter()
    head_source = None
    # products by a constant weight MatMulNBits cannot take (not 2-D: the experts of a densely traced MoE) ...
    left_in_float = sum(1 for node in graph.node if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1
                        and node.input[1] in initializers and node.output[0] not in candidates)
    quantized_products, quantized_weights = {}, {}
    for node in graph.node:
        candidate = candidates.get(node.output[0]) if node.output else None
        bits = None if candidate is None else spec.bits_for(node.output[0] == head)
        if candidate is None or bits is None:
            left_in_float += candidate is not None  # ... and those left in float by the scheme (--quantize-head none)
            continue
        key = (candidate.weight, candidate.transposed, bits)
        weight = numpy_helper.to_array(initializers[candidate.weight])
        weight = weight.T if candidate.transposed else weight
        k, n = weight.shape
        quantized = quantized_weights.get(key)  # a weight shared by several products: quantized once
        if quantized is None and gguf is not None and names is not None and spec.block_size == GGUF_BLOCK:
            parameters = names.get(_digest(weight), [])
            quantized = gguf.blocks(parameters, k, n, weight.dtype) if parameters else None
            # used only where its values are exactly the weight being exported (same model, same rows)
            if quantized is not None and (quantized.bits != bits or not np.array_equal(quantized.dequantize(), weight)):
                quantized = None
        if quantized is None:
            quantized = rtn_quantize(np.ascontiguousarray(weight), bits, spec.block_size)
        quantized_weights[key] = quantized
        quantized_products[node.output[0]] = quantized
        if node.output[0] == head:
            head_source = quantized.source
        else:
            sources[quantized.source] += 1
    siblings = _siblings(graph, candidates, quantized_products, head, uses) if fuse_siblings else {}
    new_nodes, new_initializers, block_sums, replaced = [], {}, {}, set()
    for node in graph.node:
        output = node.output[0] if node.output else None
        quantized = quantized_products.get(output)
        if quantized is None:
            new_nodes.append(node)
            continue
        candidate, level = candidates[output], spec.level_for(output == head)
        group = siblings.get(output)
        if group is None:
            new_nodes += _matmul_nbits(node, candidate, quantized, level, new_initializers, block_sums)
        elif group[0] is node:  # the group's products in one node, where its first product was
            new_nodes += _fused_siblings(group, candidates, quantized_products, level, new_initializers, block_sums)
        uses[node.input[1]] -= 1
        replaced.add(candidate.weight)
    # a Transpose whose products all became MatMulNBits goes, and so does its use of the weight
    for node in [n for n in new_nodes if n.output and n.output[0] in transposed_weights and uses[n.output[0]] <= 0]:
        new_nodes.remove(node)
        uses[node.input[0]] -= 1
    graph.ClearField("node")
    graph.node.extend(new_nodes)
    unused = {name for name in replaced if uses[name] <= 0}
    kept = [init for init in graph.initializer if init.name not in unused]
    graph.ClearField("initializer")
    graph.initializer.extend(kept + list(new_initializers.values()))
    if not any(opset.domain == OP_DOMAIN for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid(OP_DOMAIN, 1))
    total = sum(sources.values())
    record = {
        "weights": spec.weights,
        "block_size": spec.block_size,
        "source": "+".join(sorted(sources)) if sources else None,
        "head": spec.head if head is not None else None,
        "head_source": head_source,
        "op": f"{OP_DOMAIN}.{OP_TYPE}",
        "accuracy_level": spec.accuracy_level,
        "head_accuracy_level": spec.head_accuracy_level if head_source is not None else None,
        "quantized_matmuls": total + (head_source is not None),
        "matmulnbits_nodes": sum(1 for node in new_nodes if node.op_type == OP_TYPE and node.domain == OP_DOMAIN),
        "float_matmuls": left_in_float,
    }
    if len(sources) > 1:
        record["sources"] = dict(sorted(sources.items()))
    record = {key: value for key, value in record.items() if value is not None}
    if gguf is not None:
        record["gguf"] = {"file": gguf.path.name, "sha256": gguf.sha256}
    return record


def _matmul_nbits(node, candidate: _Candidate, quantized: BlockQuantized, accuracy_level: int,
                  initializers: dict, block_sums: dict) -> list:
    """MatMulNBits for `node` (and, for GGUF Q4_1, its block-minimum correction); the initializers it needs are added
    to `initializers` (name -> tensor) unless there already (a weight shared by several products)."""
    prefix = f"{candidate.weight}{'_t' if candidate.transposed else ''}_q{quantized.bits}"
    dtype = quantized.scales.dtype

    def add(name: str, make):
        if name not in initializers:
            initializers[name] = numpy_helper.from_array(make(), name)
        return name

    b = add(prefix, lambda: quantized.packed)
    scales = add(f"{prefix}_scales", lambda: quantized.scales.reshape(-1))
    zero_points = add(f"{prefix}_zero_points", lambda: quantized.packed_zero_points().reshape(-1))
    inputs = [node.input[0], b, scales, zero_points]
    if candidate.bias is not None:
        inputs += ["", candidate.bias]  # no g_idx; the bias
    output = node.output[0]
    product = output if quantized.offsets is None else f"{output}_nbits"
    attributes = {"K": quantized.k, "N": quantized.n, "bits": quantized.bits, "block_size": quantized.block_size}
    if accuracy_level:
        attributes["accuracy_level"] = accuracy_level
    nodes = [helper.make_node(OP_TYPE, inputs, [product], name=f"{node.name or output}_Q{quantized.bits}",
                              domain=OP_DOMAIN, **attributes)]
    if quantized.offsets is not None:
        # x W = MatMulNBits(x) + (x S) M: S sums x over each block, M [blocks, N] holds the block minimums
        a = node.input[0]
        if a not in block_sums:
            k, size = quantized.k, quantized.block_size

            def indicator():
                ones = np.zeros((k, quantized.blocks), dtype=dtype)
                ones[np.arange(k), np.arange(k) // size] = 1
                return ones

            key = add(f"block_sum_{k}x{size}_{dtype.name}", indicator)
            block_sums[a] = f"{a}_block_sums"
            nodes.append(helper.make_node("MatMul", [a, key], [block_sums[a]], name=f"{a}_block_sums"))
        offsets = add(f"{prefix}_offsets", lambda: np.ascontiguousarray(quantized.offsets.T))
        nodes.append(helper.make_node("MatMul", [block_sums[a], offsets], [f"{output}_offsets"],
                                      name=f"{node.name or output}_offsets"))
        nodes.append(helper.make_node("Add", [product, f"{output}_offsets"], [output], name=f"{node.name or output}_sum"))
    return nodes


def _siblings(graph, candidates: dict[str, _Candidate], quantized_products: dict[str, BlockQuantized],
              head: str | None, uses: Counter) -> dict[str, list]:
    """Products of one input (q/k/v, gate/up) that can be one MatMulNBits over their weights side by side: output ->
    the group's nodes, in graph order. The weights' blocks run along K, so a column of the joint weight is multiplied
    exactly as alone: the split outputs are the separate products (bit for bit on ONNX Runtime 1.32, measured),
    and a one-token forward of the int4 SmolLM2 target drops from 7 to 4 weight nodes per layer (5% faster).
    Left apart: the head, products with a bias, weights used elsewhere too, and blocks of other layouts."""
    groups: dict[tuple, list] = {}
    for node in graph.node:
        output = node.output[0] if node.output else None
        quantized = quantized_products.get(output)
        candidate = candidates.get(output)
        if quantized is None or output == head or candidate.bias is not None or uses[candidate.weight] != 1:
            continue
        layout = (quantized.bits, quantized.block_size, quantized.k, quantized.offsets is None, quantized.scales.dtype)
        groups.setdefault((node.input[0], layout), []).append(node)
    return {node.output[0]: group for group in groups.values() if len(group) > 1 for node in group}


def _fused_siblings(group: list, candidates: dict[str, _Candidate], quantized_products: dict[str, BlockQuantized],
                    accuracy_level: int, initializers: dict, block_sums: dict) -> list:
    """One MatMulNBits over the group's weights side by side (its Q4_1 correction too), split into their outputs."""
    parts = [quantized_products[node.output[0]] for node in group]
    first = parts[0]
    joint = dataclasses.replace(
        first, n=sum(p.n for p in parts), source="+".join(sorted({p.source for p in parts})),
        **{field: np.concatenate([getattr(p, field) for p in parts]) for field in ("packed", "scales", "zero_points")},
        offsets=None if first.offsets is None else np.concatenate([p.offsets for p in parts]))
    output = f"{group[0].output[0]}_and_{len(group) - 1}_more"
    weight = f"{candidates[group[0].output[0]].weight}_and_{len(group) - 1}_more"
    product = helper.make_node("MatMul", [group[0].input[0], weight], [output], name=f"{group[0].name or output}_joint")
    nodes = _matmul_nbits(product, _Candidate(product, weight, False, None), joint, accuracy_level, initializers,
                          block_sums)
    sizes = f"{output}_sizes"
    initializers[sizes] = numpy_helper.from_array(np.array([p.n for p in parts], dtype=np.int64), sizes)
    nodes.append(helper.make_node("Split", [output, sizes], [node.output[0] for node in group], axis=-1,
                                  name=f"{group[0].name or output}_split"))
    return nodes


def quantize_onnx_file(path: "str | Path", spec: QuantizationSpec, names: dict[tuple, list[str]] | None = None,
                       gguf: GgufWeights | None = None) -> dict:
    """`quantize_graph` on an exported graph file, rewritten in place (weights as external data in `path`.data)."""
    path = Path(path)
    model = onnx.load(str(path))  # with its external data, all in memory: the data file can be rewritten
    record = quantize_graph(model, spec, names, gguf)
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
                    size_threshold=1024)
    onnx.checker.check_model(str(path), full_check=True)
    return record


# ---------------------------------------------------------------------------------------------- parity
def measure_parity(reference, candidate, vocab_size: int) -> dict:
    """Logits of `candidate` (the quantized graph on ONNX Runtime) against `reference` (the float model) on fixed
    inputs (`PARITY_INPUTS`: a prefilled prompt, one row left-padded, and a draft tree on top): the largest logit
    difference and how often the top-1 token agrees, over every tree node of every row."""
    import torch

    from hf_specdec.export.parity import max_logit_error, random_features, random_tree, tree_logits

    p = PARITY_INPUTS
    with torch.random.fork_rng():
        torch.manual_seed(p["seed"])
        prompt = torch.randint(3, vocab_size, (p["batch"], p["prompt_length"]))
        mask = torch.ones_like(prompt)
        mask[1:, : p["left_padding"]] = 0
        tree = random_tree(prompt[:, -1], p["tree"], vocab_size)
        features = random_features(reference, prompt, tree)
        expected = tree_logits(reference, prompt, mask, tree, features).float()
        found = tree_logits(candidate, prompt, mask, tree, features).float()
    agree = (expected.argmax(-1) == found.argmax(-1)).float().mean()
    return {
        "reference": "the float model (PyTorch)",
        "inputs": f"{p['batch']} rows x {p['prompt_length']} prompt tokens (one left-padded by {p['left_padding']}), "
        f"tree {'-'.join(map(str, p['tree']))}, seed {p['seed']}",
        "max_logit_diff": round(max_logit_error(expected, found), 6),
        "max_abs_logit": round(float(expected[torch.isfinite(expected)].abs().max()), 4),
        "top1_agreement": round(float(agree), 4),
    }


def measure_consistency(backend, vocab_size: int, length: int = 16, seed: int = 0) -> dict:
    """The graph against itself: the logits of `length` random tokens scored in one forward (as a tree or prefill
    scores them) and decoded one token at a time (as plain decoding does). Speculative decoding is exact with respect
    to the graph's own distribution up to this difference (float rounding at accuracy level 0; int8 activations at
    level 4 can turn rounding into larger jumps)."""
    import torch

    length = min(length, backend.max_dims["new"])
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        tokens = torch.randint(3, vocab_size, (1, length))
    positions = torch.arange(length)[None]
    backend.reset(1)
    together = backend.forward(tokens, positions, torch.ones(length, length, dtype=torch.bool).tril()[None],
                               positions).logits[0]
    backend.reset(1)
    one_by_one = torch.stack([
        backend.forward(tokens[:, t:t + 1], positions[:, t:t + 1], torch.ones(1, 1, t + 1, dtype=torch.bool),
                        positions[:, :t + 1]).logits[0, 0]
        for t in range(length)])
    from hf_specdec.export.parity import max_logit_error

    return {
        "inputs": f"{length} random tokens (seed {seed}) in one forward vs one token at a time",
        "max_logit_diff": float(f"{max_logit_error(one_by_one, together):.3g}"),
        "top1_agreement": round(float((together.argmax(-1) == one_by_one.argmax(-1)).float().mean()), 4),
    }


def describe(record: dict | None) -> str:
    """One line for the command line: the scheme and its parity."""
    if not record:
        return "float"
    head = (f", head {record['head']} ({record['head_source']}, accuracy level {record['head_accuracy_level']})"
            if record.get("head_source") else "")
    line = (f"{record['weights']} ({record.get('source')}, accuracy level {record['accuracy_level']}){head}, "
            f"{record['quantized_matmuls']} weights")
    if "matmulnbits_nodes" in record:  # exports before products of one input shared a node have one per weight
        line += f" in {record['matmulnbits_nodes']} MatMulNBits"
    parity = record.get("parity")
    if parity:
        line += (f"; vs float: max logit diff {parity['max_logit_diff']:.3g} (logits up to "
                 f"{parity['max_abs_logit']:.3g}), top-1 agreement {parity['top1_agreement']:.1%}")
    consistency = record.get("consistency")
    if consistency:
        line += f"; one forward vs one token at a time: max logit diff {consistency['max_logit_diff']:.3g}"
    return line


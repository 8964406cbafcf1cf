"""Export a target/draft pair to ONNX (`torch.onnx.export(dynamo=True)`, no MLIR) with a manifest.

Each model becomes one graph with the I/O of `hf_specdec.export.graph`: dynamic batch, new tokens and past length,
plain ONNX ops only (opset 18; no ONNX Runtime contrib ops such as GroupQueryAttention, which TensorRT's parser
rejects), weights as external data, checked with `onnx.checker`.

Sliding-window models: the graph takes one bool mask per attention layer type the model has, `attention_mask` for
full-attention layers and `sliding_attention_mask` for sliding-window layers (`manifest.MASK_INPUTS`), and hands each
layer its own, as the PyTorch backend does. The runtime builds the windowed mask from the cache layout's positions
(`hf_specdec.cache_layout.sliding_window_mask`, window in the manifest entry's `sliding_window`): Mistral / Phi-3 /
Mixtral-style models (every layer windowed) have only `sliding_attention_mask`, Gemma 2/3 (`layer_types` mixing both)
have both, full-attention models only `attention_mask` (their graphs and manifests are as before).

The traced attention is `export_attention`: `graph.split_kv_attention`, plus Gemma 2's attention soft-capping, and
found by layers that do not pass keyword arguments on (StableLM). Mixture-of-experts layers that dispatch through
transformers' experts interface (Mixtral, Qwen3-MoE, ...) are traced with `dense_experts_forward`: every expert on
every token, weighted by the routing (zero where not routed), which is plain batched MatMuls instead of the
data-dependent expert loops / grouped matmuls torch.onnx.export cannot convert; it costs num_experts / top_k times the
expert FLOPs, for no more weight reads once a step's tokens hit most experts anyway.

`check_exportable` refuses, by family and before anything is traced or written (`UNSUPPORTED_FAMILIES`,
length-dependent RoPE, MoE that does not dispatch, unknown attention layer types), what the graph cannot reproduce
exactly, and then runs the model once through the export's attention against its own forward
(`check_split_kv_matches`): a family this module does not know that does something the graph does not (attention
sinks, a custom score transform, a layer outside the attention interface) is refused instead of exported with other
outputs.

Feature-conditioned drafts (`hf_specdec.feature_draft`): in a pair whose draft reads the target's features, the
target graph also returns `hidden_states` [batch, new, hidden], its LM-head input for every new token (the decoder's
last hidden state, recorded by a hook on `model.get_decoder()` as the PyTorch backend records it, whatever
`logits_index` keeps for the head), and the draft graph takes `features` [batch, new, hidden] (the target's feature
before each token) and returns its own `hidden_states` (its prediction of the target's feature at each token). A pair
with a standalone draft exports exactly the graphs and manifest it exported before.

Quantized exports (`export_pair(..., quantization=QuantizationSpec(...))`, `hf-specdec export --quantize int4`): each
graph is traced in float exactly as above, then rewritten by `hf_specdec.export.quantize` (every weight product of the
decoder layers block-quantized and run by ONNX Runtime's `com.microsoft.MatMulNBits`, the LM head by its own scheme;
the target's weights from its GGUF's own blocks where given and exact), and the manifest entry records the scheme and
the parity measured against the float model. Without `quantization` nothing changes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import warnings
from pathlib import Path

import onnx
import torch
from transformers import AttentionInterface
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from hf_specdec.backends.hf import lm_head_inputs_recorded, sliding_windows, uses_alibi
from hf_specdec.cache_layout import sliding_window_mask
from hf_specdec.config import SpeculativeConfig
from hf_specdec.export.graph import SplitKV, io_names, split_kv_attention
from hf_specdec.export.manifest import (
    AUTO,
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_SPECULATIVE_CONFIG,
    FEATURES_INPUT,
    HIDDEN_STATES_OUTPUT,
    MANIFEST_FILE,
    MASK_INPUTS,
    Manifest,
    ModelEntry,
    TensorSpec,
    sha256,
)
from hf_specdec.export.parity import max_logit_error
from hf_specdec.feature_draft import check_feature_draft, reads_target_features
from hf_specdec.rope import PlainDecodingRope

OPSET = 18
# sizes of the sample inputs traced: distinct and >= 2, so that no axis is specialised to a constant
SAMPLE_DIMS = {"batch": 2, "new": 3, "past": 5, "kept": 2}


def hidden_size(model) -> int:
    """Width of the model's features (its LM-head input; for a feature draft, also of the features it reads)."""
    return model.config.get_text_config().hidden_size


def model_shape(model) -> dict[str, int]:
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    return {
        "num_layers": config.num_hidden_layers,
        "kv_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
        "vocab_size": config.vocab_size,
    }


EXPORT_ATTENTION_NAME = "hf_specdec_split_kv_export"
_ACTIVE_SPLIT_KV: list[SplitKV] = []  # the SplitKV of the forward being traced or probed


def export_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, split_kv: SplitKV = None, **kwargs):
    """`split_kv_attention`, also where a family's decoder layer does not pass the `split_kv` keyword on to its
    attention (StableLM: the forward's SplitKV is then the one `MaskedSplitKVDecoder` is running)."""
    split_kv = split_kv if split_kv is not None else _ACTIVE_SPLIT_KV[-1]
    return split_kv_attention(module, query, key, value, attention_mask, scaling, dropout, split_kv=split_kv, **kwargs)


AttentionInterface.register(EXPORT_ATTENTION_NAME, export_attention)


EXPORT_EXPERTS_NAME = "hf_specdec_dense_experts"


def dense_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """Mixture-of-experts layers for the trace: every expert on every token, each token's output the sum of its
    routed experts' outputs times their routing weights. The math of transformers' `batched_mm` experts (same weight
    layouts, gates, biases and norms) without its per-token weight gathers or the default implementations'
    data-dependent expert loops, so it traces to plain batched MatMuls. Exact up to rounding: experts a token is not
    routed to contribute exact zeros (`where`, so not even an overflow in them can leak into the sum)."""
    num_tokens, hidden_dim = hidden_states.shape
    up = self.gate_up_proj if self.has_gate else self.up_proj
    num_experts = up.shape[0]
    every = hidden_states[None].expand(num_experts, num_tokens, hidden_dim)
    projected = every @ (up if self.is_transposed else up.transpose(1, 2))  # [experts, tokens, (2 x) intermediate]
    if self.has_bias:
        projected = projected + (self.gate_up_proj_bias if self.has_gate else self.up_proj_bias)[:, None]
    flat = projected.reshape(num_experts * num_tokens, -1)
    flat = self._apply_gate(flat) if self.has_gate else self.act_fn(flat)
    projected = flat.view(num_experts, num_tokens, -1)
    out = projected @ (self.down_proj if self.is_transposed else self.down_proj.transpose(1, 2))  # [experts, tokens, hidden]
    if self.has_bias:
        out = out + self.down_proj_bias[:, None]
    if self.has_post_expert_norm:
        out = self.post_expert_norm(out.reshape(num_experts * num_tokens, hidden_dim)).view(num_experts, num_tokens, hidden_dim)
    routed = top_k_index[None] == torch.arange(num_experts, device=top_k_index.device)[:, None, None]  # [experts, tokens, k]
    weights = torch.where(routed, top_k_weights[None], 0).sum(-1)[..., None]
    out = torch.where(routed.any(-1)[..., None], out * weights, 0).sum(0)
    return out.to(hidden_states.dtype)


ALL_EXPERTS_FUNCTIONS.register(EXPORT_EXPERTS_NAME, dense_experts_forward)


def experts_modules(model) -> list[torch.nn.Module]:
    """The mixture-of-experts modules that dispatch on `config._experts_implementation` (transformers'
    `use_experts_implementation`)."""
    return [m for m in model.modules() if hasattr(m, "_is_expert_parallel") and hasattr(m, "has_gate") and hasattr(m, "config")]


@contextlib.contextmanager
def export_implementations(model):
    """Run `model` with `export_attention` and `dense_experts_forward`, restoring its implementations afterwards."""
    text_config = model.config.get_text_config()
    experts_configs = list({id(m.config): m.config for m in experts_modules(model)}.values())
    saved_attention = text_config._attn_implementation
    saved_experts = [config._experts_implementation for config in experts_configs]
    text_config._attn_implementation = EXPORT_ATTENTION_NAME
    for config in experts_configs:
        config._experts_implementation = EXPORT_EXPERTS_NAME
    try:
        yield
    finally:
        text_config._attn_implementation = saved_attention
        for config, experts in zip(experts_configs, saved_experts):
            config._experts_implementation = experts


# config.model_type -> why the graph cannot run the family exactly; checked before any tracing
UNSUPPORTED_FAMILIES = {
    "falcon": "its attention calls scaled_dot_product_attention itself instead of going through transformers' "
    "attention interface, so the export cannot give it the split past/new K/V attention (its trace fails)",
    "gpt_oss": "its attention adds learned sinks (a per-head logit in every softmax denominator), which the exported "
    "attention does not have",
}
MOE_CONFIG_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def mask_layer_types(config) -> tuple[str, ...]:
    """The attention layer types whose masks the graph takes, in input order (the layer types of `MASK_INPUTS`): the
    masks `hf_specdec.backends.hf.HFBackend` gives the model (one tensor unless full and sliding layers are mixed)."""
    if not sliding_windows(config):
        return ("full_attention",)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and len(set(layer_types)) > 1:
        return ("full_attention", "sliding_attention")
    return ("sliding_attention",)


PYTORCH_FIX = ("use the pytorch backend for this model (`hf-specdec generate --backend pytorch`, or "
               "`model.generate(..., custom_generate=speculative_generate)`)")
NO_BACKEND_FIX = "the pytorch backend refuses it too: no hf-specdec backend runs this model"


def refuse(role: str, model, cause: str, fix: str = PYTORCH_FIX) -> ValueError:
    family = model.config.get_text_config().model_type
    return ValueError(f"the {role} ({type(model).__name__}, model type {family!r}) cannot be exported to ONNX: {cause}; {fix}")


def check_exportable(model, role: str) -> None:
    """Refuse, by name, a model whose exported graph would not give the model's own outputs (see the module doc)."""
    config = model.config.get_text_config()
    if model.dtype not in (torch.float32, torch.float16):
        raise ValueError(f"the {role} is {model.dtype}; export float32 or float16 weights, e.g. model.to(torch.float32)")
    if model.config.is_encoder_decoder:
        raise ValueError(f"the {role} is an encoder-decoder model; only decoder-only causal LMs can be exported")
    if config.model_type in UNSUPPORTED_FAMILIES:
        raise refuse(role, model, UNSUPPORTED_FAMILIES[config.model_type])
    experts = experts_modules(model)
    if any(getattr(config, key, None) for key in MOE_CONFIG_KEYS) and not experts:
        raise refuse(
            role, model,
            "its mixture-of-experts layers pick experts per token with data-dependent control flow that "
            "torch.onnx.export cannot trace, and they do not dispatch through transformers' experts interface, "
            "which the export uses to run every expert densely",
        )
    if any(m._is_expert_parallel for m in experts):
        raise refuse(role, model, "its experts are sharded for expert parallelism; load it on one device to export it")
    if uses_alibi(config):
        raise refuse(role, model, "it adds ALiBi position biases, which transformers builds from a 2D padding mask that "
                     "cannot describe a draft tree", NO_BACKEND_FIX)
    try:
        sliding_windows(config)
    except ValueError as error:
        raise refuse(role, model, str(error), NO_BACKEND_FIX) from None
    rope = PlainDecodingRope.for_model(model)
    if rope is not None:
        raise refuse(
            role, model,
            f"its rotary frequencies depend on the sequence length (rope {config.rope_parameters}), and the exported "
            "graph fixes them at trace time",
        )
    check_split_kv_matches(model, role)


PROBE_LENGTH = 8


def check_split_kv_matches(model, role: str) -> None:
    """The model on a short random sequence, once through the export's attention (the module that is traced, run in
    PyTorch) and once through its own forward: they must agree to rounding. Catches what a family does inside
    attention that the exported graph would silently leave out; costs two forwards of PROBE_LENGTH tokens."""
    shape = model_shape(model)
    layer_types = mask_layer_types(model.config.get_text_config())
    window = sliding_windows(model.config.get_text_config()).get("sliding_attention")
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, shape["vocab_size"], (1, PROBE_LENGTH), generator=generator).to(model.device)
    positions = torch.arange(PROBE_LENGTH, device=model.device)[None]
    causal = torch.ones(1, PROBE_LENGTH, PROBE_LENGTH, dtype=torch.bool, device=model.device).tril()
    masks = tuple(causal if t == "full_attention" else sliding_window_mask(causal, positions, positions, window)
                  for t in layer_types)
    empty = torch.zeros(1, shape["kv_heads"], 0, shape["head_dim"], dtype=model.dtype, device=model.device)
    past = [(empty, empty) for _ in range(shape["num_layers"])]
    # a feature draft reads features with every token: random ones, so that the fusion of both inputs is probed too
    features = {}
    if reads_target_features(model):
        features["features"] = torch.randn(1, PROBE_LENGTH, hidden_size(model), generator=generator).to(model.device, model.dtype)
    with torch.no_grad():
        reference = model(input_ids=input_ids, position_ids=positions, use_cache=False, **features).logits.float()
        try:
            with export_implementations(model):
                logits = MaskedSplitKVDecoder(model, layer_types)(input_ids, positions, masks, positions[0], past, **features)[0]
        except KeyError:
            raise refuse(
                role, model,
                "some of its layers do not compute attention through transformers' attention interface, so the "
                "export cannot give them the split past/new K/V attention",
            ) from None
        except Exception as error:  # noqa: BLE001 - whatever breaks here would break (or bend) the export
            raise refuse(role, model, f"it does not run with the export's attention ({type(error).__name__}: {error})") from error
    error = max_logit_error(reference, logits)  # -inf (a reduced-vocabulary head) must match exactly
    finite = reference[torch.isfinite(reference)]
    tolerance = (1e-3 if model.dtype == torch.float32 else 3e-2) * (1 + float(finite.abs().max() if finite.numel() else 0))
    if not error <= tolerance:
        raise refuse(
            role, model,
            f"its logits through the export's attention differ from its own forward by {error:.3g} (tolerance "
            f"{tolerance:.3g}): it does something inside attention that the exported graph does not reproduce",
        )


class MaskedSplitKVDecoder(torch.nn.Module):
    """`hf_specdec.export.graph.SplitKVDecoder` with one bool mask per attention layer type (`layer_types`, the masks'
    order in `masks`): a single tensor to the model when there is one, {layer type: mask} when layer types are mixed
    (as `HFBackend` passes them). With ("full_attention",) it traces the same graph as `SplitKVDecoder`.

    Features: a feature draft takes `features` [B, T, H] and returns its predicted features after the K/V; any other
    model returns its LM-head input for all T tokens there when `emits_features` (the target of a feature draft)."""

    def __init__(self, model, layer_types: tuple[str, ...], emits_features: bool = False):
        super().__init__()
        self.model = model
        self.layer_types = layer_types
        self.logits_to_keep = model._supports_logits_to_keep()
        self.reads_features = reads_target_features(model)
        self.emits_features = emits_features or self.reads_features

    def forward(self, input_ids, position_ids, masks, logits_index, past, features=None):
        dtype = self.model.dtype
        # eager-style attention adds the mask to the scores: 0 where attended, the dtype's minimum elsewhere
        additive = [
            torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, torch.finfo(dtype).min)[:, None] for m in masks
        ]
        attention_mask = additive[0] if len(additive) == 1 else dict(zip(self.layer_types, additive))
        split_kv = SplitKV(past)
        _ACTIVE_SPLIT_KV.append(split_kv)
        # the target of a feature draft: its decoder's last hidden state, as `HFBackend` records it
        records = self.emits_features and not self.reads_features
        try:
            with lm_head_inputs_recorded(self.model) if records else contextlib.nullcontext() as recorded:
                out = self.model(
                    input_ids=input_ids,
                    position_ids=position_ids,
                    attention_mask=attention_mask,
                    use_cache=False,
                    split_kv=split_kv,
                    **({"features": features} if self.reads_features else {}),
                    **({"logits_to_keep": logits_index} if self.logits_to_keep else {}),
                )
        finally:
            _ACTIVE_SPLIT_KV.pop()
        logits = out.logits if self.logits_to_keep else out.logits[:, logits_index]
        if not self.emits_features:
            return (logits.float(), *split_kv.flat_new())
        return (logits.float(), *split_kv.flat_new(), out.features if self.reads_features else recorded[-1])


def sample_inputs(model, masks: int = 1) -> tuple:
    shape = model_shape(model)
    batch, new, past, kept = (SAMPLE_DIMS[k] for k in ("batch", "new", "past", "kept"))
    kv_shape = (batch, shape["kv_heads"], past, shape["head_dim"])
    features = (torch.zeros(batch, new, hidden_size(model), dtype=model.dtype),) if reads_target_features(model) else ()
    return (
        torch.randint(0, shape["vocab_size"], (batch, new)),
        torch.arange(past, past + new).expand(batch, new).contiguous(),
        tuple(torch.ones(batch, new, past + new, dtype=torch.bool) for _ in range(masks)),
        torch.arange(new - kept, new),
        [(torch.zeros(kv_shape, dtype=model.dtype), torch.zeros(kv_shape, dtype=model.dtype)) for _ in range(shape["num_layers"])],
        *features,
    )


def dynamic_shapes(num_layers: int, masks: int = 1, reads_features: bool = False) -> dict:
    kv = {0: "batch", 2: "past"}
    return {
        "input_ids": {0: "batch", 1: "new"},
        "position_ids": {0: "batch", 1: "new"},
        "masks": tuple({0: "batch", 1: "new", 2: "past_plus_new"} for _ in range(masks)),
        "logits_index": {0: "kept"},
        "past": [(kv, kv) for _ in range(num_layers)],
        **({"features": {0: "batch", 1: "new"}} if reads_features else {}),
    }


def tensor_specs(values) -> list[TensorSpec]:
    specs = []
    for value in values:
        tensor_type = value.type.tensor_type
        shape = [d.dim_param or d.dim_value for d in tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
        specs.append(TensorSpec(value.name, shape, dtype))
    return specs


def export_model(model, path: Path, role: str, source: str, checked: bool = False,
                 emits_features: bool = False) -> ModelEntry:
    """Export one causal LM to `path` (+ `path`.data); return its manifest entry. `checked`: `check_exportable` has
    passed already. `emits_features`: the graph also returns `hidden_states`, the LM-head input of every new token
    (for the target of a feature draft; a feature draft always reads `features` and returns `hidden_states`)."""
    if not checked:
        check_exportable(model, role)
    shape = model_shape(model)
    config = model.config.get_text_config()
    layer_types = mask_layer_types(config)
    reads_features = reads_target_features(model)
    emits_features = emits_features or reads_features
    input_names, output_names = export_io_names(shape["num_layers"], layer_types, reads_features, emits_features)
    with export_implementations(model), torch.no_grad(), warnings.catch_warnings():
        # the exporter warns that names given to axes it proves equal are merged, which is what is meant here
        warnings.filterwarnings("ignore", message=".*will not be used, since it shares the same shape constraints")
        program = torch.onnx.export(
            MaskedSplitKVDecoder(model, layer_types, emits_features).eval(),
            sample_inputs(model, len(layer_types)),
            dynamic_shapes=dynamic_shapes(shape["num_layers"], len(layer_types), reads_features),
            input_names=input_names,
            output_names=output_names,
            opset_version=OPSET,
            dynamo=True,
            optimize=True,
            verbose=False,
        )
    program.save(str(path), external_data=True)
    onnx.checker.check_model(str(path), full_check=True)
    graph = onnx.load(str(path), load_external_data=False).graph
    return ModelEntry(
        file=path.name,
        source=source,
        architecture=type(model).__name__,
        dtype=str(model.dtype).removeprefix("torch."),
        inputs=tensor_specs(graph.input),
        outputs=tensor_specs(graph.output),
        sliding_window=sliding_windows(config).get("sliding_attention"),
        hidden_size=hidden_size(model) if emits_features else None,
        logit_support=logit_support(model),
        **shape,
    )


def logit_support(model) -> list[int] | None:
    """The tokens a reduced-vocabulary head scores (`kept_token_ids`: -inf elsewhere), None for a full head; recorded
    so that drafting on ONNX Runtime works on them only, as on PyTorch (`HFBackend.logit_support`)."""
    kept = getattr(model.get_output_embeddings(), "kept_token_ids", None)
    return None if kept is None else [int(token) for token in kept]


def export_io_names(num_layers: int, layer_types: tuple[str, ...], reads_features: bool = False,
                    emits_features: bool = False) -> tuple[list[str], list[str]]:
    """`graph.io_names` with `attention_mask` replaced by the mask input of every layer type in `layer_types`, and the
    feature I/O last where the graph has it (`features` after the past K/V, `hidden_states` after the new K/V)."""
    inputs, outputs = io_names(num_layers)
    at = inputs.index("attention_mask")
    inputs = inputs[:at] + [MASK_INPUTS[t] for t in layer_types] + inputs[at + 1:]
    return inputs + [FEATURES_INPUT] * reads_features, outputs + [HIDDEN_STATES_OUTPUT] * emits_features


def eos_token_ids(model, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    return [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def export_pair(
    target,
    draft,
    tokenizer,
    out_dir: "str | Path",
    sources: dict[str, str],
    max_batch: int = DEFAULT_MAX_BATCH,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    max_past: int | None = None,
    speculative_config: str = DEFAULT_SPECULATIVE_CONFIG,
    quantization=None,
) -> Manifest:
    """Write target.onnx, draft.onnx, the tokenizer files, generation_config.json and manifest.json into `out_dir`.
    `max_past` defaults to the target's max_position_embeddings. `speculative_config`: what `generate --config auto`
    runs on the export; "auto" chooses it from the exported graphs' forwards timed here (`record_plan`). `quantization`: a
    `hf_specdec.export.quantize.QuantizationSpec` for block-quantized graphs (None: float graphs)."""
    out_dir = Path(out_dir)
    target_vocab, draft_vocab = model_shape(target)["vocab_size"], model_shape(draft)["vocab_size"]
    if target_vocab != draft_vocab:
        raise ValueError(
            f"draft vocabulary ({draft_vocab} tokens) differs from the target's ({target_vocab}): the draft must use "
            "the target's tokenizer"
        )
    plan = speculative_config == AUTO
    config = SpeculativeConfig.parse(DEFAULT_SPECULATIVE_CONFIG if plan else speculative_config)
    if config.tree_size + 1 > max_new_tokens and not plan:
        raise ValueError(
            f"speculative config {config} scores {config.tree_size + 1} tokens per target forward, more than "
            f"--max-new-tokens {max_new_tokens}: raise --max-new-tokens or choose a smaller tree"
        )
    max_past = max_past or target.config.get_text_config().max_position_embeddings
    if reads_target_features(target):
        raise ValueError(
            f"the target ({type(target).__name__}) is a feature-conditioned draft: it needs another model's features "
            "at every forward; export it as the draft of the target it was trained for (--target TARGET --draft DRAFT)"
        )
    feature_pair = reads_target_features(draft)
    if feature_pair:
        check_feature_draft(draft, target)
    models = {"target": target, "draft": draft}
    for role, model in models.items():
        check_exportable(model, role)  # both, before anything is traced or written
    out_dir.mkdir(parents=True, exist_ok=True)
    # the manifest is written last, so that a directory holds one only when its export finished: an export stopped
    # half way (or a failed re-export over an older one) leaves none, and loading it says so
    (out_dir / MANIFEST_FILE).unlink(missing_ok=True)
    # a feature draft reads the target's features: the target graph returns them (`hidden_states`)
    entries = {role: export_model(model, out_dir / f"{role}.onnx", role, sources[role], checked=True,
                                  emits_features=feature_pair and role == "target")
               for role, model in models.items()}
    if quantization is not None:
        entries = {role: quantize_model(entry, out_dir, models[role], role, quantization)
                   for role, entry in entries.items()}
    saved = [Path(p) for p in tokenizer.save_pretrained(str(out_dir))]
    target.generation_config.save_pretrained(str(out_dir))
    pad = target.generation_config.pad_token_id
    manifest = Manifest(
        target=entries["target"],
        draft=entries["draft"],
        vocab_size=target_vocab,
        eos_token_id=eos_token_ids(target, tokenizer),
        pad_token_id=tokenizer.pad_token_id if pad is None else int(pad),
        tokenizer_files={p.name: sha256(p) for p in saved if p.is_file()},
        max_dims={"batch": max_batch, "new": max_new_tokens, "past": max_past},
        speculative_config=str(config),
        export={
            "exporter": "torch.onnx.export(dynamo=True, optimize=True)",
            "opset": OPSET,
            "attention": "split past/new K/V, grouped query heads, additive float mask (one per layer type: full, "
            "sliding window); eager math",
            "sample_dims": SAMPLE_DIMS,
            "versions": {p: importlib.metadata.version(p) for p in ("torch", "transformers", "onnx", "onnxscript")},
        },
    )
    if quantization is not None:
        manifest.export["quantization"] = dataclasses.asdict(quantization)
        manifest.export["versions"]["onnxruntime"] = importlib.metadata.version("onnxruntime")
        manifest = record_parity(manifest, models, out_dir)
    if plan:
        manifest = record_plan(manifest, models, out_dir)
    manifest.save(out_dir)
    return manifest


def record_plan(manifest: Manifest, models: dict, out_dir: Path) -> Manifest:
    """The config `generate --config auto` runs, chosen from the exported graphs' own forwards on ONNX Runtime here
    (`planner.exported`): the manifest with it and what it was chosen from (`export.planned`), not yet saved."""
    from hf_specdec.export.ort_backend import OrtBackend, default_device
    from hf_specdec.planner.exported import plan_exported

    device = default_device()
    target, draft = (OrtBackend(out_dir, role, manifest, device) for role in ("target", "draft"))
    config, record = plan_exported(target, draft, models["target"], models["draft"], manifest.max_dims["new"],
                                   manifest.max_dims["past"])
    return dataclasses.replace(manifest, speculative_config=str(config), export={**manifest.export, "planned": record})


def quantize_model(entry: ModelEntry, out_dir: Path, model, role: str, spec) -> ModelEntry:
    """The exported float graph of `model` rewritten with block-quantized weights (`quantize.quantize_onnx_file`); the
    GGUF's blocks are used for the target only (the file it was converted from)."""
    from hf_specdec.export.quantize import GgufWeights, parameter_names, quantize_onnx_file

    gguf = None
    if spec.gguf is not None and role == "target":
        gguf = GgufWeights(spec.gguf, model.config.get_text_config())
    record = quantize_onnx_file(out_dir / entry.file, spec, parameter_names(model), gguf)
    if gguf is not None and "gguf:" not in f"{record['source']} {record['head_source']}":
        raise ValueError(
            f"none of the tensors of {spec.gguf} holds a weight of the target ({type(model).__name__}) in a block type "
            "MatMulNBits can represent (Q4_0, Q4_1, Q8_0) with the same values: it is not the GGUF the target was "
            "converted from; pass that file with --gguf, or --gguf none to quantize the float weights"
        )
    if record["quantized_matmuls"] == 0:
        raise ValueError(f"the {role} graph has no product by a constant 2-D weight to quantize ({type(model).__name__})")
    return dataclasses.replace(entry, quantization=record)


def record_parity(manifest: Manifest, models: dict, out_dir: Path) -> Manifest:
    """Each quantized graph on ONNX Runtime against its float model (`quantize.measure_parity`), and the target graph
    against itself (`quantize.measure_consistency`): the manifest with them, not yet saved."""
    from hf_specdec.backends.hf import HFBackend
    from hf_specdec.export.ort_backend import OrtBackend
    from hf_specdec.export.quantize import measure_consistency, measure_parity

    entries = {}
    for role, model in models.items():
        entry = manifest.entry(role)
        backend = OrtBackend(out_dir, role, manifest, "cpu")
        record = {**entry.quantization, "parity": measure_parity(HFBackend(model, role), backend, entry.vocab_size)}
        if role == "target":  # what speculative decoding's exactness is measured against: the target graph itself
            record["consistency"] = measure_consistency(backend, entry.vocab_size)
        entries[role] = dataclasses.replace(entry, quantization=record)
    return dataclasses.replace(manifest, **entries)

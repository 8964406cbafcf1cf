"""Tiny exported pairs for the ONNX tests: each is exported once per test run and shared by pytest-xdist workers."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import numpy as np
import torch
from feature_fixtures import feature_draft_for, predictable_target
from tiny_models import perturbed_copy, tiny_model, word_tokenizer

from hf_specdec.cli import main as cli_main
from hf_specdec.export.manifest import MANIFEST_FILE
from hf_specdec.export.onnx_export import export_pair


class ReducedVocabHead(torch.nn.Module):
    """The head of the project's draft model: logits for a token subset, -inf for every other token."""

    def __init__(self, head: torch.nn.Linear, kept_token_ids: torch.Tensor):
        super().__init__()
        self.vocab_size = head.out_features
        self.kept = torch.nn.Linear(head.in_features, len(kept_token_ids), bias=False)
        self.kept.weight.data.copy_(head.weight.data[kept_token_ids])
        self.register_buffer("kept_token_ids", kept_token_ids)

    def forward(self, hidden_states):
        kept = self.kept(hidden_states)
        logits = kept.new_full((*kept.shape[:-1], self.vocab_size), float("-inf"))
        return logits.index_copy_(-1, self.kept_token_ids, kept)


def reduced_vocab_draft(target, noise: float = 0.05, kept: int = 80):
    """A perturbed copy of `target` whose head covers `kept` tokens (q = 0 elsewhere), like the project's draft."""
    draft = perturbed_copy(target, noise=noise)
    generator = torch.Generator().manual_seed(5)
    kept_token_ids = torch.randperm(target.config.vocab_size, generator=generator)[:kept].sort().values
    draft.lm_head = ReducedVocabHead(draft.lm_head, kept_token_ids)
    return draft


def tiny_pair(family: str, vocab_size: int = 96):
    """(target, draft) used by the greedy tests: a peaky target and a draft that agrees with it often."""
    target = tiny_model(family, vocab_size=vocab_size, scale=0.3)
    target.generation_config.eos_token_id = None
    draft = reduced_vocab_draft(target) if family == "llama" else perturbed_copy(target, noise=0.05)
    return target, draft


def shared_root(tmp_path_factory) -> Path:
    """A folder every xdist worker of this run sees (the workers' base temp folders share a parent)."""
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


def export_once(tmp_path_factory, name: str, export) -> Path:
    """Run `export(out_dir)` into a folder shared by the xdist workers, once per test run."""
    out = shared_root(tmp_path_factory) / f"onnx-{name}"
    with open(f"{out}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / MANIFEST_FILE).is_file():
            export(out)
    return out


MAX_NEW_TOKENS = 32  # tokens per forward in the tiny exports: small, so that long prompts are prefilled in chunks


def export_tiny_pair(tmp_path_factory, family: str) -> Path:
    """The `tiny_pair` of `family`, exported (see `_export_pair`)."""
    target, draft = tiny_pair(family)
    return _export_pair(tmp_path_factory, family, target, draft, f"tiny {family} draft")


def _export_pair(tmp_path_factory, name: str, target, draft, draft_source: str) -> Path:
    """Export (target, draft) once per test run under `name`. The gpt2 pairs go through the command line
    (`hf-specdec export --target DIR --draft DIR` on saved models), the others through the Python API."""
    family = target.config.model_type
    tokenizer = word_tokenizer(target.config.vocab_size)

    def export_with_api(out: Path) -> None:
        export_pair(target, draft, tokenizer, out, {"target": f"tiny {family}", "draft": draft_source},
                    max_new_tokens=MAX_NEW_TOKENS)

    def export_with_cli(out: Path) -> None:
        source = tmp_path_factory.mktemp(f"{name}-source")
        target.save_pretrained(source / "target")
        tokenizer.save_pretrained(source / "target")
        draft.save_pretrained(source / "draft")
        arguments = ["export", "--target", str(source / "target"), "--draft", str(source / "draft"), "--out", str(out),
                     "--max-new-tokens", str(MAX_NEW_TOKENS)]
        assert cli_main(arguments) == 0

    return export_once(tmp_path_factory, name, export_with_cli if family == "gpt2" else export_with_api)


def feature_pair(family: str):
    """(target, feature draft) used by the feature-draft tests: a `predictable_target` and a feature draft that
    agrees with it often."""
    target = predictable_target(family)
    target.generation_config.eos_token_id = None
    return target, feature_draft_for(target)


def export_feature_pair(tmp_path_factory, family: str) -> Path:
    """The `feature_pair` of `family`, exported (the target graph returns `hidden_states`, the draft graph reads
    `features`; see `_export_pair`)."""
    target, draft = feature_pair(family)
    return _export_pair(tmp_path_factory, f"feature-{family}", target, draft, f"tiny {family} feature draft")



def export_quantized_pair(tmp_path_factory, name: str, target, draft, tokenizer, quantization, **options) -> Path:
    """`target` and `draft` exported with block-quantized weights (`quantization`: a
    `hf_specdec.export.quantize.QuantizationSpec`), once per test run."""

    def export(out: Path) -> None:
        export_pair(target, draft, tokenizer, out, {"target": f"{name} target", "draft": f"{name} draft"},
                    quantization=quantization, **options)

    return export_once(tmp_path_factory, f"quantized-{name}", export)


def llama_cpp_permute(weights, heads: int):
    """llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel.permute): the rows of each of `heads` q or k heads
    interleaved for its rotary layout."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


# transformers parameter name pattern -> llama.cpp tensor name
LLAMA_CPP_NAMES = {
    r"model\.embed_tokens\.weight": "token_embd.weight",
    r"model\.norm\.weight": "output_norm.weight",
    r"lm_head\.weight": "output.weight",
    r"model\.layers\.(\d+)\.input_layernorm\.weight": r"blk.\1.attn_norm.weight",
    r"model\.layers\.(\d+)\.post_attention_layernorm\.weight": r"blk.\1.ffn_norm.weight",
    r"model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.weight": r"blk.\1.attn_\2.weight",
    r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight": r"blk.\1.attn_output.weight",
    r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight": r"blk.\1.ffn_\2.weight",
}


def write_llama_gguf(model, path: Path, linear_type: str = "Q4_1", embedding_type: str = "Q8_0"):
    """Write a Llama `model` as llama.cpp's converter would (q/k rows permuted; linears in `linear_type` blocks, the
    embedding in `embedding_type`, norms F32; a tied head stored once, as the embedding), then load the file's
    dequantized values back into `model` the way transformers' GGUF loader does (q/k rows un-permuted by its own
    code). Returns `model`, now holding exactly the weights of the GGUF."""
    import re

    import gguf
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    unpermute = LlamaTensorProcessor(config={"num_attention_heads": heads, "num_key_value_heads": kv_heads})
    tied = config.tie_word_embeddings
    loaded = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and tied:
            continue
        gguf_name = next(re.sub(f"^{p}$", r, name) for p, r in LLAMA_CPP_NAMES.items() if re.match(f"^{p}$", name))
        weights = tensor.detach().numpy().astype(np.float32)
        if "norm" in name:
            writer.add_tensor(gguf_name, weights)
            continue
        q_or_k = re.search(r"\.attn_([qk])\.", gguf_name)
        if q_or_k:
            weights = llama_cpp_permute(weights, heads if q_or_k[1] == "q" else kv_heads)
        qtype = gguf.GGMLQuantizationType[embedding_type if "token_embd" in gguf_name else linear_type]
        raw = gguf.quants.quantize(np.ascontiguousarray(weights), qtype)
        writer.add_tensor(gguf_name, raw, raw_dtype=qtype)
        values = gguf.quants.dequantize(raw, qtype)
        if q_or_k:
            values = unpermute._reverse_permute_weights(values, heads, kv_heads if q_or_k[1] == "k" else heads)
        loaded[name] = torch.from_numpy(np.ascontiguousarray(values))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name in loaded:
                parameter.copy_(loaded[name])
    return model

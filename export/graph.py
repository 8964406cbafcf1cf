"""The traced function behind every exported model: one decoder forward over new tokens and a fixed-capacity KV cache.

    inputs   input_ids [batch, new] int64, position_ids [batch, new] int64,
             attention_mask [batch, new, past + new] bool (True = attend; columns: the `past` cache slots, then the
             new tokens), logits_index [kept] int64 (which new tokens get logits),
             past_key_<i>, past_value_<i> [batch, kv_heads, past, head_dim] for every layer i
    outputs  logits [batch, kept, vocab] float32,
             new_key_<i>, new_value_<i> [batch, kv_heads, new, head_dim]: the K/V of the new tokens only
    feature pairs (`hf_specdec.export.onnx_export`): the target also returns hidden_states [batch, new, hidden] (its
             LM-head input); the feature draft also takes features [batch, new, hidden] and returns hidden_states

The past K/V are read in place and never concatenated with the new ones: attention is computed as
softmax([q.K_past, q.K_new]) . [V_past; V_new] with the two halves multiplied separately, and query heads are grouped
per K/V head instead of repeating K/V (no `repeat_kv` copy). So the runtime can bind its preallocated cache buffers
as `past_*` (unused slots masked out) and append only the `new_*` outputs: no step copies the whole cache.

The model's own code does everything else (embeddings, RoPE or learned positions, MLP, norms, head): its attention
implementation is switched to `split_kv_attention` for the trace, which receives the new K/V after RoPE and finds the
layer's past K/V in the `split_kv` keyword that transformers forwards to attention functions.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import AttentionInterface

ATTENTION_NAME = "hf_specdec_split_kv"


class SplitKV:
    """Past K/V per layer (graph inputs) and the new K/V each layer computed (graph outputs)."""

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]]):
        self.past = past
        self.new: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def flat_new(self) -> list[torch.Tensor]:
        return [tensor for layer in range(len(self.past)) for tensor in self.new[layer]]


def split_kv_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, split_kv: SplitKV = None,
                       softcap: float | None = None, **kwargs):
    """Attention of `query` [B, H, T, D] over the layer's past K/V and the new `key`/`value` [B, Hkv, T, D].
    `attention_mask` is additive [B, 1, T, past + T]; `softcap` caps the scores as Gemma 2's eager attention does
    (softcap * tanh(scores / softcap), before the mask). Returns [B, T, H, D] as transformers' attention functions do."""
    past_key, past_value = split_kv.past[module.layer_idx]
    split_kv.new[module.layer_idx] = (key, value)
    batch, heads, length, head_dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    # query heads kv*groups .. kv*groups + groups-1 share K/V head kv: fold them into the row axis
    grouped = query.reshape(batch, kv_heads, groups * length, head_dim)
    scores = torch.cat([grouped @ past_key.transpose(-1, -2), grouped @ key.transpose(-1, -2)], -1) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.view(batch, kv_heads, groups, length, -1) + attention_mask[:, :, None]
    probs = scores.softmax(-1, dtype=torch.float32).to(query.dtype).view(batch, kv_heads, groups * length, -1)
    past_length = past_key.shape[2]
    out = probs[..., :past_length] @ past_value + probs[..., past_length:] @ value
    return out.view(batch, heads, length, head_dim).transpose(1, 2), None


AttentionInterface.register(ATTENTION_NAME, split_kv_attention)


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """(input names, output names) in graph order."""
    per_layer = [(i, kind) for i in range(num_layers) for kind in ("key", "value")]
    inputs = ["input_ids", "position_ids", "attention_mask", "logits_index"] + [f"past_{k}_{i}" for i, k in per_layer]
    outputs = ["logits"] + [f"new_{k}_{i}" for i, k in per_layer]
    return inputs, outputs


@contextlib.contextmanager
def split_kv_attention_enabled(model):
    """Run `model` with `split_kv_attention`, restoring its attention implementation afterwards."""
    config = model.config.get_text_config()
    saved = config._attn_implementation
    config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = saved


class SplitKVDecoder(torch.nn.Module):
    """The module that is traced: a causal LM with graph-level I/O (see the module docstring)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.logits_to_keep = model._supports_logits_to_keep()

    def forward(self, input_ids, position_ids, attention_mask, logits_index, past):
        dtype = self.model.dtype
        # eager-style attention adds the mask to the scores: 0 where attended, the dtype's minimum elsewhere
        additive = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device).masked_fill(~attention_mask, torch.finfo(dtype).min)
        split_kv = SplitKV(past)
        out = self.model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=additive[:, None],
            use_cache=False,
            split_kv=split_kv,
            **({"logits_to_keep": logits_index} if self.logits_to_keep else {}),
        )
        logits = out.logits if self.logits_to_keep else out.logits[:, logits_index]
        return (logits.float(), *split_kv.flat_new())

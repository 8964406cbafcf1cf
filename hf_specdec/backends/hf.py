"""The PyTorch backend: a Hugging Face causal LM with a `DynamicCache` it owns."""

from __future__ import annotations

import contextlib
import inspect

import torch
from transformers import DynamicCache

from hf_specdec.backends.base import Forward
from hf_specdec.cache_layout import sliding_window_mask
from hf_specdec.compat import cache_keyword
from hf_specdec.feature_draft import reads_target_features
from hf_specdec.rope import PlainDecodingRope

# attention implementations that apply an arbitrary 4D mask (flash attention kernels only know causal + padding)
TREE_MASK_ATTENTION = ("eager", "sdpa")


def check_tree_attention(model, role: str) -> None:
    implementation = getattr(model.config, "_attn_implementation", None) or "eager"
    if implementation not in TREE_MASK_ATTENTION:
        raise ValueError(
            f"the {role} model uses attn_implementation={implementation!r}, which ignores the 4D tree attention mask "
            "that speculative decoding needs; load it with attn_implementation='sdpa' (or 'eager'), or call "
            f"model.set_attn_implementation('sdpa') before generate()"
        )


def uses_alibi(config) -> bool:
    """BLOOM, MPT and Falcon with alibi=True add ALiBi biases that transformers builds from a 2D padding mask."""
    attn_config = getattr(config, "attn_config", None)
    return (
        config.model_type == "bloom"
        or bool(getattr(config, "alibi", False))
        or bool(getattr(attn_config, "alibi", False) if not isinstance(attn_config, dict) else attn_config.get("alibi"))
    )


def check_position_encoding(model, role: str) -> None:
    config = model.config.get_text_config()
    if uses_alibi(config):
        raise ValueError(
            f"the {role} model ({type(model).__name__}) uses ALiBi position biases, which transformers computes from "
            "a 2D padding mask and cannot follow the holes and branches of a draft tree, so speculative decoding would "
            "not reproduce its output; use plain generate() (or HF assisted generation) with this model, or a model "
            "with rotary or learned position embeddings"
        )


def sliding_windows(config) -> dict[str, int]:
    """Window size per attention layer type that uses one ({} for full attention only)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        # Mistral-style configs: a set sliding_window applies to every layer
        return {"sliding_attention": window} if window else {}
    unknown = set(layer_types) - {"full_attention", "sliding_attention"}
    if unknown:
        raise ValueError(f"speculative decoding does not support attention layer types {sorted(unknown)} yet")
    return {"sliding_attention": window} if "sliding_attention" in layer_types and window else {}


def check_position_ids_taken(model, role: str) -> None:
    """A tree's siblings share a position: a model that numbers positions by cache slot (its forward takes no
    position_ids: RoFormer, TrOCR and the causal-LM halves of BART-style models) would give them consecutive ones."""
    if "position_ids" not in inspect.signature(model.forward).parameters:
        raise ValueError(
            f"the {role} model ({type(model).__name__}) takes no position_ids: it numbers positions by cache slot, "
            "which the branches of a draft tree do not follow, so speculative decoding would not reproduce its output; "
            "use plain generate() with this model"
        )


def check_local_attention(model, role: str) -> None:
    """GPT-Neo's local layers keep their window by cache slot inside their attention (`window_size`), not through a
    mask the loop builds: tree slots would shift it."""
    config = model.config.get_text_config()
    if "local" in (getattr(config, "attention_layers", None) or []):
        raise ValueError(
            f"the {role} model ({type(model).__name__}) has local attention layers (window_size="
            f"{getattr(config, 'window_size', None)}), applied by cache slot, which tree slots would shift; use plain "
            "generate() with this model, or a config whose attention_types are all global"
        )


def check_runnable(model, role: str) -> None:
    """What the loop needs of a model, checked before its first forward: an error that names the fix, never a
    silently different output."""
    check_tree_attention(model, role)
    check_position_encoding(model, role)
    check_position_ids_taken(model, role)
    check_local_attention(model, role)


@contextlib.contextmanager
def lm_head_inputs_recorded(model):
    """Inside the context, each forward of `model` appends its LM-head input (the decoder's last hidden state, for all
    the tokens it ran, whatever `logits_to_keep` keeps for the head) to the yielded list."""
    recorded = []
    hook = model.get_decoder().register_forward_hook(lambda module, args, output: recorded.append(output.last_hidden_state))
    try:
        yield recorded
    finally:
        hook.remove()


class HFBackend:
    def __init__(self, model, role: str = "target"):
        check_runnable(model, role)
        self.model = model
        self.device = model.device
        self.vocab_size = model.config.get_text_config().vocab_size
        self.hidden_size = model.config.get_text_config().hidden_size
        self.reads_features = reads_target_features(model)
        # a reduced-vocabulary model scores only these tokens (its logits are -inf elsewhere)
        self.logit_support = getattr(model.get_output_embeddings(), "kept_token_ids", None)
        self.windows = sliding_windows(model.config.get_text_config())
        layer_types = getattr(model.config.get_text_config(), "layer_types", None)
        # a dict of masks only where the model mixes layer types (Mistral-style models take a single tensor)
        self.mixed_layers = layer_types is not None and len(set(layer_types)) > 1
        self.min_value = torch.finfo(model.dtype).min
        self.supports_logits_to_keep = model._supports_logits_to_keep()
        self.cache = None
        self.cache_keyword = cache_keyword(model)  # read once: `_run` is on every forward's path
        self.rope = PlainDecodingRope.for_model(model)  # None unless the rotary frequencies depend on the length

    def reset(self, batch_size: int, prompt_lengths: torch.Tensor) -> None:
        self.cache = DynamicCache()
        if self.rope is not None:
            self.rope.start(prompt_lengths)

    def _model_mask(self, mask: torch.Tensor, position_ids: torch.Tensor, key_positions: torch.Tensor):
        # eager attention adds the mask to the scores: it must be float (a bool mask is silently wrong there)
        def additive(m):
            return torch.zeros(m.shape, dtype=self.model.dtype, device=m.device).masked_fill_(~m, self.min_value)[:, None]

        if not self.windows:
            return additive(mask)
        windowed = additive(sliding_window_mask(mask, position_ids, key_positions, self.windows["sliding_attention"]))
        if self.mixed_layers:
            return {"full_attention": additive(mask), "sliding_attention": windowed}
        return windowed

    def _run(self, input_ids, position_ids, attention_mask, key_positions, logits_to_keep, features,
             return_features) -> Forward:
        if self.reads_features and features is None:
            raise ValueError("this draft reads the target's features: pass features=")
        inputs = dict(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=self._model_mask(attention_mask, position_ids, key_positions),
            **{self.cache_keyword: self.cache},
            use_cache=True,
            **({"logits_to_keep": logits_to_keep} if self.supports_logits_to_keep else {}),
        )
        with contextlib.nullcontext() if self.rope is None else self.rope.patched(position_ids):
            if self.reads_features:
                out = self.model(**inputs, features=features)
                return Forward(out.logits, out.features)
            if not return_features:
                return Forward(self.model(**inputs).logits, None)
            with lm_head_inputs_recorded(self.model) as recorded:
                logits = self.model(**inputs).logits
            return Forward(logits, recorded[-1])

    def prefill(self, input_ids, position_ids, attention_mask, key_positions, features=None,
                return_features=False) -> torch.Tensor | None:
        out = self._run(input_ids, position_ids, attention_mask, key_positions, 1, features, return_features)
        return out.features if return_features else None

    def forward(self, input_ids, position_ids, attention_mask, key_positions, features=None,
                return_features=False) -> Forward:
        logits, hidden = self._run(input_ids, position_ids, attention_mask, key_positions, 0, features, return_features)
        return Forward(logits.float(), hidden)

    def keep(self, start: int, source_slots: torch.Tensor) -> None:
        end = start + source_slots.shape[1]
        for layer in self.cache.layers:
            index = source_slots[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
            # gather first (a copy), then write over the step's block and drop what follows it
            kept_keys, kept_values = layer.keys.gather(2, index), layer.values.gather(2, index)
            layer.keys[:, :, start:end] = kept_keys
            layer.values[:, :, start:end] = kept_values
            layer.keys, layer.values = layer.keys[:, :, :end], layer.values[:, :, :end]

    def select_rows(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows)
        if self.rope is not None:
            self.rope.select_rows(rows)

    def finish(self, generated_tokens: int) -> None:
        if self.rope is not None:
            self.rope.finish(generated_tokens)

"""The shape of a Llama-family decoder: everything the latency model needs from a model config."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

# Decoders with RMSNorm, (grouped-query) attention with rotary positions and a gated MLP (gate/up/down):
# their forward is the same sequence of matmuls, so one operator model covers them all.
LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "granite", "olmo", "olmo2", "phi3")
# hf_specdec's distilled drafts (`hf_specdec.draft_model`): a Llama whose LM head scores only `kept_token_ids`
REDUCED_VOCAB_LLAMA = "hf_specdec_reduced_vocab_llama"
# its feature-conditioned drafts (`hf_specdec.feature_draft`): the same head, plus a 2H -> H fusion before the layers
FEATURE_DRAFT = "hf_specdec_feature_draft"
REDUCED_VOCAB = (REDUCED_VOCAB_LLAMA, FEATURE_DRAFT)


@dataclass(frozen=True)
class ModelShape:
    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int  # rows of the LM head
    tie_word_embeddings: bool = False

    @property
    def num_parameters(self) -> int:
        attention = self.hidden_size * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * self.hidden_size * self.intermediate_size
        norms = 2 * self.hidden_size
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attention + mlp + norms) + self.hidden_size + embeddings

    def key(self) -> str:
        """A short hash of the fields that set latency (not the name): the calibration cache key."""
        fields = dataclasses.asdict(self)
        del fields["name"]
        return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


PRESETS = {
    # Llama-2-7B (meta-llama/Llama-2-7b-hf config.json)
    "llama-7b": ModelShape("llama-7b", num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=32,
                           head_dim=128, intermediate_size=11008, vocab_size=32000),
    # SmolLM2-135M(-Instruct), the embedded default target
    "smollm2-135m": ModelShape("smollm2-135m", num_layers=30, hidden_size=576, num_heads=9, num_kv_heads=3,
                               head_dim=64, intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True),
}


def shape_from_config(config, name: str | None = None) -> ModelShape:
    """A `ModelShape` from a transformers `PretrainedConfig` or the dict of a config.json."""
    fields = config if isinstance(config, dict) else config.to_dict()
    fields = {**fields, **fields.get("text_config", {})}  # multimodal wrappers keep the decoder under text_config
    model_type = fields.get("model_type", "?")
    name = name or fields.get("_name_or_path") or model_type
    if model_type not in (*LLAMA_FAMILY, *REDUCED_VOCAB):
        raise ValueError(
            f"cannot model {name!r} (model_type {model_type!r}): the planner models Llama-family decoders "
            f"({', '.join(LLAMA_FAMILY)}); pass a preset ({', '.join(PRESETS)}) or the config.json of such a model"
        )
    if fields.get("num_local_experts") or fields.get("num_experts"):
        raise ValueError(f"cannot model {name!r}: mixture-of-experts MLPs are not modelled; pass a dense Llama-family model")
    missing = [k for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size")
               if not fields.get(k)]
    if missing:
        raise ValueError(f"cannot model {name!r}: its config lacks {', '.join(missing)}")
    num_heads = fields["num_attention_heads"]
    return ModelShape(
        name=str(name),
        num_layers=fields["num_hidden_layers"],
        hidden_size=fields["hidden_size"],
        num_heads=num_heads,
        num_kv_heads=fields.get("num_key_value_heads") or num_heads,
        head_dim=fields.get("head_dim") or fields["hidden_size"] // num_heads,
        intermediate_size=fields["intermediate_size"],
        vocab_size=len(fields["kept_token_ids"]) if model_type in REDUCED_VOCAB else fields["vocab_size"],
        tie_word_embeddings=bool(fields.get("tie_word_embeddings", False)),
    )


def load_shape(spec: str) -> ModelShape:
    """A preset name, a config.json, a model directory or a Hugging Face model id."""
    if spec in PRESETS:
        return PRESETS[spec]
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise ValueError(f"no config file at {path}; pass a preset ({', '.join(PRESETS)}), a model directory or a config.json")
        try:
            return shape_from_config(json.loads(path.read_text()), name=spec)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); pass a model's config.json") from err
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(spec)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"unknown model {spec!r}: not a preset ({', '.join(PRESETS)}), a local directory or config.json, "
            f"and the Hugging Face hub gave: {err}"
        ) from err
    return shape_from_config(config, name=spec)

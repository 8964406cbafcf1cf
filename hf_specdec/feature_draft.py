"""A feature-conditioned draft (EAGLE-style): it reads the target's own hidden state, not only tokens.

At position t the draft takes the target's LM-head input at t-1 (the "feature": the target's last hidden state, after
its final norm) and the embedding of token t, fuses them with one linear layer (2H -> H), runs one or two Llama decoder
layers over its own KV cache, and applies a final norm: the result is its prediction of the target's feature at t,
and a reduced-vocabulary head on it gives q(x_{t+1}) (-inf outside the kept tokens, so q = 0 there and sampling stays
exact). Deeper tree levels feed the draft's own predicted feature where the target's is not known yet; after each
verification the accepted tokens are re-read with the target's true features (Li et al., EAGLE, 2024).

The target's last hidden state already encodes most of what comes next, so one layer on top of it predicts the target
far better than a small standalone model that sees tokens only.

It is a `LlamaForCausalLM` underneath (position ids, 4D masks, `DynamicCache`), but every forward needs `features`:
plain `generate()` and HF assisted generation cannot drive it (they have no target features to give); use it as
`draft_model=` of `speculative_generate`, which sees what kind of draft it is. Importing this module registers the
model type with the Auto classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaModel
from transformers.modeling_outputs import ModelOutput
from transformers.models.llama.modeling_llama import LlamaForCausalLM, LlamaPreTrainedModel

from hf_specdec.compat import cache_keyword, returned_cache
from hf_specdec.draft_model import ReducedVocabEmbedding, ReducedVocabHead


@strict
class FeatureDraftConfig(LlamaConfig):
    """`LlamaConfig` of the draft's own layers (`num_hidden_layers` of them, the target's hidden size) plus its output
    vocabulary subset and the rank of the embedding of the other tokens."""

    model_type = "hf_specdec_feature_draft"

    kept_token_ids: list[int] | None = None  # the draft's output vocabulary, in head-row order
    oov_embedding_rank: int = 32
    logit_scale: float = 1.0  # q = softmax(logit_scale * logits), as in `ReducedVocabHead`

    def validate_architecture(self):
        super().validate_architecture()
        kept = self.kept_token_ids or []
        if not kept or len(set(kept)) != len(kept) or min(kept) < 0 or max(kept) >= self.vocab_size:
            raise ValueError(
                f"kept_token_ids must be {len(kept) and 'distinct '}token ids in [0, {self.vocab_size}); got {len(kept)} ids"
            )


@dataclass
class FeatureDraftOutput(ModelOutput):
    logits: torch.Tensor | None = None  # [B, T, V] (or the positions of logits_to_keep): -inf outside the kept tokens
    features: torch.Tensor | None = None  # [B, T, H]: the draft's prediction of the target's feature at each position
    cache: object = None  # the KV cache (named as transformers' own outputs name it from 5.24 on)


_BODY_CACHE_KEYWORD = cache_keyword(LlamaModel)  # how the Llama body takes its KV cache, read once


class FeatureDraftModel(LlamaModel):
    """The draft's body: fuse(embedding of x_t, target feature at t-1) -> decoder layers -> final norm."""

    def __init__(self, config: FeatureDraftConfig):
        super().__init__(config)
        # LlamaModel built a full-vocabulary embedding first: free under `from_pretrained` (meta device)
        self.embed_tokens = ReducedVocabEmbedding(config)
        self.fuse = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=True)
        self.post_init()

    def forward(self, input_ids=None, features=None, attention_mask=None, position_ids=None, cache=None,
                use_cache=None, **kwargs):
        if features is None:
            raise ValueError(
                "a feature draft reads the target's hidden states (features=...) at every forward: use it as "
                "draft_model= of speculative_generate (model.generate(custom_generate=speculative_generate, "
                "draft_model=...)); plain generate() and HF assisted generation (assistant_model=) need a standalone "
                "draft such as hf_specdec.models.load_draft(kind='standalone')"
            )
        embeddings = self.embed_tokens(input_ids)
        fused = self.fuse(torch.cat([embeddings, features.to(embeddings.dtype)], dim=-1))
        return super().forward(inputs_embeds=fused, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=use_cache, **{_BODY_CACHE_KEYWORD: cache}, **kwargs)


class FeatureDraftForCausalLM(LlamaForCausalLM):
    """See the module docstring. `forward(input_ids, features, ...)` returns logits and the predicted features."""

    config_class = FeatureDraftConfig
    reads_target_features = True  # what the speculative loop checks to drive it as a feature draft
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.kept.weight"}

    def __init__(self, config: FeatureDraftConfig):
        LlamaPreTrainedModel.__init__(self, config)
        self.model = FeatureDraftModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = ReducedVocabHead(config)
        self.post_init()

    def forward(self, input_ids=None, features=None, attention_mask=None, position_ids=None, cache=None,
                use_cache=None, logits_to_keep: int | torch.Tensor = 0, **kwargs) -> FeatureDraftOutput:
        """input_ids [B, T]: tokens x_t; features [B, T, H]: the target's feature at t-1 for each (or the draft's own
        prediction of it, deeper in a tree)."""
        out = self.model(input_ids=input_ids, features=features, attention_mask=attention_mask,
                         position_ids=position_ids, cache=cache, use_cache=use_cache, **kwargs)
        hidden = out.last_hidden_state
        kept = hidden[:, -logits_to_keep:] if isinstance(logits_to_keep, int) and logits_to_keep else hidden
        if isinstance(logits_to_keep, torch.Tensor):
            kept = hidden[:, logits_to_keep]
        return FeatureDraftOutput(logits=self.lm_head(kept), features=hidden, cache=returned_cache(out))

    def prepare_inputs_for_generation(self, *args, **kwargs):
        raise ValueError(
            "a feature draft cannot run in generate() or HF assisted generation: it needs the target's hidden states; "
            "pass it as draft_model= to model.generate(custom_generate=speculative_generate, ...)"
        )


def reads_target_features(model) -> bool:
    """Whether `model` is a feature-conditioned draft (it reads the target's features at every forward)."""
    return bool(getattr(model, "reads_target_features", False))


def timing_inputs(model, input_ids: torch.Tensor) -> dict:
    """Extra forward arguments for timing or probing `model` on `input_ids` alone: zero features for a feature draft
    (its cost does not depend on their values), nothing for other models."""
    if not reads_target_features(model):
        return {}
    hidden = model.config.get_text_config().hidden_size
    return {"features": torch.zeros(*input_ids.shape, hidden, dtype=model.dtype, device=input_ids.device)}


def check_feature_draft(draft, target) -> None:
    """A feature draft fits a target only if it reads features of the target's width."""
    draft_hidden = draft.config.get_text_config().hidden_size
    target_hidden = target.config.get_text_config().hidden_size
    if draft_hidden != target_hidden:
        raise ValueError(
            f"the feature draft reads hidden states of size {draft_hidden}, but the target's are of size "
            f"{target_hidden}: it was trained for another target; train one for this target with "
            "`hf-specdec distill --draft-type feature --target ...`, or use a standalone draft"
        )


AutoConfig.register(FeatureDraftConfig.model_type, FeatureDraftConfig, exist_ok=True)
AutoModelForCausalLM.register(FeatureDraftConfig, FeatureDraftForCausalLM, exist_ok=True)

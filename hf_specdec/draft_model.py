"""A Llama draft model with a reduced output vocabulary that still behaves as a full-vocabulary causal LM.

Most of a small draft's cost is its LM head (SmolLM2: 49152 x 576, a quarter of the whole 135M target).
This draft scores only `kept_token_ids` (e.g. the 8192 tokens that carry most of the target's probability
mass) and returns full-vocabulary logits with -inf everywhere else, so its q is exactly 0 outside the subset.
Speculative sampling stays exact (it only needs q to be the distribution drafted from), and HF assisted
generation, tree masks, position_ids and DynamicCache work as with any `LlamaForCausalLM`: only the
embedding and the head differ.

Input tokens outside the subset are embedded through a low-rank table over the whole vocabulary
(`oov_embedding_rank` dims, projected up to the hidden size), so the draft still tells them apart.

Importing this module registers the model type with `AutoConfig` / `AutoModelForCausalLM`.
"""

from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, LlamaModel
from transformers.models.llama.modeling_llama import LlamaPreTrainedModel


@strict
class ReducedVocabLlamaConfig(LlamaConfig):
    """`LlamaConfig` plus the output vocabulary subset and the rank of the embedding of the other tokens."""

    model_type = "hf_specdec_reduced_vocab_llama"

    kept_token_ids: list[int] | None = None  # the draft's output vocabulary, in head-row order
    oov_embedding_rank: int = 64
    logit_scale: float = 1.0  # q = softmax(logit_scale * logits): fitted after training (`draft_quality`)

    def validate_architecture(self):
        super().validate_architecture()
        kept = self.kept_token_ids or []
        if not kept or len(set(kept)) != len(kept) or min(kept) < 0 or max(kept) >= self.vocab_size:
            raise ValueError(
                f"kept_token_ids must be {len(kept) and 'distinct '}token ids in [0, {self.vocab_size}); "
                f"got {len(kept)} ids"
            )


class ReducedVocabEmbedding(nn.Module):
    """Full-size rows for the kept tokens (shared with the head), a low-rank embedding for all others."""

    def __init__(self, config: ReducedVocabLlamaConfig):
        super().__init__()
        self.kept = nn.Embedding(len(config.kept_token_ids), config.hidden_size)
        self.oov = nn.Embedding(config.vocab_size, config.oov_embedding_rank)
        self.oov_up = nn.Linear(config.oov_embedding_rank, config.hidden_size, bias=False)
        # token id -> its row in `kept`, -1 outside the subset (saved with the weights, like the head's ids)
        kept_token_ids = torch.tensor(config.kept_token_ids)
        kept_row = torch.full((config.vocab_size,), -1, dtype=torch.long)
        kept_row[kept_token_ids] = torch.arange(len(kept_token_ids))
        self.register_buffer("kept_row", kept_row)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        row = self.kept_row[input_ids]
        kept = self.kept(row.clamp(min=0))
        other = self.oov_up(self.oov(input_ids))
        return torch.where((row >= 0).unsqueeze(-1), kept, other)


class ReducedVocabHead(nn.Linear):
    """Logits for the kept tokens only, times the config's `logit_scale`, scattered into a full-vocabulary tensor
    that is -inf elsewhere.

    The scale sharpens (> 1) or flattens the draft's q after training: a draft trained on KL(p || q) spreads q to
    cover p, and a sharper q can overlap p more (alpha = sum min(p, q)). Any q keeps sampling exact: the verifier
    tests the q the draft sampled from."""

    LINEAR_METHOD = "kept_logits"  # what `backends.cpu_kernels.packed_linears` may swap for a prepacked GEMM

    def __init__(self, config: ReducedVocabLlamaConfig):
        super().__init__(config.hidden_size, len(config.kept_token_ids), bias=False)
        self.vocab_size = config.vocab_size
        self.logit_scale = config.logit_scale
        self.register_buffer("kept_token_ids", torch.tensor(config.kept_token_ids))

    def kept_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Logits over the subset, in `kept_token_ids` order, unscaled (what training uses)."""
        return super().forward(hidden_states)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        kept = self.kept_logits(hidden_states)
        if self.logit_scale != 1.0:
            kept = kept * self.logit_scale
        logits = kept.new_full((*kept.shape[:-1], self.vocab_size), float("-inf"))
        return logits.index_copy_(-1, self.kept_token_ids, kept)


class ReducedVocabLlamaForCausalLM(LlamaForCausalLM):
    """`LlamaForCausalLM` whose embedding and head cover a token subset; logits stay full-vocabulary."""

    config_class = ReducedVocabLlamaConfig
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.kept.weight"}

    def __init__(self, config: ReducedVocabLlamaConfig):
        # LlamaForCausalLM.__init__ with the two modules swapped (its post_init would tie the wrong names)
        LlamaPreTrainedModel.__init__(self, config)
        self.model = LlamaModel(config)
        # LlamaModel builds a full-vocabulary embedding first: free under `from_pretrained` (meta device)
        self.model.embed_tokens = ReducedVocabEmbedding(config)
        self.vocab_size = config.vocab_size
        self.lm_head = ReducedVocabHead(config)
        self.post_init()


AutoConfig.register(ReducedVocabLlamaConfig.model_type, ReducedVocabLlamaConfig, exist_ok=True)
AutoModelForCausalLM.register(ReducedVocabLlamaConfig, ReducedVocabLlamaForCausalLM, exist_ok=True)

"""The interface between the speculative loop and a model runtime (HF PyTorch, ONNX Runtime, TensorRT).

A backend owns one model's KV cache and nothing else: which slot holds which token, positions and masks are the
loop's business (`hf_specdec.cache_layout`). Slots are appended by `prefill`/`forward` and rearranged by `keep`.

Features (feature-conditioned drafts, `hf_specdec.feature_draft`): a target backend returns, when asked
(`return_features=True`), its features of the tokens it ran: the input of its LM head, [B, T, hidden_size]. A draft
backend with `reads_features` takes such features as an input of every `prefill` and `forward` (the feature at the
position before each token) and always returns its own prediction of the target's feature at each token.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch


class Forward(NamedTuple):
    logits: torch.Tensor  # float32 [B, T, V]
    features: torch.Tensor | None  # [B, T, hidden_size], or None where not asked for


class ModelBackend(Protocol):
    device: torch.device
    vocab_size: int
    hidden_size: int
    reads_features: bool  # a feature-conditioned draft: prefill and forward take `features`
    logit_support: torch.Tensor | None  # [C] the only tokens with finite logits (a reduced-vocabulary draft), or None
    # optional: PyTorch threads for the loop's own tensor work while this backend runs (`loop.host_threads`; e.g. 1
    # beside a runtime with its own CPU thread pool); absent or None: as the process has them
    host_threads: int | None

    def reset(self, batch_size: int, prompt_lengths: torch.Tensor) -> None:
        """Start an empty cache for `batch_size` rows; `prompt_lengths` [B]: real (unpadded) prompt tokens per row."""

    def prefill(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                key_positions: torch.Tensor, features: torch.Tensor | None = None,
                return_features: bool = False) -> torch.Tensor | None:
        """Append T slots computing their K/V only (no logits are needed). Shapes: input_ids and position_ids [B, T];
        attention_mask bool [B, T, S + T] over all slots after the append (True = attend); key_positions [B, S + T]
        (the position id held by every slot, for models with sliding-window layers); features [B, T, H] for a backend
        that `reads_features`. Returns the features of the T tokens [B, T, H] if `return_features`, else None."""

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                key_positions: torch.Tensor, features: torch.Tensor | None = None,
                return_features: bool = False) -> Forward:
        """Like `prefill`, and return float32 logits [B, T, V] of the appended tokens (and their features if asked, or
        if the backend `reads_features`)."""

    def keep(self, start: int, source_slots: torch.Tensor) -> None:
        """Set slots start..start+A-1 of row b to the K/V of slots source_slots[b] (all >= start) and drop the rest."""

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (finished rows stop costing work)."""

    def finish(self, generated_tokens: int) -> None:
        """The call is over; the longest row generated `generated_tokens` tokens."""

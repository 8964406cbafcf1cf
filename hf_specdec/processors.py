"""Logits processors on tree nodes: each node gets exactly the scores `generate` would compute after its own prefix.

Exactness needs p to be what the target's own sampling would use, so the processors from the GenerationConfig
(temperature, top-k/p, min-p, repetition penalty, min length, bad words ...) run on every node with input_ids equal to
that node's prefix: the row's committed tokens (left padding included, as in `generate`) then the path to the node.
"""

from __future__ import annotations

import copy

import torch
from transformers.generation import logits_process as lp

# processors that look only at the scores: they can run on all nodes at once, whatever their prefixes
PREFIX_FREE = tuple(
    getattr(lp, name)
    for name in (
        "TemperatureLogitsWarper",
        "TopKLogitsWarper",
        "TopPLogitsWarper",
        "TopHLogitsWarper",
        "MinPLogitsWarper",
        "TypicalLogitsWarper",
        "EpsilonLogitsWarper",
        "EtaLogitsWarper",
        "InfNanRemoveLogitsProcessor",
        "LogitNormalization",
        "SuppressTokensLogitsProcessor",
    )
    if hasattr(lp, name)
)

# processors whose rows are not independent sequences (batch index semantics, extra model calls, state)
UNSUPPORTED = tuple(
    getattr(lp, name)
    for name in (
        "PrefixConstrainedLogitsProcessor",
        "ClassifierFreeGuidanceLogitsProcessor",
        "UnbatchedClassifierFreeGuidanceLogitsProcessor",
        "SynthIDTextWatermarkLogitsProcessor",
        "WhisperTimeStampLogitsProcessor",
        "WhisperNoSpeechDetection",
        "AlternatingCodebooksLogitsProcessor",
        "BarkEosPrioritizerLogitsProcessor",
    )
    if hasattr(lp, name)
)


# processors holding one value per batch row (e.g. the left-padding length the repetition penalty ignores): on tree
# nodes they get, per node, the value of the node's row
PER_ROW_ATTRIBUTES = {lp.RepetitionPenaltyLogitsProcessor: ("prompt_ignore_length",)}


def for_rows(processor, row_ids: torch.Tensor):
    """`processor` with its per-row attributes indexed by `row_ids` (original batch rows of the inputs it will see)."""
    names = [n for n in PER_ROW_ATTRIBUTES.get(type(processor), ()) if isinstance(getattr(processor, n, None), torch.Tensor)]
    if not names:
        return processor
    selected = copy.copy(processor)
    for name in names:
        setattr(selected, name, getattr(processor, name).to(row_ids.device)[row_ids])
    return selected


class NodeScorer:
    """Applies a `LogitsProcessorList` to the logits of tree nodes, each with its own prefix."""

    def __init__(self, logits_processor):
        self.processors = list(logits_processor or [])
        for processor in self.processors:
            if isinstance(processor, UNSUPPORTED):
                raise ValueError(
                    f"{type(processor).__name__} is not supported by speculative decoding (it does not treat rows as "
                    "independent sequences); remove it or use plain generate()"
                )
        self.prefix_free = all(isinstance(p, PREFIX_FREE) for p in self.processors)

    def _apply(self, input_ids: torch.Tensor, scores: torch.Tensor, row_ids: torch.Tensor) -> torch.Tensor:
        for processor in self.processors:
            scores = for_rows(processor, row_ids)(input_ids, scores)
        return scores

    def __call__(
        self,
        logits: torch.Tensor,
        sequences: torch.Tensor,
        path_tokens: torch.Tensor,
        row_ids: torch.Tensor,
        lengths: list[int],
        node_depths: list[int],
    ) -> torch.Tensor:
        """logits [B, n, V] of n nodes per row; sequences [B, W] committed tokens (valid up to each row's length);
        path_tokens [B, n, D] the tokens from depth 1 down to each node; row_ids [B] the rows' indices in the batch
        generate() was called with; lengths (B ints) and node_depths (n ints, the same in every row) on the host, so
        that grouping nodes by prefix length needs no host sync. Returns scores [B, n, V]."""
        if not self.processors:
            return logits
        batch, width, vocab = logits.shape
        flat = logits.reshape(batch * width, vocab)
        rows = torch.arange(batch, device=logits.device).repeat_interleave(width)
        if self.prefix_free:
            dummy_ids = torch.zeros(flat.shape[0], 1, dtype=torch.long, device=logits.device)
            return self._apply(dummy_ids, flat, row_ids[rows]).view(batch, width, vocab)
        groups: dict[int, list[int]] = {}
        for b, length in enumerate(lengths):
            for n, depth in enumerate(node_depths):
                groups.setdefault(length + depth, []).append(b * width + n)
        paths = path_tokens.flatten(0, 1)
        scores = torch.empty_like(flat)
        # one processor call per prefix length: input_ids must be rectangular
        for total, member_list in groups.items():
            members = torch.tensor(member_list, device=logits.device)
            member_rows = rows[members]
            ids = sequences[member_rows, :total].clone()
            offset = torch.arange(total, device=logits.device) - torch.tensor(
                [lengths[i // width] for i in member_list], device=logits.device)[:, None]
            on_path = offset >= 0
            path_part = paths[members].gather(1, offset.clamp(min=0, max=paths.shape[1] - 1))
            ids = torch.where(on_path, path_part, ids)
            scores[members] = self._apply(ids, flat[members], row_ids[member_rows])
        return scores.view(batch, width, vocab)

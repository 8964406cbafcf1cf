"""Logits processors on tree nodes: each node gets exactly the scores `generate` would compute after its own prefix.

Exactness needs p to be what the target's own sampling would use, so the processors from the GenerationConfig
(temperature, top-k/p, min-p, repetition penalty, min length, bad words ...) run on every node with input_ids equal to
that node's prefix: the row's committed tokens (left padding included, as in `generate`) then the path to the node.
"""

from __future__ import annotations

import copy
import math

import torch
from transformers.generation import logits_process as lp


def _classes(*names: str) -> tuple[type, ...]:
    """The logits processor classes of these names that this transformers version has."""
    return tuple(getattr(lp, name) for name in names if hasattr(lp, name))


# room `NodeScorer.support_capacity` gives a top-k support beyond 2 k (for ties at the k-th score)
SUPPORT_MARGIN = 32

# processors that see a node's scores as a set of values (no token ids, no prefix, -inf stays -inf): once a top-k has
# cut every score but the highest off, they give on those scores what they give on the whole vocabulary
VALUE_ONLY = _classes(
    "TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "TopHLogitsWarper", "MinPLogitsWarper",
    "TypicalLogitsWarper", "EpsilonLogitsWarper", "EtaLogitsWarper", "LogitNormalization",
)

# `VALUE_ONLY` processors whose result does not depend on the order of the entries they see (thresholds on values,
# no sort): on a node's highest scores they cut exactly the tokens they cut on the whole vocabulary, ties included
# (min-p too where it forces no more than the most likely token in: `_order_free`)
ORDER_FREE = _classes("TemperatureLogitsWarper", "TopKLogitsWarper", "EpsilonLogitsWarper", "EtaLogitsWarper",
                      "LogitNormalization")


def _order_free(processor) -> bool:
    if isinstance(processor, lp.MinPLogitsWarper):
        return processor.min_tokens_to_keep <= 1
    return isinstance(processor, ORDER_FREE)

# processors that look only at the scores: they can run on all nodes at once, whatever their prefixes
PREFIX_FREE = VALUE_ONLY + _classes("InfNanRemoveLogitsProcessor", "SuppressTokensLogitsProcessor")

# processors that read only how long the prefix is (eos stays at -inf below a minimum length): they run on all nodes
# at once from each node's prefix length (`suppress_eos`), on the whole vocabulary or on some of its entries
LENGTH_ONLY = _classes("MinLengthLogitsProcessor", "MinNewTokensLengthLogitsProcessor")


def _length_only(processor) -> bool:
    return type(processor) in LENGTH_ONLY  # not a subclass: it may read more than the length


def suppress_eos(processor, scores: torch.Tensor, node_prefix_lengths: torch.Tensor,
                 token_ids: torch.Tensor | None = None) -> torch.Tensor:
    """What a `LENGTH_ONLY` processor returns for scores [M, C] of M prefixes of `node_prefix_lengths` [M] (its
    input_ids' length, left padding included, as in `generate`), each row at once: eos entries -inf where the prefix
    is below its minimum. Entry j of a row is token j, or `token_ids[row, j]` for scores of some entries only."""
    if isinstance(processor, lp.MinNewTokensLengthLogitsProcessor):
        below = node_prefix_lengths - processor.prompt_length_to_skip < processor.min_new_tokens
    else:
        below = node_prefix_lengths < processor.min_length
    if token_ids is None:
        token_ids = torch.arange(scores.shape[-1], device=scores.device)
    eos = torch.isin(token_ids, processor.eos_token_id.to(scores.device))
    return torch.where(eos & below[:, None], -math.inf, scores)


def prefix_lengths(lengths: list[int], node_depths: list[int], device) -> torch.Tensor:
    """[B * n]: the prefix length of node j of row b (its committed length, then the path down to the node), in the
    order of the flattened [B, n] nodes; built on the host, so copied to the device without a sync."""
    return torch.tensor([length + depth for length in lengths for depth in node_depths], device=device)

_TOP_GROUP = 32  # entries per group of `top_entries`


def top_entries(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k largest entries of each row of `x` [..., V] and their indices (in no particular order; ties broken
    arbitrarily), as `x.topk(k, sorted=False)`, for k much smaller than V with less work. The vocabulary is split
    into G = V / 32 groups (group j: entries j, G + j, 2G + j, ...; their maxima are one elementwise pass over 32
    rows of G); the k groups with the largest maxima hold a top k (fewer than k groups have a maximum above the k-th
    largest entry, and each holds every entry above it), and the top-k runs on those 32 k entries."""
    vocab = x.shape[-1]
    groups = vocab // _TOP_GROUP
    if vocab % _TOP_GROUP or 8 * k * _TOP_GROUP > vocab:
        return x.topk(min(k, vocab), dim=-1, sorted=False)
    lead = x.shape[:-1]
    grouped = x.unflatten(-1, (_TOP_GROUP, groups))  # [..., 32, G]: entry i * G + j at [i, j]
    chosen = grouped.amax(-2).topk(k, dim=-1, sorted=False).indices  # [..., k] groups
    candidates = grouped.gather(-1, chosen[..., None, :].expand(*lead, _TOP_GROUP, k)).flatten(-2)  # [..., 32 k]
    values, index = candidates.topk(k, dim=-1, sorted=False)
    return values, index // k * groups + chosen.gather(-1, index % k)


def top_k_warp(processor: lp.TopKLogitsWarper, scores: torch.Tensor) -> torch.Tensor:
    """What `processor(input_ids, scores)` returns, bit for bit: scores below the k-th largest become its filter
    value. The k-th largest comes from `top_entries` (a top k of the row, found with a fraction of the work of a
    full top-k over a large vocabulary), then a top-k of those k only: on a tree's [nodes, V] scores the full top-k
    was most of the warper's cost."""
    top_k = min(processor.top_k, scores.shape[-1])
    values, _ = top_entries(scores, top_k)
    threshold = values.topk(top_k, dim=-1)[0][..., -1:]
    return torch.where(scores < threshold, processor.filter_value, scores)  # masked_fill's values, a third faster


# processors whose rows are not independent sequences (batch index semantics, extra model calls, state)
UNSUPPORTED = _classes(
    "PrefixConstrainedLogitsProcessor", "ClassifierFreeGuidanceLogitsProcessor",
    "UnbatchedClassifierFreeGuidanceLogitsProcessor", "SynthIDTextWatermarkLogitsProcessor",
    "WhisperTimeStampLogitsProcessor", "WhisperNoSpeechDetection", "AlternatingCodebooksLogitsProcessor",
    "BarkEosPrioritizerLogitsProcessor",
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
        # no processor reads a prefix's tokens: all nodes are scored at once, whatever their prefixes
        self.reads_prefix_tokens = not all(isinstance(p, PREFIX_FREE) or _length_only(p) for p in self.processors)
        self.reads_prefix_lengths = any(_length_only(p) for p in self.processors)

    def support_capacity(self, vocab_size: int) -> int | None:
        """A number of tokens that holds the support of every processed distribution, when a top-k warper bounds it
        (its k plus room for ties at the threshold, see `drafting.compact_log_probs`); None when nothing bounds it."""
        top_k = [p.top_k for p in self.processors if isinstance(p, lp.TopKLogitsWarper)]
        if not top_k:
            return None
        return min(vocab_size, 2 * min(top_k) + SUPPORT_MARGIN)

    def on_top_logits(self, logits: torch.Tensor, row_ids: torch.Tensor, capacity: int,
                      node_prefix_lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The processed scores of each node's `capacity` highest logits, processed on those entries only, and their
        token ids ([B, n, C] each); None where the processors do not allow it. It does when they are all
        `VALUE_ONLY` and only temperatures come before the first top-k warper: the top-k then keeps the same
        tokens as on the whole vocabulary whenever they fit in `capacity` (ties at the k-th score may make more),
        and what follows sees those (a top-p that cuts between tied scores keeps the ones its sort puts last, which
        may be others here). `LENGTH_ONLY` processors may come anywhere, given the nodes' `node_prefix_lengths`
        [B * n]: they only remove eos, which leaves the rest of the highest logits the highest. The full pass of the
        processors over [B, n, V] becomes one top-k over the logits.
        For the draft's q, whose exactness needs no more than recording what it samples from: where more tokens than
        `capacity` tie, q is restricted to `capacity` of them (see `drafting.compact_log_probs`)."""
        if not self._top_logits_suffice(lambda p: isinstance(p, VALUE_ONLY), node_prefix_lengths):
            return None
        values, token_ids = top_entries(logits, capacity)
        return self._apply_to_nodes(values, row_ids, node_prefix_lengths, token_ids.flatten(0, 1)), token_ids

    def top_support(self, logits: torch.Tensor, row_ids: torch.Tensor, capacity: int,
                    node_prefix_lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`on_top_logits` for the target, whose p must be the processed scores on the whole vocabulary exactly: the
        processed scores [B, n, C] of each node's C = `capacity` highest logits (-inf past its support) and their
        token ids, or None. None also where a warper that sorts follows the top-k (top-p, typical, top-h: which of
        exactly tied scores they cut depends on the sort's order of the whole vocabulary, and bf16 logits tie
        often), and where a node's C-th highest logit survives the top-k (more than C - k scores tied at its
        threshold: tokens beyond these C would too); learning that reads one flag back to the host."""
        if not self._top_logits_suffice(_order_free, node_prefix_lengths):
            return None
        values, token_ids = top_entries(logits, capacity)
        checked = capacity < logits.shape[-1]  # else every token is among the entries
        entry_ids = token_ids
        if checked:
            # one more entry per node, the C-th highest logit again, under a token id no processor singles out: it is
            # the lowest, so it changes no threshold, and it survives the processors only where the top-k keeps the C-th
            values = torch.cat([values, values.amin(-1, keepdim=True)], -1)
            entry_ids = torch.cat([token_ids, torch.full_like(token_ids[..., :1], -1)], -1)
        scores = self._apply_to_nodes(values, row_ids, node_prefix_lengths, entry_ids.flatten(0, 1))
        if not checked:
            return scores, token_ids
        if bool(scores[..., -1].isfinite().any()):  # the read back
            return None
        return scores[..., :-1], token_ids

    def _top_logits_suffice(self, allowed, node_prefix_lengths: torch.Tensor | None) -> bool:
        """Whether the processors give on the highest logits what they give on the whole vocabulary: all
        `allowed(processor)` (or `LENGTH_ONLY`, given the prefix lengths), and only temperatures before the first
        top-k."""
        processors = [p for p in self.processors if not _length_only(p)]
        first_top_k = next((i for i, p in enumerate(processors) if isinstance(p, lp.TopKLogitsWarper)), None)
        if first_top_k is None or not all(allowed(p) for p in processors):
            return False
        if not all(isinstance(p, lp.TemperatureLogitsWarper) for p in processors[:first_top_k]):
            return False
        return not (self.reads_prefix_lengths and node_prefix_lengths is None)

    def on_entries(self, logits: torch.Tensor, row_ids: torch.Tensor, token_ids: torch.Tensor | None = None,
                   node_prefix_lengths: torch.Tensor | None = None) -> torch.Tensor | None:
        """The processed scores of logits [B, n, C] that are a model's whole support (its logits elsewhere are -inf,
        e.g. a reduced-vocabulary draft's kept tokens), processed on those entries only; None where the processors
        do not allow it. They do when all are `VALUE_ONLY`: -inf entries stay -inf and weigh nothing in their
        softmax, top-k or top-p, so the scores on the support are those of the whole vocabulary (ties at a top-k or
        top-p threshold may be broken otherwise: for the draft's q, whose exactness needs no more than recording
        what it samples from). `LENGTH_ONLY` processors too, given the entries' `token_ids` [C] and the nodes'
        `node_prefix_lengths` [B * n]."""
        if not all(isinstance(p, VALUE_ONLY) or _length_only(p) for p in self.processors):
            return None
        if self.reads_prefix_lengths and (token_ids is None or node_prefix_lengths is None):
            return None
        if not self.processors:
            return logits
        return self._apply_to_nodes(logits, row_ids, node_prefix_lengths, token_ids)

    def _apply_to_nodes(self, scores: torch.Tensor, row_ids: torch.Tensor,
                        node_prefix_lengths: torch.Tensor | None = None,
                        token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The processors on scores [B, n, C] of every node at once, for processors that read no prefix tokens (each
        node's row from `row_ids` [B]; `node_prefix_lengths`, `token_ids` as `_apply` takes them)."""
        batch, width, entries = scores.shape
        rows = torch.arange(batch, device=scores.device).repeat_interleave(width)
        dummy_ids = torch.zeros(batch * width, 1, dtype=torch.long, device=scores.device)
        flat = scores.reshape(batch * width, entries)
        return self._apply(dummy_ids, flat, row_ids[rows], node_prefix_lengths, token_ids).view(batch, width, entries)

    def _apply(self, input_ids: torch.Tensor, scores: torch.Tensor, row_ids: torch.Tensor,
               node_prefix_lengths: torch.Tensor | None = None, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The processors on scores [M, C] (entry j: token j, or `token_ids[..., j]`); `LENGTH_ONLY` ones from
        `node_prefix_lengths` [M] where given, else from `input_ids` as transformers runs them."""
        for processor in self.processors:
            if type(processor) is lp.TopKLogitsWarper:  # a subclass may compute otherwise
                scores = top_k_warp(processor, scores)
            elif _length_only(processor) and node_prefix_lengths is not None:
                scores = suppress_eos(processor, scores, node_prefix_lengths, token_ids)
            else:
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
        if not self.reads_prefix_tokens:
            node_prefix_lengths = prefix_lengths(lengths, node_depths, logits.device) if self.reads_prefix_lengths \
                else None
            return self._apply_to_nodes(logits, row_ids, node_prefix_lengths)
        batch, width, vocab = logits.shape
        flat = logits.reshape(batch * width, vocab)
        rows = torch.arange(batch, device=logits.device).repeat_interleave(width)
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

"""Drafters: how each method grows its draft tree, one level per draft forward pass.

Every drafter sees the draft's log-probabilities `logq` at the frontier (the nodes added by the previous level; the
root first) and adds the next level to a `DraftTree`. Sampling drafters draw from exactly the distribution the loop
records (the verifier's q); greedy drafters (do_sample=False) take the draft's most likely tokens.

`logq` is either dense, [B, n, V] (entry v is token v), or compact, [B, n, C] with `token_ids` [B, n, C] naming the
token of each entry (`compact_log_probs`): after a top-k warper q is zero outside a few dozen tokens, and the noise,
the top-k and the beam bookkeeping then run on those C entries instead of the whole vocabulary. Entries of -inf (no
mass) are never drawn, in either form.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hf_specdec.config import SpeculativeConfig
from hf_specdec.processors import top_entries
from hf_specdec.trees import DraftTree
from hf_specdec.verification import SparseProbs

_TOKEN_RANGE = 1 << 32  # above every token id: a (node, token) pair as one integer key


def gumbel_like(x: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise (uses the global torch RNG, so torch.manual_seed makes runs reproducible)."""
    uniform = torch.rand_like(x, dtype=torch.float32).clamp_(min=torch.finfo(torch.float32).tiny)
    return uniform.log_().neg_().log_().neg_()


def compact_log_probs(scores: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """log q on the `capacity` highest processed scores of each node: (logq [..., C], their token ids [..., C]).

    Where a node has at most `capacity` finite scores (its support after the logits processors, e.g. a top-k warper;
    the other entries are -inf) this is log_softmax(scores) on them, every token of q's support included, and -inf on
    the filling entries. Where it has more (more than capacity - k tokens tied at the top-k threshold, or a processor
    that makes -inf finite again) q is restricted to its `capacity` most likely tokens and renormalised; the drafter
    then samples from that distribution and the loop records that one, so verification stays exact."""
    values, token_ids = top_entries(scores, capacity)
    return values.log_softmax(-1), token_ids


class DraftProbsBuffer:
    """Where one step's sampling drafters record q at the tree's nodes (`start`, then `record` per level, `probs` for
    the verifier), with storage kept from step to step. While every level's q comes compact with the same number C
    of entries (a top-k warper, a reduced-vocabulary draft) it stays so: `SparseProbs` [B, N+1, C], which the
    verifier reads as such. Otherwise a dense [B, N+1, V] buffer, all zero but what the last step recorded, which the
    next step clears entry by entry (recording a compact q costs its support, not the vocabulary, and the buffer is
    not mapped afresh, page by page, at every step). Nodes never recorded hold zeros."""

    def __init__(self):
        self.buffer: torch.Tensor | None = None
        self.written: list[tuple[int, int, torch.Tensor | None]] = []  # node range, tokens (None: whole rows)
        self.shape: tuple[int, ...] = ()
        self.device: torch.device | None = None
        self.sparse: SparseProbs | None = None
        self.dense = False  # this step records into `buffer`

    def start(self, shape: tuple[int, ...], device: torch.device) -> DraftProbsBuffer:
        """A step's empty record of q, [B, N+1, V]."""
        self.shape, self.device, self.sparse, self.dense = tuple(shape), torch.device(device), None, False
        return self

    def _dense_buffer(self) -> torch.Tensor:
        """The float32 dense buffer of this step's shape, zero (reused when the shape and device match)."""
        buffer = self.buffer
        if buffer is None or tuple(buffer.shape) != self.shape or buffer.device != self.device:
            self.buffer, self.written = torch.zeros(self.shape, dtype=torch.float32, device=self.device), []
            return self.buffer
        for start, end, token_ids in self.written:
            if token_ids is None:
                buffer[:, start:end].zero_()
            else:
                buffer[:, start:end].scatter_(2, token_ids, 0.0)
        self.written = []
        return buffer

    def _to_dense(self) -> None:
        """From here on this step records densely (what was recorded sparsely so far moves over)."""
        buffer = self._dense_buffer()
        if self.sparse is not None:
            buffer.scatter_(2, self.sparse.token_ids, self.sparse.values.to(buffer.dtype))
            self.written.append((0, self.shape[1], self.sparse.token_ids))
            self.sparse = None
        self.dense = True

    def record(self, start: int, end: int, logq: torch.Tensor, token_ids: torch.Tensor | None) -> None:
        """q = exp(logq) of nodes start..end-1 (every row), dense [B, n, V] or compact with `token_ids` [B, n, C]."""
        q = logq.exp()
        if token_ids is not None and not self.dense:
            if self.sparse is None:
                batch, slots, _ = self.shape
                self.sparse = SparseProbs(q.new_zeros(batch, slots, q.shape[-1]),
                                          token_ids.new_zeros(batch, slots, q.shape[-1]), self.shape[-1])
            if self.sparse.values.shape[-1] == q.shape[-1]:
                self.sparse.values[:, start:end] = q
                self.sparse.token_ids[:, start:end] = token_ids
                return
        if not self.dense:
            self._to_dense()
        rows = self.buffer[:, start:end]
        if token_ids is None:
            rows.copy_(q)
        else:
            rows.scatter_(2, token_ids, q.to(rows.dtype))
        self.written.append((start, end, token_ids))

    def probs(self, end: int) -> torch.Tensor | SparseProbs:
        """q of nodes 0 .. end - 1, for the verifier."""
        if self.sparse is not None:
            return self.sparse.nodes(end)
        if not self.dense:  # nothing recorded
            self._to_dense()
        return self.buffer[:, :end]


def _tokens(index: torch.Tensor, token_ids: torch.Tensor | None, dim: int) -> torch.Tensor:
    """The tokens of entries `index` of a (dense or compact) logq along `dim`."""
    return index if token_ids is None else token_ids.gather(dim, index)


def shifted_gumbel(parent_gumbel: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
    """Gumbels conditioned on their maximum being `parent_gumbel` (Kool et al. 2019, numerically stable form).

    perturbed [..., V] are phi + Gumbel(0); parent_gumbel [...] is the parent's (conditioned) Gumbel.
    Returns -log(exp(-G) - exp(-Z) + exp(-perturbed)) with Z = max(perturbed).
    """
    top = perturbed.amax(-1, keepdim=True)
    g = parent_gumbel.unsqueeze(-1)
    v = (g - perturbed).add_((perturbed - top).exp_().neg_().log1p_())
    return v.clamp(min=0).neg_().add_(g).sub_(v.abs().neg_().exp_().log1p_())


class Drafter:
    """Grows a draft tree level by level; subclasses implement `expand`. What one step's levels share (beam scores,
    the sequences' current nodes) is a `DraftState` that `start` returns and `expand` carries on."""

    def __init__(self, config: SpeculativeConfig, greedy: bool):
        self.config, self.greedy = config, greedy

    def start(self, tree: DraftTree) -> DraftState:
        return DraftState()

    def expand(self, tree: DraftTree, state: DraftState, frontier: torch.Tensor, frontier_valid: torch.Tensor,
               logq: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Add the children of `frontier` [B, n] to `tree` (a level of static width); return their node indices.
        `logq`: log q at the frontier, dense [B, n, V] or compact [B, n, C] with `token_ids` [B, n, C] (see the
        module docstring)."""
        raise NotImplementedError

    def max_paths(self) -> int:
        """The most root-to-leaf paths a row's tree can have (its widest antichain)."""
        widths = self.config.level_widths()
        return widths[-1] if widths else 0

    def max_children(self) -> int:
        """The most children a node can get (a bound the verifier's per-node steps can use): a level's width."""
        return max(self.config.level_widths(), default=0)

    def paths(self, tree: DraftTree, state: DraftState) -> torch.Tensor:
        return tree.paths(self.max_paths())


@dataclass
class DraftState:
    phi: torch.Tensor | None = None  # RSD-S: log q of each beam's path
    gumbel: torch.Tensor | None = None  # RSD-S: each beam's conditioned Gumbel
    sequence_nodes: torch.Tensor | None = None  # SpecTr: the trie node each sequence is at (-1 once it ended)
    sequence_paths: list[torch.Tensor] = field(default_factory=list)  # SpecTr: those nodes, level by level


class ChainDrafter(Drafter):
    """SD: one child per node, sampled from q (greedy: its argmax)."""

    def expand(self, tree, state, frontier, frontier_valid, logq, token_ids=None):
        last = logq[:, 0]
        if self.greedy:
            index = last.argmax(-1, keepdim=True)
        else:
            index = torch.multinomial(last.exp(), 1)
        tokens = _tokens(index, None if token_ids is None else token_ids[:, 0], 1)
        return tree.add_level(frontier[:, :1], tokens, frontier_valid[:, :1], last.gather(1, index))


class BranchingDrafter(Drafter):
    """RSD-C: every frontier node gets the top b_l tokens of log q + Gumbel noise (without replacement, in Gumbel
    order); greedy: the top b_l tokens of q."""

    def expand(self, tree, state, frontier, frontier_valid, logq, token_ids=None):
        width = self.config.branching[tree.depth]
        keys = logq if self.greedy else gumbel_like(logq).add_(logq)
        values, index = keys.topk(min(width, keys.shape[-1]), dim=-1)
        tokens = _tokens(index, token_ids, -1)
        valid = torch.isfinite(values) & frontier_valid[..., None]
        parents = frontier[..., None].expand_as(tokens)
        return tree.add_level(parents.flatten(1), tokens.flatten(1), valid.flatten(1), logq.gather(-1, index).flatten(1))

    def max_children(self) -> int:
        return max(self.config.branching)


class BeamDrafter(Drafter):
    """RSD-S: stochastic beam search (Kool et al. 2019) of width W; greedy: plain beam search on log q.

    Each beam s carries phi_s (log q of its path) and its conditioned Gumbel G_s; its children x get
    phi_{s,x} = phi_s + log q(x|s) and G_{s,x} Gumbels conditioned on max_x G_{s,x} = G_s; the top W overall survive.
    Within a parent, the survivors are the first of a Gumbel-top-k order of q(.|s): a sample without replacement.
    """

    def start(self, tree):
        batch, device = tree.tokens.shape[0], tree.tokens.device
        return DraftState(phi=torch.zeros(batch, 1, device=device), gumbel=torch.zeros(batch, 1, device=device))

    def expand(self, tree, state, frontier, frontier_valid, logq, token_ids=None):
        phi = state.phi[..., None] + logq
        if self.greedy:
            keys = phi
        else:
            keys = shifted_gumbel(state.gumbel, gumbel_like(phi).add_(phi))
        keys = keys.masked_fill(~frontier_valid[..., None], float("-inf"))
        width = logq.shape[-1]
        values, flat = keys.flatten(1).topk(min(self.config.beam_width, keys[0].numel()), dim=-1)
        beam = flat // width
        tokens = flat % width if token_ids is None else token_ids.flatten(1).gather(1, flat)
        valid = torch.isfinite(values)
        state.phi = phi.flatten(1).gather(1, flat)
        state.gumbel = values
        return tree.add_level(frontier.gather(1, beam), tokens, valid, logq.flatten(1).gather(1, flat))

    def max_children(self) -> int:
        return self.config.beam_width  # the W survivors of a level may all share one parent

    def max_paths(self) -> int:
        # W leaves at the last level, and at most W - 1 beams end at each level before it
        width, depth = self.config.beam_width, self.config.depth
        return width + (width - 1) * (depth - 1)


class SequencesDrafter(Drafter):
    """SpecTr: K i.i.d. draft sequences, merged into a trie (greedy: the top-K first tokens, then argmax chains).

    Every level has K node slots, one per sequence; a sequence that repeats an earlier one's (parent, token) shares
    that node and leaves its own slot invalid. Verification needs the sequences themselves (K-SEQ counts every
    draw), so `paths` returns one path per sequence, duplicates included, in draw order.
    """

    def start(self, tree):
        batch, device = tree.tokens.shape[0], tree.tokens.device
        k = self.config.num_sequences
        return DraftState(sequence_nodes=torch.zeros(batch, k, dtype=torch.long, device=device))

    def expand(self, tree, state, frontier, frontier_valid, logq, token_ids=None):
        width = logq.shape[-1]
        alive = state.sequence_nodes >= 0
        # the frontier column of each sequence's current node
        column = (state.sequence_nodes[..., None] == frontier[:, None, :]).to(torch.int8).argmax(-1)
        entries = column[..., None].expand(-1, -1, width)
        seq_logq = logq.gather(1, entries)
        seq_ids = None if token_ids is None else token_ids.gather(1, entries)
        if not self.greedy:
            index = torch.multinomial(seq_logq.flatten(0, 1).exp(), 1).view_as(column)
            drawn = torch.ones_like(alive)
        elif tree.depth == 0:
            values, top = logq[:, 0].topk(min(self.config.num_sequences, width), dim=-1)
            index = torch.zeros_like(column)
            index[:, : top.shape[1]] = top
            drawn = torch.zeros_like(alive)
            drawn[:, : top.shape[1]] = torch.isfinite(values)
        else:
            index = seq_logq.argmax(-1)
            drawn = torch.ones_like(alive)
        tokens = _tokens(index[..., None], seq_ids, 2).squeeze(2)
        token_log_q = seq_logq.gather(2, index[..., None]).squeeze(2)
        alive &= drawn & frontier_valid.gather(1, column)
        # merge sequences with the same (parent, token) into one trie node: the slot of the first such sequence
        key = torch.where(alive, state.sequence_nodes * _TOKEN_RANGE + tokens,
                          -1 - torch.arange(alive.shape[1], device=alive.device))
        first = (key[:, :, None] == key[:, None, :]).to(torch.int8).argmax(-1)  # the first sequence with the same key
        is_first = (first == torch.arange(key.shape[1], device=key.device)) & alive
        nodes = tree.add_level(state.sequence_nodes.clamp(min=0), tokens, is_first, token_log_q)
        state.sequence_nodes = torch.where(alive, nodes.gather(1, first), -1)
        state.sequence_paths.append(state.sequence_nodes)
        return nodes

    def paths(self, tree, state):
        if not state.sequence_paths:
            return torch.zeros(tree.tokens.shape[0], 0, 0, dtype=torch.long, device=tree.tokens.device)
        return torch.stack(state.sequence_paths, dim=-1)


DRAFTERS = {"sd": ChainDrafter, "rsd-c": BranchingDrafter, "rsd-s": BeamDrafter, "spectr": SequencesDrafter}


def make_drafter(config: SpeculativeConfig, greedy: bool) -> Drafter:
    return DRAFTERS[config.method](config, greedy)

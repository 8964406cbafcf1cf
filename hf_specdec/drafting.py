"""Drafters: how each method grows its draft tree, one level per draft forward pass.

Every drafter sees the draft's log-probabilities `logq` [B, n, V] at the frontier (the nodes added by the previous
level; the root first) and adds the next level to a `DraftTree`. Sampling drafters record exactly the distribution
they drew from (the verifier's q); greedy drafters (do_sample=False) take the draft's most likely tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hf_specdec.config import SpeculativeConfig
from hf_specdec.trees import DraftTree


def gumbel_like(x: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise (uses the global torch RNG, so torch.manual_seed makes runs reproducible)."""
    uniform = torch.rand_like(x, dtype=torch.float32).clamp_(min=torch.finfo(torch.float32).tiny)
    return -torch.log(-torch.log(uniform))


def shifted_gumbel(parent_gumbel: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
    """Gumbels conditioned on their maximum being `parent_gumbel` (Kool et al. 2019, numerically stable form).

    perturbed [..., V] are phi + Gumbel(0); parent_gumbel [...] is the parent's (conditioned) Gumbel.
    Returns -log(exp(-G) - exp(-Z) + exp(-perturbed)) with Z = max(perturbed).
    """
    top = perturbed.max(-1, keepdim=True).values
    g = parent_gumbel.unsqueeze(-1)
    v = g - perturbed + torch.log1p(-torch.exp(perturbed - top))
    return g - v.clamp(min=0) - torch.log1p(torch.exp(-v.abs()))


class Drafter:
    """Grows a draft tree level by level; subclasses implement `expand`. What one step's levels share (beam scores,
    the sequences' current nodes) is a `DraftState` that `start` returns and `expand` carries on."""

    def __init__(self, config: SpeculativeConfig, greedy: bool):
        self.config, self.greedy = config, greedy

    def start(self, tree: DraftTree) -> DraftState:
        return DraftState()

    def expand(self, tree: DraftTree, state: DraftState, frontier: torch.Tensor, frontier_valid: torch.Tensor,
               logq: torch.Tensor) -> torch.Tensor:
        """Add the children of `frontier` [B, n] to `tree` (a level of static width); return their node indices."""
        raise NotImplementedError

    def max_paths(self) -> int:
        """The most root-to-leaf paths a row's tree can have (its widest antichain)."""
        widths = self.config.level_widths()
        return widths[-1] if widths else 0

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

    def expand(self, tree, state, frontier, frontier_valid, logq):
        last = logq[:, 0]
        if self.greedy:
            tokens = last.argmax(-1)
        else:
            tokens = torch.multinomial(last.exp(), 1).squeeze(-1)
        return tree.add_level(frontier[:, :1], tokens[:, None], frontier_valid[:, :1])


class BranchingDrafter(Drafter):
    """RSD-C: every frontier node gets the top b_l tokens of log q + Gumbel noise (without replacement, in Gumbel
    order); greedy: the top b_l tokens of q."""

    def expand(self, tree, state, frontier, frontier_valid, logq):
        width = self.config.branching[tree.depth]
        keys = logq if self.greedy else logq + gumbel_like(logq)
        values, tokens = keys.topk(min(width, keys.shape[-1]), dim=-1)
        valid = torch.isfinite(values) & frontier_valid[..., None]
        parents = frontier[..., None].expand_as(tokens)
        return tree.add_level(parents.flatten(1), tokens.flatten(1), valid.flatten(1))


class BeamDrafter(Drafter):
    """RSD-S: stochastic beam search (Kool et al. 2019) of width W; greedy: plain beam search on log q.

    Each beam s carries phi_s (log q of its path) and its conditioned Gumbel G_s; its children x get
    phi_{s,x} = phi_s + log q(x|s) and G_{s,x} Gumbels conditioned on max_x G_{s,x} = G_s; the top W overall survive.
    Within a parent, the survivors are the first of a Gumbel-top-k order of q(.|s): a sample without replacement.
    """

    def start(self, tree):
        batch, device = tree.tokens.shape[0], tree.tokens.device
        return DraftState(phi=torch.zeros(batch, 1, device=device), gumbel=torch.zeros(batch, 1, device=device))

    def expand(self, tree, state, frontier, frontier_valid, logq):
        phi = state.phi[..., None] + logq
        if self.greedy:
            keys = phi
        else:
            keys = shifted_gumbel(state.gumbel, phi + gumbel_like(phi))
        keys = keys.masked_fill(~frontier_valid[..., None], float("-inf"))
        vocab = logq.shape[-1]
        values, flat = keys.flatten(1).topk(min(self.config.beam_width, keys[0].numel()), dim=-1)
        beam, tokens = flat // vocab, flat % vocab
        valid = torch.isfinite(values)
        state.phi = phi.flatten(1).gather(1, flat)
        state.gumbel = values
        return tree.add_level(frontier.gather(1, beam), tokens, valid)

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

    def expand(self, tree, state, frontier, frontier_valid, logq):
        vocab = logq.shape[-1]
        alive = state.sequence_nodes >= 0
        # the frontier column of each sequence's current node
        column = (state.sequence_nodes[..., None] == frontier[:, None, :]).to(torch.int8).argmax(-1)
        seq_logq = logq.gather(1, column[..., None].expand(-1, -1, vocab))
        if not self.greedy:
            tokens = torch.multinomial(seq_logq.flatten(0, 1).exp(), 1).view_as(column)
            drawn = torch.ones_like(alive)
        elif tree.depth == 0:
            values, top = logq[:, 0].topk(min(self.config.num_sequences, vocab), dim=-1)
            tokens = torch.zeros_like(column)
            tokens[:, : top.shape[1]] = top
            drawn = torch.zeros_like(alive)
            drawn[:, : top.shape[1]] = torch.isfinite(values)
        else:
            tokens = seq_logq.argmax(-1)
            drawn = torch.ones_like(alive)
        alive &= drawn & frontier_valid.gather(1, column)
        # merge sequences with the same (parent, token) into one trie node: the slot of the first such sequence
        key = torch.where(alive, state.sequence_nodes * vocab + tokens, -1 - torch.arange(alive.shape[1], device=alive.device))
        first = (key[:, :, None] == key[:, None, :]).to(torch.int8).argmax(-1)  # the first sequence with the same key
        is_first = (first == torch.arange(key.shape[1], device=key.device)) & alive
        nodes = tree.add_level(state.sequence_nodes.clamp(min=0), tokens, is_first)
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

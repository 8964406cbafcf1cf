"""Logits parity between two backends of the same model, on the inputs the speculative loop gives them: a prefilled
prompt (left padding allowed) and one draft tree scored on top of it with a tree mask and explicit positions. A feature
draft reads the same random features (one per prompt token and tree node) on both backends."""

from __future__ import annotations

import math

import torch

from hf_specdec.backends.base import ModelBackend
from hf_specdec.cache_layout import CacheLayout
from hf_specdec.trees import DraftTree


def random_tree(root_tokens: torch.Tensor, branching: tuple[int, ...], vocab_size: int) -> DraftTree:
    """A full tree with b_l children per node at depth l and random tokens."""
    capacity = sum(math.prod(branching[: level + 1]) for level in range(len(branching)))
    tree = DraftTree(root_tokens, capacity=capacity, max_depth=len(branching))
    frontier = torch.zeros(len(root_tokens), 1, dtype=torch.long)
    for width in branching:
        parents = frontier.repeat_interleave(width, dim=1)
        tokens = torch.randint(0, vocab_size, parents.shape)
        frontier = tree.add_level(parents, tokens, torch.ones_like(parents, dtype=torch.bool))
    return tree


def random_features(backend: ModelBackend, prompt: torch.Tensor, tree: DraftTree) -> torch.Tensor | None:
    """Features for a feature draft's `tree_logits` ([B, P - 1 + N, H], seeded), None for any other model."""
    if not getattr(backend, "reads_features", False):
        return None
    generator = torch.Generator().manual_seed(0)
    return torch.randn(len(prompt), prompt.shape[1] - 1 + tree.size, backend.hidden_size, generator=generator)


@torch.no_grad()
def run_tree(backend: ModelBackend, prompt: torch.Tensor, prompt_mask: torch.Tensor, tree: DraftTree,
             features: torch.Tensor | None = None, return_features: bool = False):
    """Prefill all but the last prompt token, then score the tree (its root is the last token), as the loop lays them
    out. `features` [B, P - 1 + N, H]: what a feature draft reads with the prompt tokens, then with the tree's nodes.
    Returns (the prefill's features or None, the tree's `Forward`)."""
    valid = prompt_mask[:, :-1].bool()
    positions = torch.where(valid, valid.long().cumsum(1) - 1, 1)
    layout = CacheLayout(len(prompt), prompt.device)
    backend.reset(len(prompt), prompt_mask.sum(1))
    slots = layout.append(valid, positions)
    past = prompt.shape[1] - 1
    prefilled = backend.prefill(prompt[:, :-1], positions, layout.mask(slots), layout.positions,
                                features=None if features is None else features[:, :past],
                                return_features=return_features)
    size = tree.size
    nodes = torch.arange(size).expand(len(prompt), size)
    node_positions = valid.sum(1, keepdim=True) + tree.depths[:, :size]
    slots = layout.append(tree.valid[:, :size], node_positions, torch.where(nodes == 0, -1, nodes))
    out = backend.forward(tree.tokens[:, :size], node_positions, layout.mask(slots, tree.ancestors), layout.positions,
                          features=None if features is None else features[:, past:], return_features=return_features)
    return prefilled, out


def tree_logits(backend: ModelBackend, prompt: torch.Tensor, prompt_mask: torch.Tensor, tree: DraftTree,
                features: torch.Tensor | None = None) -> torch.Tensor:
    """`run_tree`'s logits [B, N, V]."""
    return run_tree(backend, prompt, prompt_mask, tree, features)[1].logits


def max_logit_error(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Largest absolute difference; -inf (tokens outside a reduced draft vocabulary) must match exactly."""
    reference_inf, candidate_inf = torch.isinf(reference), torch.isinf(candidate)
    if not torch.equal(reference_inf, candidate_inf) or not torch.equal(reference[reference_inf], candidate[candidate_inf]):
        return math.inf
    return float((reference - candidate)[~reference_inf].abs().max())


def tree_logit_error(
    reference: ModelBackend, candidate: ModelBackend, prompt: torch.Tensor, prompt_mask: torch.Tensor, branching: tuple[int, ...]
) -> float:
    tree = random_tree(prompt[:, -1], branching, reference.vocab_size)
    features = random_features(reference, prompt, tree)
    return max_logit_error(tree_logits(reference, prompt, prompt_mask, tree, features),
                           tree_logits(candidate, prompt, prompt_mask, tree, features))

"""The draft tree of one speculative step, batched: nodes, parents, ancestors, paths.

Node 0 of every row is the root (the last committed token, not yet seen by the target). Draft nodes are numbered
level by level in the order the drafter proposed them, so siblings are numbered in the order they were drawn.
Every level has the same number of nodes in every row (its static width), so a node's depth is known without looking
at the tensors; rows with fewer real nodes (a top-k warper leaves fewer tokens to branch on) mark the rest invalid.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from hf_specdec.drafting import DraftProbsBuffer


def compact_rows(valid: torch.Tensor, *tensors: torch.Tensor, width: int) -> tuple[torch.Tensor, ...]:
    """Move each row's valid entries to the front (stable, so their order is kept) and keep the first `width` columns
    (the caller knows the largest valid count: no host sync here)."""
    order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices[:, :width]
    return tuple(t.gather(1, order) for t in (valid, *tensors))


class DraftTree:
    def __init__(
        self,
        root_tokens: torch.Tensor,
        capacity: int,
        max_depth: int,
        draft_probs: DraftProbsBuffer | None = None,
    ):
        """`capacity`: most draft nodes per row; `draft_probs` (of [B, capacity + 1, V]): where sampling drafters
        record the draft distribution of each node they run (None: not recorded)."""
        batch, device = root_tokens.shape[0], root_tokens.device
        size = capacity + 1
        self.tokens = torch.zeros(batch, size, dtype=torch.long, device=device)
        self.tokens[:, 0] = root_tokens
        self.parents = torch.full((batch, size), -1, dtype=torch.long, device=device)
        self.depths = torch.zeros(batch, size, dtype=torch.long, device=device)
        self.valid = torch.zeros(batch, size, dtype=torch.bool, device=device)
        self.valid[:, 0] = True
        # ancestors[b, n, m]: m is n or an ancestor of n (the root excluded: it is part of the committed prefix)
        self.ancestors = torch.eye(size, dtype=torch.bool, device=device).repeat(batch, 1, 1)
        self.ancestors[:, 0, 0] = False
        # path_tokens[b, n, :depth]: the tokens from depth 1 down to node n
        self.path_tokens = torch.zeros(batch, size, max(max_depth, 1), dtype=torch.long, device=device)
        # path_log_q[b, n]: log q of the path from the root to node n (the draft's own estimate of reaching it)
        self.path_log_q = torch.zeros(batch, size, device=device)
        self.draft_probs = draft_probs
        self.size = 1
        self.depth = 0
        self.level_sizes: list[int] = []  # nodes per level (the same in every row), levels 1..depth

    @property
    def num_nodes(self) -> int:
        """Draft nodes per row (padded), the root excluded."""
        return self.size - 1

    def add_level(self, parents: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor,
                  token_log_q: torch.Tensor | None = None) -> torch.Tensor:
        """Append one level of children ([B, m] each; `token_log_q`: log q of each child's token given its parent);
        returns their node indices [B, m]."""
        batch, width = tokens.shape
        start, end = self.size, self.size + width
        if end > self.tokens.shape[1]:
            raise RuntimeError(f"draft tree capacity {self.tokens.shape[1] - 1} exceeded")
        parents = torch.where(valid, parents, torch.zeros_like(parents))
        rows = torch.arange(batch, device=tokens.device)[:, None]
        self.tokens[:, start:end] = tokens
        self.parents[:, start:end] = torch.where(valid, parents, -1)
        self.valid[:, start:end] = valid
        self.depth += 1
        self.depths[:, start:end] = self.depth
        self.ancestors[:, start:end] = self.ancestors[rows, parents] & valid[..., None]
        self.ancestors[:, start:end, start:end] |= torch.eye(width, dtype=torch.bool, device=tokens.device)
        self.path_tokens[:, start:end] = self.path_tokens[rows, parents]
        self.path_tokens[:, start:end, self.depth - 1] = tokens
        self.path_log_q[:, start:end] = self.path_log_q[rows, parents]
        if token_log_q is not None:
            self.path_log_q[:, start:end] += torch.where(valid, token_log_q.float(), float("-inf"))
        self.size = end
        self.level_sizes.append(width)
        return torch.arange(start, end, device=tokens.device).expand(batch, width)

    def node_depths(self) -> list[int]:
        """Depth of every node 0..size-1 (the same in every row)."""
        return [0] + [level + 1 for level, width in enumerate(self.level_sizes) for _ in range(width)]

    def paths(self, max_paths: int) -> torch.Tensor:
        """Root-to-leaf paths [B, max_paths, depth] of node indices (-1 padded), leaves in node order; `max_paths`
        bounds the leaves of any row (static, so that no host sync is needed)."""
        size = self.size
        parents, valid = self.parents[:, :size], self.valid[:, :size]
        child_count = torch.zeros(parents.shape, dtype=torch.long, device=parents.device)
        child_count.scatter_add_(1, parents.clamp(min=0), (valid & (parents >= 0)).long())
        is_leaf = valid & (child_count == 0)
        is_leaf[:, 0] = False
        num_paths = min(max_paths, size - 1)
        # leaves first, in node order (a stable sort on "not a leaf")
        leaves = torch.sort((~is_leaf).to(torch.int8), dim=1, stable=True).indices[:, :num_paths]
        leaf_valid = is_leaf.gather(1, leaves)
        on_path = self.ancestors[torch.arange(len(leaves), device=leaves.device)[:, None], leaves][..., :size]
        on_path &= leaf_valid[..., None]
        depth_match = on_path[..., None, :] & (self.depths[:, None, None, :size] == torch.arange(
            1, self.depth + 1, device=leaves.device
        )[None, None, :, None])
        found = depth_match.any(-1)
        return torch.where(found, depth_match.to(torch.int8).argmax(-1), torch.full_like(found, -1, dtype=torch.long))

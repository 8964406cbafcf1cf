"""Draft trees, drafters and tree attention masks, checked on hand-built cases and by sampling."""

from __future__ import annotations

import itertools

import torch

from hf_specdec.cache_layout import CacheLayout, sliding_window_mask, tree_attention_mask
from hf_specdec.config import SpeculativeConfig
from hf_specdec.drafting import make_drafter, shifted_gumbel
from hf_specdec.trees import DraftTree, compact_rows


def small_tree() -> DraftTree:
    """root -> 1 (a), 2 (b); 1 -> 3 (c), 4 (d); 2 -> 5 (e); in one row, and a second row with only node 1."""
    tree = DraftTree(torch.tensor([10, 20]), capacity=5, max_depth=2)
    tree.add_level(torch.zeros(2, 2, dtype=torch.long), torch.tensor([[11, 12], [21, 0]]), torch.tensor([[True, True], [True, False]]))
    tree.add_level(torch.tensor([[1, 1, 2], [1, 1, 1]]), torch.tensor([[13, 14, 15], [0, 0, 0]]), torch.tensor([[True, True, True], [False, False, False]]))
    return tree


def test_tree_structure():
    tree = small_tree()
    assert tree.size == 6 and tree.depth == 2
    assert tree.parents[0].tolist() == [-1, 0, 0, 1, 1, 2]
    assert tree.depths[0].tolist() == [0, 1, 1, 2, 2, 2]
    assert tree.path_tokens[0, 4].tolist() == [11, 14]
    assert tree.path_tokens[0, 5].tolist() == [12, 15]
    # ancestors: the node itself and its draft ancestors (the root is committed, not a tree node)
    assert tree.ancestors[0, 4, :6].tolist() == [False, True, False, False, True, False]
    assert tree.paths(3)[0].tolist() == [[1, 3], [1, 4], [2, 5]]
    assert tree.paths(3)[1].tolist() == [[1, -1], [-1, -1], [-1, -1]]


def test_compact_rows_keeps_order():
    valid = torch.tensor([[False, True, True], [True, False, False]])
    values = torch.tensor([[1, 2, 3], [4, 5, 6]])
    kept_valid, kept = compact_rows(valid, values, width=2)
    assert kept_valid.tolist() == [[True, True], [True, False]]
    assert kept[0].tolist() == [2, 3] and kept[1, 0] == 4


def test_tree_attention_mask():
    # slots: 0 committed, 1 hole, 2 committed (the root), then nodes 1, 2 (children of root) and 3 (child of 1)
    valid = torch.tensor([[True, False, True, True, True, True]])
    nodes = torch.tensor([[-1, -1, -1, 1, 2, 3]])
    ancestors = torch.zeros(1, 4, 4, dtype=torch.bool)
    ancestors[0, 1, 1] = ancestors[0, 2, 2] = ancestors[0, 3, 3] = ancestors[0, 3, 1] = True
    mask = tree_attention_mask(torch.tensor([[2, 3, 4, 5]]), valid, nodes, ancestors)
    assert mask[0].int().tolist() == [
        [1, 0, 1, 0, 0, 0],  # root: committed, causal, skips the hole
        [1, 0, 1, 1, 0, 0],  # node 1
        [1, 0, 1, 0, 1, 0],  # node 2: not its sibling
        [1, 0, 1, 1, 0, 1],  # node 3: its parent node 1
    ]
    # a padding query still sees itself (no empty softmax rows)
    assert tree_attention_mask(torch.tensor([[1]]), valid, nodes, None)[0, 0].int().tolist() == [1, 1, 0, 0, 0, 0]


def test_sliding_window_uses_positions_not_slots():
    mask = torch.ones(1, 1, 4, dtype=torch.bool)
    positions = torch.tensor([[0, 5, 6, 7]])  # slot 0 is far behind in positions
    windowed = sliding_window_mask(mask, torch.tensor([[7]]), positions, window=3)
    assert windowed[0, 0].tolist() == [False, True, True, True]


def test_cache_layout_keep():
    layout = CacheLayout(2, torch.device("cpu"))
    layout.append(torch.ones(2, 2, dtype=torch.bool), torch.tensor([[0, 1], [0, 1]]))
    layout.append(torch.ones(2, 3, dtype=torch.bool), torch.tensor([[2, 3, 3], [2, 3, 3]]), torch.tensor([[-1, 1, 2]] * 2))
    layout.keep(2, torch.tensor([[2, 4], [2, 2]]), torch.tensor([[True, True], [True, False]]))
    assert layout.valid.tolist() == [[True] * 4, [True, True, True, False]]
    assert layout.positions[0].tolist() == [0, 1, 2, 3]
    assert (layout.nodes == -1).all()


def draft_level(config: str, logq: torch.Tensor, greedy: bool, levels: int = 1):
    """Run a drafter for `levels` levels where every node sees the same log q; returns (tree, drafter, its state)."""
    config = SpeculativeConfig.parse(config)
    batch = logq.shape[0]
    tree = DraftTree(torch.zeros(batch, dtype=torch.long), capacity=config.tree_size, max_depth=config.depth)
    drafter = make_drafter(config, greedy)
    state = drafter.start(tree)
    frontier = torch.zeros(batch, 1, dtype=torch.long)
    frontier_valid = torch.ones(batch, 1, dtype=torch.bool)
    for _ in range(levels):
        nodes = drafter.expand(tree, state, frontier, frontier_valid, logq[:, None].expand(-1, frontier.shape[1], -1))
        frontier, frontier_valid = nodes, tree.valid.gather(1, nodes)
    return tree, drafter, state


def test_gumbel_top_k_draws_without_replacement_from_q():
    q = torch.tensor([0.4, 0.3, 0.2, 0.1, 0.0])
    rows = 40000
    tree, _, _ = draft_level("rsd-c:b=2", q.log().expand(rows, -1), greedy=False)
    first, second = tree.tokens[:, 1], tree.tokens[:, 2]
    assert tree.valid[:, 1:3].all() and (first != second).all() and (first != 4).all() and (second != 4).all()
    observed = torch.zeros(5, 5)
    observed.index_put_((first, second), torch.ones(rows), accumulate=True)
    for a, b in itertools.permutations(range(4), 2):
        expected = float(q[a] * q[b] / (1 - q[a]))
        assert abs(observed[a, b] / rows - expected) < 4 * (expected / rows) ** 0.5 + 1e-3


def test_branching_stops_at_the_support_of_q():
    q = torch.tensor([0.5, 0.5, 0.0, 0.0])
    tree, _, _ = draft_level("rsd-c:b=3", q.log().expand(4, -1), greedy=False)
    # the level keeps its static width of three; two children are valid
    assert tree.size == 4 and tree.valid[:, 1:3].all() and not tree.valid[:, 3].any()


def test_shifted_gumbel_keeps_the_parent_maximum():
    perturbed = torch.tensor([[1.0, 3.0, -2.0, float("-inf")]])
    shifted = shifted_gumbel(torch.tensor([0.5]), perturbed)
    assert torch.isclose(shifted.max(), torch.tensor(0.5))
    assert shifted[0].argsort(descending=True)[:3].tolist() == [1, 0, 2]  # order is kept
    assert shifted[0, 3] == float("-inf")


def test_greedy_beam_search_keeps_the_best_paths():
    # with the same log q everywhere, the best 3 two-token paths are (0,0), (0,1), (1,0) by probability
    logq = torch.tensor([[0.5, 0.3, 0.2]]).log()
    tree, _, _ = draft_level("rsd-s:w=3,d=2", logq, greedy=True, levels=2)
    level_two = tree.path_tokens[0, 4:7].tolist()
    assert sorted(map(tuple, level_two)) == [(0, 0), (0, 1), (1, 0)]


def test_spectr_merges_sequences_into_a_trie():
    # q is deterministic (token 1 only): every sequence draws the same tokens and shares one node per level
    logq = torch.tensor([[0.0, 1.0, 0.0]]).log()
    tree, drafter, state = draft_level("spectr:k=3,l=2", logq, greedy=False, levels=2)
    assert tree.valid[0, : tree.size].sum() == 3  # root + one node per level (the first sequence's slot)
    assert drafter.paths(tree, state)[0].tolist() == [[1, 4], [1, 4], [1, 4]]  # three draws through the same nodes

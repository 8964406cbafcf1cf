"""Draft trees, drafters and tree attention masks, checked on hand-built cases and by sampling."""

from __future__ import annotations

import itertools

import pytest
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


def draft_level(config: str, logq: torch.Tensor, greedy: bool, levels: int = 1, token_ids: torch.Tensor | None = None):
    """Run a drafter for `levels` levels where every node sees the same log q (compact with `token_ids` when given);
    returns (tree, drafter, its state)."""
    config = SpeculativeConfig.parse(config)
    batch = logq.shape[0]
    tree = DraftTree(torch.zeros(batch, dtype=torch.long), capacity=config.tree_size, max_depth=config.depth)
    drafter = make_drafter(config, greedy)
    state = drafter.start(tree)
    frontier = torch.zeros(batch, 1, dtype=torch.long)
    frontier_valid = torch.ones(batch, 1, dtype=torch.bool)
    for _ in range(levels):
        n = frontier.shape[1]
        node_ids = None if token_ids is None else token_ids[:, None].expand(-1, n, -1)
        nodes = drafter.expand(tree, state, frontier, frontier_valid, logq[:, None].expand(-1, n, -1), node_ids)
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


# ---------------------------------------------------------------- drafting on q's support only


def compact_form(logq: torch.Tensor, width: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A dense log q [..., V] as the compact form the loop hands the drafters: `width` entries per row, every finite
    one among them, in a random order, the rest -inf on tokens outside the support."""
    generator = torch.Generator().manual_seed(seed)
    keys = torch.rand(logq.shape, generator=generator) + torch.isinf(logq)  # the support first, shuffled
    token_ids = keys.argsort(-1)[..., :width]
    return logq.gather(-1, token_ids), token_ids


def draft_compact(config: str, logq: torch.Tensor, width: int, greedy: bool = False, levels: int = 1):
    """`draft_level` with compact inputs (the same compact form at every node)."""
    small, token_ids = compact_form(logq, width)
    return draft_level(config, small, greedy, levels, token_ids)


def frequencies(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """Relative frequency of each row of `tokens` [rows, k] as a tuple, over vocab^k cells."""
    index = torch.zeros(tokens.shape[0], dtype=torch.long)
    for column in range(tokens.shape[1]):
        index = index * vocab + tokens[:, column]
    return torch.bincount(index, minlength=vocab ** tokens.shape[1]).double() / tokens.shape[0]


def assert_same_distribution(a: torch.Tensor, b: torch.Tensor, rows: int):
    """Two empirical distributions over the same cells from `rows` samples each: within 5 sigma per cell."""
    spread = 5 * ((a + b) / rows).sqrt() + 1e-3
    assert ((a - b).abs() <= spread).all(), (a - b).abs().max()


def test_gumbel_top_k_on_the_support_draws_without_replacement_from_q():
    q = torch.tensor([0.4, 0.3, 0.2, 0.1, 0.0, 0.0])
    rows = 40000
    tree, _, _ = draft_compact("rsd-c:b=2", q.log().expand(rows, -1), width=5)
    first, second = tree.tokens[:, 1], tree.tokens[:, 2]
    assert tree.valid[:, 1:3].all() and (first != second).all() and (first < 4).all() and (second < 4).all()
    observed = frequencies(torch.stack([first, second], 1), 6).view(6, 6)
    for a, b in itertools.permutations(range(4), 2):
        expected = float(q[a] * q[b] / (1 - q[a]))
        assert abs(observed[a, b] - expected) < 4 * (expected / rows) ** 0.5 + 1e-3


def test_branching_on_the_support_stops_at_its_end():
    q = torch.tensor([0.5, 0.5, 0.0, 0.0, 0.0])
    tree, _, _ = draft_compact("rsd-c:b=3", q.log().expand(4, -1), width=4)
    assert tree.size == 4 and tree.valid[:, 1:3].all() and not tree.valid[:, 3].any()
    assert sorted(tree.tokens[0, 1:3].tolist()) == [0, 1]


def test_stochastic_beams_on_the_support_follow_the_dense_distribution():
    """RSD-S on the compact form draws the same two-level beams (in distribution) as on the dense log q."""
    rows = 30000
    q = torch.tensor([0.35, 0.25, 0.2, 0.15, 0.05, 0.0, 0.0])
    logq = q.log().expand(rows, -1)
    torch.manual_seed(1)
    dense_tree, _, _ = draft_level("rsd-s:w=2,d=2", logq, greedy=False, levels=2)
    torch.manual_seed(2)
    small_tree, _, _ = draft_compact("rsd-s:w=2,d=2", logq, width=6, levels=2)
    for tree in (dense_tree, small_tree):
        assert tree.valid[:, 1:5].all() and (tree.tokens[:, 1:5] < 5).all()
    for nodes in ([1, 2], [3, 4]):
        dense_cells = frequencies(dense_tree.path_tokens[:, nodes].flatten(1), 7)
        small_cells = frequencies(small_tree.path_tokens[:, nodes].flatten(1), 7)
        assert_same_distribution(dense_cells, small_cells, rows)


def test_chains_and_sequences_on_the_support_sample_q():
    """SD's multinomial and SpecTr's i.i.d. sequences on the compact form draw tokens with q's probabilities; SpecTr
    merges sequences on the tokens (not on their compact index)."""
    rows = 40000
    q = torch.tensor([0.5, 0.0, 0.3, 0.0, 0.2])
    tree, _, _ = draft_compact("sd:l=1", q.log().expand(rows, -1), width=4)
    assert_same_distribution(frequencies(tree.tokens[:, 1:2], 5), q.double(), rows)
    tree, drafter, state = draft_compact("spectr:k=3,l=1", q.log().expand(rows, -1), width=3)
    paths = drafter.paths(tree, state)
    drawn = tree.tokens.gather(1, paths[:, :, 0])  # the token of each sequence's node
    assert_same_distribution(frequencies(drawn[:, :1], 5), q.double(), rows)
    distinct_tokens = drawn.sort(1).values.diff(dim=1).ne(0).sum(1) + 1
    assert torch.equal(tree.valid[:, 1:4].sum(1), distinct_tokens)  # one node per distinct first token


def test_greedy_drafters_on_the_support_take_the_dense_choices():
    logq = torch.tensor([[0.12, 0.5, 0.0, 0.3, 0.08]]).log()
    # (beams: one level, as two share the same q at every node, (a, b) and (b, a) tie at the next)
    for config, levels in (("sd:l=2", 2), ("rsd-c:b=2-1", 2), ("rsd-s:w=3,d=2", 1), ("spectr:k=2,l=2", 2)):
        dense_tree, _, _ = draft_level(config, logq, greedy=True, levels=levels)
        small_tree, _, _ = draft_compact(config, logq, width=4, greedy=True, levels=levels)
        size = dense_tree.size
        assert dense_tree.tokens[:, :size].tolist() == small_tree.tokens[:, :size].tolist(), config
        assert dense_tree.valid[:, :size].tolist() == small_tree.valid[:, :size].tolist(), config


def test_compact_log_probs_is_log_softmax_on_the_support():
    from hf_specdec.drafting import compact_log_probs

    scores = torch.full((2, 3, 300), float("-inf"))
    support = torch.rand(2, 3, 300).argsort(-1)[..., :40]
    scores.scatter_(-1, support, torch.randn(2, 3, 40) * 3)
    logq, token_ids = compact_log_probs(scores, 64)
    dense = scores.log_softmax(-1)
    assert torch.allclose(logq, dense.gather(-1, token_ids), atol=1e-6)
    finite = torch.isfinite(logq)
    assert (finite.sum(-1) == 40).all() and torch.equal(finite, torch.isfinite(dense.gather(-1, token_ids)))
    # more finite scores than room: q restricted to the most likely `capacity` tokens, renormalised
    logq, token_ids = compact_log_probs(torch.randn(2, 300), 16)
    assert torch.allclose(logq.exp().sum(-1), torch.ones(2)) and torch.isfinite(logq).all()


def test_on_top_logits_processes_as_the_whole_vocabulary():
    """Temperature, top-k then top-p / min-p on the highest logits only: the same scores on q's support as the
    processors on the whole vocabulary (ties at the k-th logit included; top-p breaks ties at its threshold by sort
    order, so it gets logits without ties), and -inf elsewhere; None for processors that read token ids or turn
    -inf finite."""
    from transformers.generation import logits_process as lp

    from hf_specdec.processors import NodeScorer

    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 4, 4096, generator=generator) * 4
    tied = (logits * 2).round() / 2
    rows = torch.arange(3)
    lists = [
        ([lp.TopKLogitsWarper(50)], tied),
        ([lp.TemperatureLogitsWarper(0.7), lp.TopKLogitsWarper(20)], tied),
        ([lp.TemperatureLogitsWarper(0.7), lp.TopKLogitsWarper(20), lp.TopPLogitsWarper(0.9)], logits),
        ([lp.TopKLogitsWarper(30), lp.MinPLogitsWarper(0.1), lp.TemperatureLogitsWarper(1.3)], logits),
    ]
    for processors, logits in lists:
        scorer = NodeScorer(lp.LogitsProcessorList(processors))
        capacity = scorer.support_capacity(4096)
        scores, token_ids = scorer.on_top_logits(logits, rows, capacity)
        dense = scorer(logits, None, None, rows, [0, 0, 0], [0] * 4)
        finite = torch.isfinite(dense)
        assert (finite.sum(-1) <= capacity).all()
        assert torch.equal(scores, dense.gather(-1, token_ids))
        assert (torch.isfinite(scores).sum(-1) == finite.sum(-1)).all()
    for processors in ([lp.RepetitionPenaltyLogitsProcessor(1.2), lp.TopKLogitsWarper(5)],
                       [lp.TopPLogitsWarper(0.9), lp.TopKLogitsWarper(5)],
                       [lp.TopKLogitsWarper(5), lp.InfNanRemoveLogitsProcessor()], [lp.TopPLogitsWarper(0.9)]):
        scorer = NodeScorer(lp.LogitsProcessorList(processors))
        assert scorer.on_top_logits(logits, rows, 64) is None
    assert NodeScorer(lp.LogitsProcessorList([lp.TopPLogitsWarper(0.9)])).support_capacity(4096) is None


def test_top_support_is_the_whole_vocabulary_or_none():
    """The target's p on its highest logits (`top_support`): where it answers, the processed scores of the whole
    vocabulary on those entries and no finite score elsewhere (ties at the k-th logit included, min-length eos ids
    among them); None where more scores tie at the top-k threshold than the entries hold, and for warpers that sort
    (top-p, typical, top-h) or min-p forcing more than one token in."""
    from transformers.generation import logits_process as lp

    from hf_specdec.processors import NodeScorer, prefix_lengths

    generator = torch.Generator().manual_seed(6)
    vocab, rows = 4096, torch.arange(3)
    logits = torch.randn(3, 4, vocab, generator=generator) * 4
    tied = (logits * 2).round() / 2  # dozens of equal scores at every threshold
    eos = [int(logits[1, 2].argmax()), 9]
    lengths, depths = [10, 12, 14], [0, 1, 1, 2]
    lists = [
        [lp.TopKLogitsWarper(50)],
        [lp.TemperatureLogitsWarper(0.7), lp.TopKLogitsWarper(20), lp.MinPLogitsWarper(0.05)],
        [lp.MinNewTokensLengthLogitsProcessor(9, 4, eos), lp.TopKLogitsWarper(30), lp.EpsilonLogitsWarper(3e-4)],
    ]
    for processors in lists:
        scorer = NodeScorer(lp.LogitsProcessorList(processors))
        capacity = scorer.support_capacity(vocab)
        node_lengths = prefix_lengths(lengths, depths, "cpu") if scorer.reads_prefix_lengths else None
        for scored in (logits, tied):
            dense = scorer(scored, None, None, rows, lengths, depths)
            top = scorer.top_support(scored, rows, capacity, node_lengths)
            assert top is not None
            scores, token_ids = top
            assert torch.equal(scores, dense.gather(-1, token_ids))
            assert (torch.isfinite(scores).sum(-1) == torch.isfinite(dense).sum(-1)).all()
    # 60 tokens tied at the 50th highest logit of one node: the top 132 hold 50 + 60 = 110 scores at or above it
    crowded = logits.clone()
    crowded[0, 1, :200] = torch.arange(200.0, 0.0, -1.0) / 10 + 20  # 200 distinct highest scores ...
    crowded[0, 1, 49:250] = crowded[0, 1, 49]  # ... the 50th of them repeated over 201 tokens
    scorer = NodeScorer(lp.LogitsProcessorList([lp.TopKLogitsWarper(50)]))
    assert scorer.top_support(crowded, rows, scorer.support_capacity(vocab)) is None
    assert scorer.top_support(crowded, rows, vocab) is not None  # the whole vocabulary: nothing can be outside
    for processors in ([lp.TopKLogitsWarper(50), lp.TopPLogitsWarper(0.9)],
                       [lp.TopKLogitsWarper(50), lp.TypicalLogitsWarper(0.9)],
                       [lp.TopKLogitsWarper(50), lp.MinPLogitsWarper(0.1, min_tokens_to_keep=3)],
                       [lp.RepetitionPenaltyLogitsProcessor(1.2), lp.TopKLogitsWarper(5)], [lp.TemperatureLogitsWarper(0.5)]):
        scorer = NodeScorer(lp.LogitsProcessorList(processors))
        assert scorer.top_support(logits, rows, 132) is None, processors


def test_on_entries_processes_a_reduced_vocabulary_as_the_whole():
    """A reduced-vocabulary draft's logits are -inf outside its kept tokens: value-only processors (temperature,
    top-k, top-p, min-p) on the kept entries alone give the scores they give on the whole vocabulary there (top-p
    gets logits without ties, which it may break otherwise); processors that read token ids or prefixes refuse."""
    from transformers.generation import logits_process as lp

    from hf_specdec.processors import NodeScorer

    generator = torch.Generator().manual_seed(7)
    kept = torch.randperm(4096, generator=generator)[:512]
    logits = torch.full((3, 4, 4096), float("-inf"))
    logits[..., kept] = torch.randn(3, 4, 512, generator=generator) * 4
    rows = torch.arange(3)
    for processors in ([], [lp.TemperatureLogitsWarper(0.7)], [lp.TopKLogitsWarper(50)],
                       [lp.TemperatureLogitsWarper(0.7), lp.TopPLogitsWarper(0.9)],
                       [lp.MinPLogitsWarper(0.1), lp.TopKLogitsWarper(20)]):
        scorer = NodeScorer(lp.LogitsProcessorList(processors))
        dense = scorer(logits, None, None, rows, [0, 0, 0], [0] * 4)
        assert torch.equal(scorer.on_entries(logits[..., kept], rows), dense[..., kept])
    for processors in ([lp.RepetitionPenaltyLogitsProcessor(1.2)], [lp.SuppressTokensLogitsProcessor([5])]):
        assert NodeScorer(lp.LogitsProcessorList(processors)).on_entries(logits[..., kept], rows) is None


def test_length_processors_score_every_node_as_generate():
    """Min-length processors read only a prefix's length: every node is scored at once from its prefix length (row
    length, left padding included, plus depth), with the scores transformers gives that node's own input_ids; on the
    highest logits and on a reduced vocabulary's entries as on the whole vocabulary; eos ids anywhere among them."""
    from transformers.generation import logits_process as lp

    from hf_specdec.processors import NodeScorer, prefix_lengths

    generator = torch.Generator().manual_seed(9)
    batch, width, vocab = 3, 4, 4096
    lengths, depths = [10, 12, 14], [0, 1, 1, 2]
    logits = torch.randn(batch, width, vocab, generator=generator) * 4
    eos = [int(logits[0, 0].argmax()), 77, vocab - 1]  # one of them the highest logit of a node
    lists = [
        [lp.MinNewTokensLengthLogitsProcessor(9, 4, eos), lp.TemperatureLogitsWarper(0.7), lp.TopKLogitsWarper(50)],
        [lp.MinLengthLogitsProcessor(13, eos), lp.TopKLogitsWarper(20)],
        [lp.TopKLogitsWarper(30), lp.MinNewTokensLengthLogitsProcessor(9, 5, eos[:1])],
    ]
    rows = torch.arange(batch)
    node_lengths = prefix_lengths(lengths, depths, "cpu")
    for processors in lists:
        scorer = NodeScorer(lp.LogitsProcessorList(processors))
        assert not scorer.reads_prefix_tokens and scorer.reads_prefix_lengths
        scores = scorer(logits, None, None, rows, lengths, depths)
        for b in range(batch):
            for n in range(width):
                input_ids = torch.zeros(1, lengths[b] + depths[n], dtype=torch.long)  # only its length is read
                expected = lp.LogitsProcessorList(processors)(input_ids, logits[b, n][None].clone())[0]
                assert torch.equal(scores[b, n], expected), (b, n)
        top, token_ids = scorer.on_top_logits(logits, rows, scorer.support_capacity(vocab), node_lengths)
        assert torch.equal(top, scores.gather(-1, token_ids))
        assert (torch.isfinite(top).sum(-1) == torch.isfinite(scores).sum(-1)).all()
        assert scorer.on_top_logits(logits, rows, scorer.support_capacity(vocab)) is None  # lengths needed
    kept = torch.cat([torch.tensor(eos), torch.randperm(vocab - 100, generator=generator)[:200] + 80]).unique()
    reduced = torch.full_like(logits, float("-inf"))
    reduced[..., kept] = logits[..., kept]
    scorer = NodeScorer(lp.LogitsProcessorList([lp.MinNewTokensLengthLogitsProcessor(9, 4, eos),
                                                lp.TemperatureLogitsWarper(0.7)]))
    dense = scorer(reduced, None, None, rows, lengths, depths)
    assert torch.equal(scorer.on_entries(reduced[..., kept], rows, kept, node_lengths), dense[..., kept])
    assert scorer.on_entries(reduced[..., kept], rows) is None


def test_top_entries_is_a_top_k():
    from hf_specdec.processors import top_entries

    generator = torch.Generator().manual_seed(6)
    for vocab, k in ((49152, 132), (32000, 50), (4096, 10), (1000, 7), (50257, 100)):
        x = (torch.randn(2, 3, vocab, generator=generator) * 3).round()  # ties
        x[0, 0, ::3] = float("-inf")
        values, index = top_entries(x, k)
        assert torch.equal(values.sort(-1, descending=True).values, x.topk(k, -1).values)
        assert torch.equal(x.gather(-1, index), values) and (index.sort(-1).values.diff(dim=-1) > 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_top_k_warp_is_the_warper_bit_for_bit(dtype):
    """`top_k_warp` (what `NodeScorer` runs for a `TopKLogitsWarper`) returns the warper's own scores: ties at the
    k-th score, -inf and NaN entries, k >= V, min_tokens_to_keep, a filter value other than -inf."""
    from transformers.generation import logits_process as lp

    from hf_specdec.processors import top_k_warp

    generator = torch.Generator().manual_seed(11)
    warpers = (lp.TopKLogitsWarper(50), lp.TopKLogitsWarper(132), lp.TopKLogitsWarper(3, min_tokens_to_keep=9),
               lp.TopKLogitsWarper(7, filter_value=-1e4), lp.TopKLogitsWarper(70000))
    for vocab in (49152, 50257, 1000, 12):
        x = (torch.randn(3, 5, vocab, generator=generator) * 3).round().to(dtype)  # ties
        x[0, 0, ::3] = float("-inf")
        x[1, 2, 5] = float("nan")
        x[2, 4] = 1.0  # every score tied
        for warper in warpers:
            expected = warper(None, x.flatten(0, 1)).view_as(x)
            found = top_k_warp(warper, x)
            assert torch.equal(found.isnan(), expected.isnan())
            assert torch.equal(found.nan_to_num(), expected.nan_to_num()), (vocab, warper.top_k)


def test_draft_probs_buffer_records_and_clears():
    """Compact levels of one width stay sparse; a dense level (or another width) moves the step to the dense buffer,
    which the next dense step finds zero again, in the same storage."""
    from hf_specdec.drafting import DraftProbsBuffer
    from hf_specdec.verification import SparseProbs

    cpu = torch.device("cpu")
    buffer = DraftProbsBuffer()
    logq, token_ids = compact_form(torch.tensor([0.5, 0.25, 0.25, 0.0] + [0.0] * 26).log().expand(2, 2, -1), 6)
    expected = torch.zeros(2, 5, 30)
    expected[:, 1:3, :4] = torch.tensor([0.5, 0.25, 0.25, 0.0])

    sparse = buffer.start((2, 5, 30), cpu)
    sparse.record(1, 3, logq, token_ids)
    sparse.record(3, 4, logq[:, :1], token_ids[:, :1])
    probs = sparse.probs(4)
    assert isinstance(probs, SparseProbs) and probs.values.shape == (2, 4, 6)
    assert torch.allclose(probs.dense(), torch.cat([expected[:, :3], expected[:, 1:2]], 1))

    mixed = buffer.start((2, 5, 30), cpu)
    mixed.record(1, 3, logq, token_ids)
    mixed.record(3, 4, torch.tensor([0.2] * 30).log().expand(2, 1, -1), None)
    probs = mixed.probs(5)
    expected[:, 3] = 0.2
    assert isinstance(probs, torch.Tensor) and torch.allclose(probs, expected)
    storage = probs.data_ptr()

    again = buffer.start((2, 5, 30), cpu)
    again.record(1, 2, logq[:, :1, :3], token_ids[:, :1, :3])  # first sparse, then another width: dense
    again.record(2, 3, logq[:, :1], token_ids[:, :1])
    probs = again.probs(5)
    assert probs.data_ptr() == storage
    assert torch.equal(probs[:, 1], torch.zeros(2, 30).scatter(1, token_ids[:, 0, :3], logq[:, 0, :3].exp()))
    assert torch.allclose(probs[:, 2], expected[:, 1]) and (probs[:, [0, 3, 4]] == 0).all()
    assert buffer.start((1, 5, 30), cpu).probs(5).shape == (1, 5, 30)

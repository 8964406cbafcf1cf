"""Each verifier alone: its output distribution equals p, computed exactly by enumerating every draw.

For a node with target distribution p and draft distribution q over a tiny vocabulary, the output of one
verification step is "candidate k if candidates < k are rejected and k accepted, else a draw from the residual".
Summing over every possible draw sequence with its probability gives the output distribution exactly.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from hf_specdec.verification import (
    greedy_match,
    recursive_rejection,
    sample_with_uniform,
    spectr_kseq,
    spectr_rho,
    VerifyInputs,
    verify_tree,
)

VOCAB = 5


def step_output(rule, p, q, tokens: tuple[int, ...]) -> torch.Tensor:
    """Exact output distribution of one step given its candidates: sum_k P(reach k) a_k delta_k + P(none) residual."""
    decision = rule(p, q, torch.tensor(tokens))
    out = torch.zeros(VOCAB, dtype=torch.float64)
    reach = 1.0
    for token, accept in zip(tokens, decision.accept_probs.tolist()):
        out[token] += reach * accept
        reach *= 1.0 - accept
    return out + reach * decision.residual / decision.residual.sum()


def without_replacement_probability(q: torch.Tensor, tokens: tuple[int, ...]) -> float:
    """P(first n draws without replacement from q are `tokens`, in order) (the Gumbel-top-k order)."""
    probability, left = 1.0, 1.0
    for token in tokens:
        if left <= 0:
            return 0.0
        probability *= float(q[token]) / left
        left -= float(q[token])
    return probability


def distributions():
    """(p, q) pairs: random, q with zeros where p > 0, p with zeros where q > 0, equal, disjoint supports."""
    torch.manual_seed(3)
    pairs = []
    for _ in range(4):
        pairs.append((torch.rand(VOCAB), torch.rand(VOCAB)))
    pairs.append((torch.rand(VOCAB), torch.tensor([0.5, 0.5, 0.0, 0.0, 0.0])))  # q = 0 where p > 0
    pairs.append((torch.tensor([0.0, 0.0, 0.3, 0.3, 0.4]), torch.rand(VOCAB)))  # p = 0 where q > 0
    pairs.append((torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0]),) * 2)  # p == q
    pairs.append((torch.tensor([0.0, 0.0, 0.0, 0.5, 0.5]), torch.tensor([0.6, 0.4, 0.0, 0.0, 0.0])))  # disjoint
    pairs.append((torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0]), torch.rand(VOCAB)))  # p one-hot
    return [(p.double() / p.double().sum(), q.double() / q.double().sum()) for p, q in pairs]


@pytest.mark.parametrize("num_candidates", [1, 2, 3, 4])
@pytest.mark.parametrize("case", range(len(distributions())))
def test_recursive_rejection_is_exact(case, num_candidates):
    p, q = distributions()[case]
    # a drafter cannot draw more distinct tokens than q has in its support
    num_candidates = min(num_candidates, int((q > 0).sum()))
    total = torch.zeros(VOCAB, dtype=torch.float64)
    for tokens in itertools.permutations(range(VOCAB), num_candidates):
        weight = without_replacement_probability(q, tokens)
        if weight > 0:
            total += weight * step_output(recursive_rejection, p, q, tokens)
    torch.testing.assert_close(total, p, atol=1e-10, rtol=0)


@pytest.mark.parametrize("num_draws", [1, 2, 3])
@pytest.mark.parametrize("case", range(len(distributions())))
def test_spectr_kseq_is_exact(case, num_draws):
    p, q = distributions()[case]
    total = torch.zeros(VOCAB, dtype=torch.float64)
    for tokens in itertools.product(range(VOCAB), repeat=num_draws):
        weight = float(torch.prod(q[list(tokens)]))
        if weight > 0:
            total += weight * step_output(spectr_kseq, p, q, tokens)
    torch.testing.assert_close(total, p, atol=1e-8, rtol=0)


def test_spectr_rho_is_the_smallest_feasible():
    p, q = distributions()[0]
    for draws in (2, 3, 5):
        rho, beta = spectr_rho(p, q, draws)
        assert 1.0 <= rho <= draws
        assert 1 - (1 - beta) ** draws <= rho * beta + 1e-9
        smaller = rho * (1 - 1e-6)
        b = float(torch.minimum(q, p / smaller).sum())
        assert rho == 1.0 or 1 - (1 - b) ** draws > smaller * b
    assert spectr_rho(p, q, 1)[0] == 1.0  # one draw: plain rejection sampling


def test_more_candidates_accept_more_often():
    """The point of trees: P(some candidate accepted) grows with the number of candidates."""
    p, q = distributions()[1]
    reject = []
    for n in (1, 2, 3):
        none_accepted = 0.0
        for tokens in itertools.permutations(range(VOCAB), n):
            decision = recursive_rejection(p, q, torch.tensor(tokens))
            none_accepted += without_replacement_probability(q, tokens) * float(torch.prod(1 - decision.accept_probs))
        reject.append(none_accepted)
    assert reject[0] > reject[1] > reject[2]


def test_greedy_accepts_only_the_argmax():
    p = torch.tensor([0.1, 0.5, 0.2, 0.2])
    decision = greedy_match(p, None, torch.tensor([2, 1, 3]))
    assert decision.accept_probs.tolist() == [0.0, 1.0, 0.0]
    assert int(decision.residual.argmax()) == 1


def test_sample_with_uniform_is_inverse_cdf():
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75]])
    assert sample_with_uniform(probs, torch.tensor([0.0])).item() == 1
    assert sample_with_uniform(probs, torch.tensor([0.2499])).item() == 1
    assert sample_with_uniform(probs, torch.tensor([0.25])).item() == 3
    assert sample_with_uniform(probs, torch.tensor([0.9999999])).item() == 3
    # unnormalised weights work the same
    assert sample_with_uniform(probs * 4, torch.tensor([0.3])).item() == 3


def one_hot(vocab: int, *tokens: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(tokens), vocab).double()


class TestVerifyTree:
    """The tree walk: candidates per node, descent, bonus and residual tokens."""

    # root -> {1: token 4, 2: token 5}; 1 -> {3: token 6}; 2 -> {4: token 7}
    paths = torch.tensor([[[1, 3], [2, 4]]])
    tokens = torch.tensor([[0, 4, 5, 6, 7]])

    def test_greedy_descends_along_the_argmax(self):
        # argmax after root = 5 (node 2), after node 2 = 7 (node 4), after node 4 = 9 (bonus)
        scores = one_hot(10, 5, 0, 7, 0, 9)[None]
        result = verify_tree(VerifyInputs("greedy", self.paths, self.tokens, scores, None, torch.zeros(1, 2, 2), torch.zeros(1)))
        assert result.accepted_nodes.tolist() == [[2, 4]]
        assert result.num_accepted.tolist() == [2]
        assert result.next_tokens.tolist() == [9]

    def test_greedy_stops_at_the_first_mismatch(self):
        scores = one_hot(10, 4, 8, 0, 0, 0)[None]  # after node 1 the target wants 8, the draft offers 6
        result = verify_tree(VerifyInputs("greedy", self.paths, self.tokens, scores, None, torch.zeros(1, 2, 2), torch.zeros(1)))
        assert result.accepted_nodes.tolist() == [[1, -1]]
        assert result.next_tokens.tolist() == [8]

    def test_sampling_with_p_equal_q_accepts_everything(self):
        probs = torch.rand(1, 5, 10).softmax(-1)
        result = verify_tree(VerifyInputs("rrs", self.paths, self.tokens, probs, probs, torch.full((1, 2, 2), 0.999), torch.rand(1)))
        assert result.num_accepted.tolist() == [2]

    def test_rejected_candidates_are_never_the_next_token(self):
        # q is concentrated on the candidates (4, 5) while p has no mass there: both rejected, residual avoids them
        p = torch.full((1, 5, 10), 0.1)
        p[0, 0, 4] = p[0, 0, 5] = 0.0
        q = torch.zeros(1, 5, 10)
        q[0, 0, 4] = q[0, 0, 5] = 0.5
        for u in torch.linspace(0, 0.999, 20):
            result = verify_tree(VerifyInputs("rrs", self.paths, self.tokens, p / p.sum(-1, keepdim=True), q, torch.rand(1, 2, 2), u[None]))
            assert result.num_accepted.item() == 0
            assert result.next_tokens.item() not in (4, 5)

    def test_spectr_counts_duplicate_draws(self):
        # two sequences drew the same first token (node 1): K-SEQ sees two draws of token 4
        paths = torch.tensor([[[1], [1]]])
        tokens = torch.tensor([[0, 4]])
        p = torch.full((1, 2, 10), 0.1)
        q = torch.zeros(1, 2, 10)
        q[0, :, 4] = 1.0
        # accept prob per draw = p/(rho q) = 0.1/rho; first draw rejected (u=0.99), second accepted (u=0)
        result = verify_tree(VerifyInputs("spectr", paths, tokens, p, q, torch.tensor([[[0.99], [0.0]]]), torch.zeros(1)))
        assert result.accepted_nodes.tolist() == [[1]]

    def test_empty_tree_samples_from_the_root(self):
        probs = one_hot(10, 7)[None]
        result = verify_tree(VerifyInputs("rrs", torch.zeros(1, 0, 0, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long),
                             probs, probs, torch.zeros(1, 0, 0), torch.rand(1)))
        assert result.next_tokens.tolist() == [7] and result.num_accepted.tolist() == [0]

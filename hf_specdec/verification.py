"""Verification: which draft tokens the target accepts, so that the output follows the target exactly.

The single definition of the verification semantics. Every backend (PyTorch, ONNX Runtime custom op, Triton, TensorRT
plugin) implements `verify_tree` with these inputs and must return the same tokens for the same random numbers.

Tree encoding (per batch row), shared with the drafters:
    node 0 is the root (the last committed token); draft nodes are 1..N.
    paths[k, d]      node at depth d+1 of root-to-leaf path k, or -1 past the path's end.
    node_tokens[n]   token of node n.
    target_probs[n]  p(. | prefix up to and including node n), after the logits processors.
    draft_probs[n]   q(. | prefix up to and including node n): the distribution node n's children were drawn from.
    accept_uniforms[k, d], sample_uniforms: U(0, 1) random numbers.

At node u, the candidates are the nodes at the next depth on the paths through u:
    - "spectr": one candidate per path (K-SEQ counts draws, duplicates included), in path order;
    - "rrs" and "greedy": the distinct nodes in increasing node index (drafters number siblings in the order they
      were drawn, e.g. Gumbel order), each using the uniform of the first path that holds it.
Candidate k is accepted with probability a_k (given candidates < k were rejected); the walk descends into the first
accepted candidate. If all are rejected, the next token is drawn from the rule's residual distribution; at a leaf the
next token is a bonus token drawn from p.

Numerics, which every implementation follows so that equal random numbers give equal tokens: probabilities are read as
given and every computation runs in float64 with the elementwise formulas below, in the same order (a uniform u accepts
when u < a, a token is drawn by inverse CDF with `sample_with_uniform`, integer powers are repeated products). Only the
order of summation over the vocabulary may differ between implementations; that changes the last bit of a float64 sum,
and so a token only when a uniform falls within ~1e-15 of a threshold. Uniforms lie in [0, 1) (`torch.rand`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

RULES = ("rrs", "spectr", "greedy")
SPECTR_BISECTION_STEPS = 40  # bisection steps of SpecTr's rho (kernels take the same number)


def rule_for_method(method: str, do_sample: bool) -> str:
    """The verification rule of a speculative method (see `SpeculativeConfig.method`)."""
    if not do_sample:
        return "greedy"
    return "spectr" if method == "spectr" else "rrs"


def sample_with_uniform(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sample of one token per row of `probs` (unnormalised is fine) using the given uniforms."""
    cdf = probs.double().cumsum(-1)
    threshold = uniform.double().unsqueeze(-1) * cdf[..., -1:]
    token = torch.searchsorted(cdf, threshold, right=True).squeeze(-1)
    return token.clamp_(max=probs.shape[-1] - 1)


def _normalize(dist: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    # The fallback only matters on events of probability zero (e.g. a residual of p - q when p == q).
    total = dist.sum()
    return dist / total if total > 0 else fallback


@dataclass
class NodeDecision:
    """How the verifier treats the candidates of one node."""

    accept_probs: torch.Tensor  # [n]: P(accept candidate k | candidates before k were rejected)
    residual: torch.Tensor  # [V]: distribution of the next token when every candidate is rejected


def recursive_rejection(p: torch.Tensor, q: torch.Tensor, tokens: torch.Tensor) -> NodeDecision:
    """Recursive rejection sampling (RSD): candidates drawn from q without replacement, tried in draw order.

    Theta_1 = p, q_1 = q; candidate X_k is accepted w.p. min(1, Theta_k(X_k) / q_k(X_k)); on rejection
    Theta_{k+1} = norm((Theta_k - q_k)+) and q_{k+1} = q_k without X_k, renormalised. With one candidate this is the
    speculative-decoding rule of Leviathan et al.
    """
    theta, qk = p.double(), q.double()
    accept = torch.zeros(len(tokens), dtype=torch.float64)
    for k, token in enumerate(tokens.tolist()):
        q_token = qk[token]
        accept[k] = (theta[token] / q_token).clamp(max=1.0) if q_token > 0 else 0.0
        theta = _normalize((theta - qk).clamp_(min=0.0), theta)
        qk = qk.clone()
        qk[token] = 0.0
        qk = _normalize(qk, qk)
    return NodeDecision(accept, theta)


def integer_power(base: float, exponent: int) -> float:
    """base ** exponent as repeated products (libm's pow differs between languages in the last bit)."""
    result = 1.0
    for _ in range(exponent):
        result *= base
    return result


def spectr_rho(p: torch.Tensor, q: torch.Tensor, num_draws: int, iterations: int = SPECTR_BISECTION_STEPS) -> tuple[float, float]:
    """SpecTr K-SEQ: the smallest rho in [1, K] with 1 - (1 - beta(rho))^K <= rho * beta(rho), and beta(rho*).

    beta(rho) = sum_x min(q(x), p(x) / rho). Any feasible rho keeps K-SEQ exact (the residual stays non-negative);
    the smallest maximises acceptance. The feasible set is an interval [rho*, K], so bisection converges to rho*
    while always returning a feasible value.
    """
    p, q = p.double(), q.double()

    def beta(rho: float) -> float:
        return float(torch.minimum(q, p / rho).sum())

    def feasible(rho: float) -> bool:
        b = beta(rho)
        return 1.0 - integer_power(1.0 - b, num_draws) <= rho * b + 1e-12

    lo, hi = 1.0, float(num_draws)
    if feasible(lo):
        return lo, beta(lo)
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if feasible(mid):
            hi = mid
        else:
            lo = mid
    return hi, beta(hi)


def spectr_kseq(p: torch.Tensor, q: torch.Tensor, tokens: torch.Tensor) -> NodeDecision:
    """SpecTr K-SEQ (Sun et al. 2023): K i.i.d. draws from q, each accepted w.p. min(1, p / (rho* q))."""
    p64, q64 = p.double(), q.double()
    num_draws = len(tokens)
    rho, beta = spectr_rho(p64, q64, num_draws)
    q_tok = q64[tokens]
    ratio = torch.where(q_tok > 0, p64[tokens] / (rho * q_tok).clamp(min=1e-300), torch.zeros_like(q_tok))
    accept = ratio.clamp(max=1.0)
    if beta <= 0.0:
        return NodeDecision(accept, p64)
    accepted_mass = torch.minimum(q64, p64 / rho) * ((1.0 - integer_power(1.0 - beta, num_draws)) / beta)
    return NodeDecision(accept, _normalize((p64 - accepted_mass).clamp_(min=0.0), p64))


def greedy_match(p: torch.Tensor, q: torch.Tensor | None, tokens: torch.Tensor) -> NodeDecision:
    """Greedy: accept the candidate equal to the target's argmax; otherwise the argmax itself is the next token."""
    best = int(p.argmax())
    residual = torch.zeros(p.shape[-1], dtype=torch.float64)
    residual[best] = 1.0
    return NodeDecision((tokens == best).double(), residual)


NODE_RULES = {"rrs": recursive_rejection, "spectr": spectr_kseq, "greedy": greedy_match}


@dataclass
class VerifyResult:
    accepted_nodes: torch.Tensor  # [B, L] node indices of the accepted path (depth 1..), -1 after its end
    accepted_tokens: torch.Tensor  # [B, L] their tokens, -1 after the path's end
    num_accepted: torch.Tensor  # [B]
    next_tokens: torch.Tensor  # [B] the correction or bonus token that follows the accepted path


def candidates_at(paths: torch.Tensor, node: int, depth: int, distinct: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate nodes at `depth` (0-based column of `paths`) below `node`, and the path index of each (for uniforms)."""
    alive = paths[:, depth] >= 0
    if depth > 0:
        alive &= paths[:, depth - 1] == node
    path_index = alive.nonzero().squeeze(-1)
    nodes = paths[path_index, depth]
    if distinct and len(nodes) > 1:
        unique, inverse = torch.unique(nodes, sorted=True, return_inverse=True)
        first = torch.full((len(unique),), len(nodes), dtype=torch.long).scatter_reduce_(
            0, inverse, torch.arange(len(nodes)), reduce="amin"
        )
        nodes, path_index = unique, path_index[first]
    return nodes, path_index


def verify_row(
    rule: str,
    paths: torch.Tensor,
    node_tokens: torch.Tensor,
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor | None,
    accept_uniforms: torch.Tensor,
    sample_uniform: torch.Tensor,
) -> tuple[list[int], int]:
    """Walk one tree from the root; return the accepted node indices and the next token."""
    decide = NODE_RULES[rule]
    node, accepted = 0, []
    for depth in range(paths.shape[1]):
        candidates, path_index = candidates_at(paths, node, depth, distinct=rule != "spectr")
        if len(candidates) == 0:
            break
        decision = decide(target_probs[node], None if draft_probs is None else draft_probs[node], node_tokens[candidates])
        hits = (accept_uniforms[path_index, depth].double() < decision.accept_probs).nonzero()
        if len(hits) == 0:
            return accepted, int(sample_with_uniform(decision.residual, sample_uniform))
        node = int(candidates[hits[0, 0]])
        accepted.append(node)
    # a leaf (or the end of the drafted depth): the bonus token comes from p itself
    if rule == "greedy":
        return accepted, int(target_probs[node].argmax())
    return accepted, int(sample_with_uniform(target_probs[node], sample_uniform))


@dataclass
class SparseProbs:
    """Per-node probabilities given on a few entries of the vocabulary, zero on all others: `values` [B, N+1, C] at
    `token_ids` [B, N+1, C] (distinct within a node; entries of value 0 may fill). What the loop hands a verifier when
    a top-k warper or a reduced-vocabulary draft bounds a distribution's support: C entries instead of V."""

    values: torch.Tensor
    token_ids: torch.Tensor
    vocab_size: int

    def dense(self) -> torch.Tensor:
        """[B, N+1, V]: the values at their tokens, zeros elsewhere."""
        out = self.values.new_zeros(*self.values.shape[:-1], self.vocab_size)
        return out.scatter_(-1, self.token_ids, self.values)

    def nodes(self, end: int) -> SparseProbs:
        """Nodes 0 .. end - 1."""
        return SparseProbs(self.values[:, :end], self.token_ids[:, :end], self.vocab_size)


def _dense_probs(probs: torch.Tensor | SparseProbs | None) -> torch.Tensor | None:
    return probs.dense() if isinstance(probs, SparseProbs) else probs


@dataclass
class VerifyInputs:
    """One step's verification problem, batched over rows. Shapes: paths [B, P, L] (node indices, -1 padded),
    node_tokens [B, N+1], target_probs [B, N+1, V] (for "greedy" any scores with the target's argmax), draft_probs
    [B, N+1, V] or None for "greedy", accept_uniforms [B, P, L], sample_uniforms [B]. The sampling rules' target_probs
    and draft_probs may also come as `SparseProbs`: a verifier that works on the vocabulary reads `dense()` of the
    inputs."""

    rule: str
    paths: torch.Tensor
    node_tokens: torch.Tensor
    target_probs: torch.Tensor | SparseProbs
    draft_probs: torch.Tensor | SparseProbs | None
    accept_uniforms: torch.Tensor
    sample_uniforms: torch.Tensor
    # the most children any node can have, known from the tree's shape (the drafter's widest branching): RRS's
    # sequential candidate tests at a node need no more steps; None: as many as paths
    max_children: int | None = None

    def check(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"unknown verification rule {self.rule!r}; expected one of {RULES}")
        if self.draft_probs is None and self.rule != "greedy" and self.paths.shape[1] > 0:
            raise ValueError(f"rule {self.rule!r} needs draft_probs")
        if self.rule == "greedy" and isinstance(self.target_probs, SparseProbs):
            raise ValueError("the greedy rule reads the target's argmax over the vocabulary: give dense target_probs")

    @property
    def is_sparse(self) -> bool:
        return isinstance(self.target_probs, SparseProbs) or isinstance(self.draft_probs, SparseProbs)

    def dense(self) -> VerifyInputs:
        """The same problem with dense [B, N+1, V] distributions."""
        if not self.is_sparse:
            return self
        return VerifyInputs(self.rule, self.paths, self.node_tokens, _dense_probs(self.target_probs),
                            _dense_probs(self.draft_probs), self.accept_uniforms, self.sample_uniforms,
                            self.max_children)


class Verifier(Protocol):
    """The verifier interface: this reference, the batched device path, the Triton kernel, the ONNX Runtime op and
    the TensorRT verify engine all implement it and return the same tokens for the same inputs."""

    def __call__(self, inputs: VerifyInputs) -> VerifyResult: ...


def tokens_at(node_tokens: torch.Tensor, accepted_nodes: torch.Tensor) -> torch.Tensor:
    """[B, L]: the token of each accepted node (`node_tokens` [B, N+1] at `accepted_nodes` [B, L]), -1 where none."""
    return torch.where(accepted_nodes >= 0, node_tokens.gather(1, accepted_nodes.clamp(min=0)), -1)


def verify_tree(inputs: VerifyInputs) -> VerifyResult:
    """The reference: rows are independent and walked one by one on the host."""
    inputs.check()
    inputs = inputs.dense()
    batch, depth = inputs.paths.shape[0], inputs.paths.shape[2]
    accepted_nodes = torch.full((batch, depth), -1, dtype=torch.long)
    num_accepted = torch.zeros(batch, dtype=torch.long)
    next_tokens = torch.zeros(batch, dtype=torch.long)
    paths, node_tokens = inputs.paths.cpu(), inputs.node_tokens.cpu()
    target_probs = inputs.target_probs.cpu()
    draft_probs = None if inputs.draft_probs is None else inputs.draft_probs.cpu()
    accept_uniforms, sample_uniforms = inputs.accept_uniforms.cpu(), inputs.sample_uniforms.cpu()
    for b in range(batch):
        path, token = verify_row(
            inputs.rule,
            paths[b],
            node_tokens[b],
            target_probs[b],
            None if draft_probs is None else draft_probs[b],
            accept_uniforms[b],
            sample_uniforms[b],
        )
        accepted_nodes[b, : len(path)] = torch.tensor(path, dtype=torch.long)
        num_accepted[b] = len(path)
        next_tokens[b] = token
    accepted_tokens = tokens_at(node_tokens, accepted_nodes)
    device = inputs.node_tokens.device
    return VerifyResult(accepted_nodes.to(device), accepted_tokens.to(device), num_accepted.to(device), next_tokens.to(device))

"""Tree verification on the inputs' device, every row at once: `verify_tree` without host round trips.

Same arguments, result type and semantics as `hf_specdec.verification.verify_tree` (tree encoding, candidate order,
float64 numerics: see that module's docstring); it also takes the arguments as one object (`verifier(inputs)`). The
result is on the inputs' device. The reference walks rows, depths and candidates in Python on the host;
here all rows walk their trees together in batched tensor steps, and nothing is read back to the host (no `.item()`,
`.tolist()`, `nonzero()`, `torch.unique`, boolean-mask indexing or data-dependent Python branches), so on CUDA the
whole call is queued without a sync. The only Python loops have static bounds taken from the shapes:

    - "spectr" and "greedy": one step per depth (`paths.shape[2]`). Each row's candidates below its current node
      ([B, P] table: SpecTr one per path in path order, duplicates included), the rule's decision at each row's
      current node for all rows at once (SpecTr: rho* by the 40-step bisection on [B] tensors, accept probabilities
      p / (rho q); greedy: argmax match), then the first candidate whose uniform is below its accept probability.
    - "rrs": recursive rejection is sequential over the candidates of a node, so its steps are candidate tests: at
      each step every walking row tests its next candidate (RRS and greedy order: the distinct nodes in increasing
      node index, each with the uniform of its first path), then either descends (Theta, q <- p, q of the accepted
      node) or updates Theta_k, q_k. A walk tests at most L + P candidates (at most L accepted; the rejected ones root
      disjoint subtrees, each holding the end of a path) and at most N (each node is a candidate of its one parent
      only), so min(N, L + P) steps (N = `node_tokens.shape[1] - 1`) cover every walk, instead of L x P steps of a
      depth loop with a candidate loop inside. The candidates of every node come from one table computed up front
      ([B, N+1, P]); this reads `paths` as a tree (a node lies on one depth, below one parent), as the drafters build.
      On chains (P = 1: SD) every node has one candidate, tested against p and q themselves, so the walk is gathers
      and the one vocabulary-wide step is the residual where the row stops (`_walk_chain`).

A row stops at a leaf or at the last depth (the bonus token is drawn from p there; greedy: its argmax) or when every
candidate at its node is rejected (the next token is drawn from the rule's residual at that node). Every elementwise
formula is the reference's, in the same order and in float64, so equal uniforms give equal tokens; vocabulary sums
run per row (the summation order of the backend's row reduction). Vocabulary-sized work runs in preallocated [B, V]
buffers (on CPU, allocating them per operation costs more than the arithmetic).

The compact path (`verify_tree_batched(compact=...)`, by default for the sampling rules on CPU tensors): after the
logits processors (top-k, top-p, min-p) p and q are zero but on a few dozen tokens per node, and the work above is
per vocabulary entry. `compact_vocabulary` keeps, per node, the union of the supports of p and q (a bound on its size
per node first, the nonzeros of p and q, whose largest, K, is the one number read back to the host: a support wider
than half the vocabulary, as sampling without top-k leaves, is not compacted and costs just that count; then work
proportional to the supports); on those few entries a step costs its number of tensor operations, so
`_verify_everywhere` takes every node's decisions at once (RRS: Theta_k, q_k of every node, one step per candidate
of the node with the most; SpecTr: one bisection for every node) and then walks one step per depth. Same formulas,
same tokens (sums run over the support only: another summation order).

Sparse inputs (`SparseProbs`): where a top-k warper bounds the supports, the loop hands p and q over as values at
token ids, C entries per node, and says thereby where they are nonzero: `union_vocabulary` sorts each node's p and q
entries into one compact vocabulary of static width (nothing searched, nothing read back), then the same
`_verify_everywhere`. Dense p with sparse q (sampling without top-k, a reduced-vocabulary draft) is verified on q's
entries and p's lumped rest (`lumped_vocabulary`, `_verify_lumped`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hf_specdec.verification import (
    SPECTR_BISECTION_STEPS, SparseProbs, VerifyInputs, VerifyResult, sample_with_uniform, tokens_at,
)

_NO_NODE = torch.iinfo(torch.long).max  # sort key of "no candidate" (after every node index)


class _Rows:
    """Row access to a [B, N+1, V] tensor of per-node distributions: the rows of one node per batch row, in float64."""

    def __init__(self, probs: torch.Tensor):
        self.batch, self.slots, self.vocab = probs.shape
        self.probs = probs
        self.rows = torch.arange(self.batch, device=probs.device)
        # a slice of a larger buffer (the loop's tree.draft_probs[:, :size]) is read in place, not copied
        self.flat = probs.view(-1, self.vocab) if probs.is_contiguous() else None
        self.native = torch.empty(self.batch, self.vocab, dtype=probs.dtype, device=probs.device)

    def load(self, node: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out[b] = probs[b, node[b]] as float64 (an exact conversion, as the reference's `.double()`)."""
        if self.flat is None:
            return out.copy_(self.probs[self.rows, node])
        if self.flat.dtype == out.dtype:
            return torch.index_select(self.flat, 0, self.rows * self.slots + node, out=out)
        return out.copy_(torch.index_select(self.flat, 0, self.rows * self.slots + node, out=self.native))


def _candidates(paths: torch.Tensor, uniforms: torch.Tensor, node_tokens: torch.Tensor, node: torch.Tensor,
                active: torch.Tensor, depth: int, distinct: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`candidates_at` for every row: the candidates at column `depth` of `paths` below `node[b]` (none where not
    `active`). Returns nodes [B, P] (0 where invalid), valid [B, P], their tokens [B, P] (0 where invalid) and accept
    uniforms [B, P], in verification order (with `distinct`: valid ones first, in increasing node index)."""
    column = paths[:, :, depth]
    on = (column >= 0) & active[:, None]
    if depth > 0:
        on &= paths[:, :, depth - 1] == node[:, None]
    column_uniforms = uniforms[:, :, depth]
    if distinct:
        column, on, column_uniforms = _distinct(column, on, column_uniforms)
    nodes = torch.where(on, column, 0)
    return nodes, on, torch.where(on, node_tokens.gather(1, nodes), 0), column_uniforms


def _distinct(nodes: torch.Tensor, on: torch.Tensor, uniforms: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The distinct nodes among `nodes` [..., P] where `on`, in increasing node index (then the invalid ones), each
    with the uniform of its first path; returns nodes, valid, uniforms."""
    num_paths = nodes.shape[-1]
    earlier = torch.ones(num_paths, num_paths, dtype=torch.bool, device=nodes.device).tril_(-1)  # [k, j]: j < k
    repeated = ((nodes[..., :, None] == nodes[..., None, :]) & on[..., None, :] & earlier).any(-1)
    keys, order = torch.sort(torch.where(on & ~repeated, nodes, _NO_NODE), dim=-1, stable=True)
    return keys, keys != _NO_NODE, uniforms.gather(-1, order)


def _first_hit(hits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Whether a row has a True in `hits` [B, K], and the column of its first one (0 if none)."""
    lanes = torch.arange(hits.shape[1], device=hits.device)
    first = torch.where(hits, lanes, hits.shape[1]).amin(-1)
    return hits.any(-1), first.clamp_(max=hits.shape[1] - 1)


def _path_children(paths: torch.Tensor, uniforms: torch.Tensor, num_slots: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every node u = 0..N and path k at once: the entry after u on path k (u's child on it; the root's: the
    first column), whether there is one, and the uniform path k has there. Returns nodes (0 where invalid), valid
    and uniforms, [B, N+1, P] each, in path order (SpecTr's candidates: one per path, duplicates included)."""
    batch, num_paths, depth = paths.shape
    above = torch.cat([paths.new_zeros(batch, num_paths, 1), paths[:, :, :-1]], dim=2)  # the root above column 0
    slots = torch.arange(num_slots, device=paths.device)[None, :, None, None]
    match = (paths >= 0)[:, None] & (above[:, None] == slots)  # [B, N+1, P, L]: path k's entry at column d is below u
    column = match.to(torch.int8).argmax(-1, keepdim=True)  # a node lies once on a path: its child's column
    child = paths[:, None].expand(-1, num_slots, -1, -1).gather(3, column).squeeze(3)
    child_uniforms = uniforms[:, None].expand(-1, num_slots, -1, -1).gather(3, column).squeeze(3)
    valid = match.any(-1)
    return torch.where(valid, child, 0), valid, child_uniforms


def _child_tables(paths: torch.Tensor, uniforms: torch.Tensor, node_tokens: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The RRS candidates of every node u = 0..N of every row at once: u's children on the paths (the entry after u
    on a path; the root's: the first column), distinct, in increasing node index, each with the uniform of the first
    path holding it. Returns nodes, tokens, uniforms [B, N+1, P] (the valid ones first) and counts [B, N+1]."""
    child, valid, child_uniforms = _distinct(*_path_children(paths, uniforms, node_tokens.shape[1]))
    child = torch.where(valid, child, 0)
    return child, _tokens_of(node_tokens, child, valid), child_uniforms, valid.sum(-1)


def _tokens_of(node_tokens: torch.Tensor, nodes: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """node_tokens [B, N+1] at `nodes` [B, ...] (0 where not `valid`)."""
    return torch.where(valid, node_tokens.gather(1, nodes.flatten(1)).view_as(nodes), 0)


def _rejection_residual(theta: torch.Tensor, q: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Theta - q)+ into `out`, and its vocabulary sum: the residual after a rejection, before `norm` (which keeps
    Theta where the sum is 0)."""
    torch.sub(theta, q, out=out).clamp_(min=0.0)
    return out, out.sum(-1, keepdim=True)


def _walk_recursive_rejection(paths, node_tokens, target, draft, uniforms, with_divisors: bool = False):
    """RRS: candidate tests as steps (see the module docstring). Returns accepted_nodes [B, L], per row the
    distribution the next token is drawn from (the last Theta where the row rejected, else p at its last node) and,
    `with_divisors` (else None), the totals [B, P] that p at that node was divided by to make it, in turn (1 where it
    was not): four more small operations per step, for `_verify_lumped` only."""
    batch, num_paths, depth = paths.shape
    num_slots = node_tokens.shape[1]
    device = paths.device
    steps = min(num_slots - 1, depth + num_paths)  # see the module docstring
    *table, counts = _child_tables(paths, uniforms, node_tokens)
    table = [t.flatten(1) for t in table]  # [B, (N+1) * P]: candidate k of node u at u * P + k
    rows = torch.arange(batch, device=device)
    spare = torch.full_like(rows, batch)  # rows written to this index land in a scratch row
    node = torch.zeros(batch, dtype=torch.long, device=device)
    level = torch.zeros(batch, dtype=torch.long, device=device)  # depth of the current node
    k = torch.zeros(batch, dtype=torch.long, device=device)  # index of the candidate to test at it
    count = counts[:, 0]
    walking = count > 0
    accepted_nodes = torch.full((batch, depth + 1), -1, dtype=torch.long, device=device)  # + a column never read
    # Theta and q of every row (and a scratch row): rows are replaced with index_copy_, no host-side masks
    theta_rows = torch.empty(batch + 1, target.vocab, dtype=torch.float64, device=device)
    q_rows = torch.empty_like(theta_rows)
    theta, qk = theta_rows[:batch], q_rows[:batch]
    target.load(node, theta)
    draft.load(node, qk)
    rest, fresh = torch.empty_like(theta), torch.empty_like(theta)
    divisors = torch.ones(batch, num_paths, dtype=torch.float64, device=device) if with_divisors else None
    for _ in range(steps):
        index = (node * num_paths + k.clamp(max=num_paths - 1))[:, None]
        candidate, token, uniform = (t.gather(1, index) for t in table)
        q_token, theta_token = qk.gather(1, token), theta.gather(1, token)
        accept = torch.where(q_token > 0, (theta_token / q_token).clamp(max=1.0), 0.0)
        hit = walking & (uniform.double() < accept).squeeze(1)
        miss = walking & ~hit
        # rejected: Theta_{k+1} = norm((Theta_k - q_k)+) (kept where that sums to 0), q_{k+1} = norm(q_k without X_k)
        rest, rest_total = _rejection_residual(theta, qk, rest)
        update = miss & (rest_total > 0).squeeze(1)
        theta_rows.index_copy_(0, torch.where(update, rows, spare), rest.div_(rest_total))
        if with_divisors:
            slot = k.clamp(max=num_paths - 1)[:, None]  # the k-th rejection at this node
            divisors.scatter_(1, slot, torch.where(update[:, None], rest_total, divisors.gather(1, slot)))
        qk.scatter_(1, token, 0.0)  # rows that did not reject reload q below (or are done with it)
        q_total = qk.sum(-1, keepdim=True)
        qk.div_(torch.where(q_total > 0, q_total, 1.0))  # x / 1 == x: norm's fallback
        k += miss
        walking &= ~(miss & (k >= count))
        # accepted: descend into the candidate; Theta, q = p, q at it
        candidate = candidate.squeeze(1)
        slot = level[:, None]
        accepted_nodes.scatter_(1, slot, torch.where(hit[:, None], candidate[:, None], accepted_nodes.gather(1, slot)))
        node = torch.where(hit, candidate, node)
        level += hit
        k = torch.where(hit, 0, k)
        count = counts.gather(1, node[:, None]).squeeze(1)
        walking = torch.where(hit, count > 0, walking)
        reset = torch.where(hit, rows, spare)
        theta_rows.index_copy_(0, reset, target.load(node, fresh))
        q_rows.index_copy_(0, reset, draft.load(node, fresh))
        if with_divisors:
            divisors.masked_fill_(hit[:, None], 1.0)
    return accepted_nodes[:, :depth], theta, divisors


def _walk_chain(paths, node_tokens, target, draft, uniforms):
    """RRS on chains (one path per row: every node has at most one candidate, as SD drafts): a node's only candidate
    is tested against Theta_1 = p and q_1 = q there, so every depth's accept probability min(1, p(x) / q(x)) is two
    gathers, the walk is the first failed test, and only the node where a row stops needs vocabulary-wide work: the
    residual norm((p - q)+) where the row rejected its candidate (p where that sums to 0), else p (a leaf: the bonus
    token). The walk above would update Theta and q over the vocabulary at every depth. Returns what it returns."""
    batch, _, depth = paths.shape
    chain = paths[:, 0]  # [B, L]: the node at each depth, -1 past the row's chain
    on_chain = chain >= 0
    nodes = chain.clamp(min=0)
    parents = torch.cat([torch.zeros_like(nodes[:, :1]), nodes[:, :-1]], dim=1)  # where each candidate is tested
    tokens = node_tokens.gather(1, nodes)
    rows = torch.arange(batch, device=paths.device)[:, None]
    p_token, q_token = target.probs[rows, parents, tokens].double(), draft.probs[rows, parents, tokens].double()
    accept = torch.where(q_token > 0, (p_token / q_token).clamp(max=1.0), 0.0)
    passed = (on_chain & (uniforms[:, 0].double() < accept)).long().cumprod(dim=1).bool()  # accepted through each depth
    num_accepted = passed.sum(-1)
    accepted_nodes = torch.where(passed, chain, -1)
    last = torch.where(num_accepted > 0, nodes.gather(1, (num_accepted - 1).clamp(min=0)[:, None]).squeeze(1), 0)
    rejected = num_accepted < on_chain.sum(-1)  # stopped at a candidate it tested
    theta = target.load(last, torch.empty(batch, target.vocab, dtype=torch.float64, device=paths.device))
    q = draft.load(last, torch.empty_like(theta))
    rest, rest_total = _rejection_residual(theta, q, q)
    use_residual = rejected[:, None] & (rest_total > 0)
    return accepted_nodes, torch.where(use_residual, rest.div_(rest_total), theta)


def _integer_power(base: torch.Tensor, exponent: torch.Tensor, max_exponent: int) -> torch.Tensor:
    """base ** exponent per row as repeated products (`integer_power`); factors past the exponent are 1 (exact)."""
    factors = torch.where(torch.arange(max_exponent, device=base.device) < exponent[..., None], base[..., None], 1.0)
    result = torch.ones_like(base)
    for step in range(max_exponent):
        result.mul_(factors[..., step])
    return result


def _spectr_rho(p: torch.Tensor, q: torch.Tensor, draws: torch.Tensor, max_draws: int, scratch: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """`spectr_rho` for every row (p, q [..., V] float64, K = draws [...]): rho* and beta(rho*)."""

    def beta(rho: torch.Tensor) -> torch.Tensor:
        torch.div(p, rho[..., None], out=scratch)
        return torch.minimum(q, scratch, out=scratch).sum(-1)

    def feasible(rho: torch.Tensor) -> torch.Tensor:
        b = beta(rho)
        return 1.0 - _integer_power(1.0 - b, draws, max_draws) <= rho * b + 1e-12

    low = torch.ones(draws.shape, dtype=torch.float64, device=p.device)
    high = draws.double()
    feasible_at_one = feasible(low)  # the reference returns rho = 1 without bisecting
    for _ in range(SPECTR_BISECTION_STEPS):
        middle = 0.5 * (low + high)
        ok = feasible(middle)
        high = torch.where(ok, middle, high)
        low = torch.where(ok, low, middle)
    rho = torch.where(feasible_at_one, 1.0, high)
    return rho, beta(rho)


def _walk_spectr(paths, node_tokens, target, draft, uniforms):
    """SpecTr K-SEQ, one step per depth: rho* at every row's node by bisection, each draw accepted w.p.
    min(1, p / (rho* q)) in path order. Returns accepted_nodes [B, L], the next token's distribution per row (the
    K-SEQ residual where every draw was rejected, else p at the last node) and the total [B, 1] that p at that node
    was divided by to make it (1 where it was not)."""
    batch, num_paths, depth = paths.shape
    device = paths.device
    node = torch.zeros(batch, dtype=torch.long, device=device)
    walking = torch.ones(batch, dtype=torch.bool, device=device)
    rejected = torch.zeros(batch, dtype=torch.bool, device=device)
    accepted_nodes = torch.full((batch, depth), -1, dtype=torch.long, device=device)
    p = torch.empty(batch, target.vocab, dtype=torch.float64, device=device)
    q, scratch = torch.empty_like(p), torch.empty_like(p)
    # K-SEQ's rho, beta and K at the node where a row rejected every draw (for its residual)
    rho_rejected = torch.ones(batch, dtype=torch.float64, device=device)
    beta_rejected = torch.zeros(batch, dtype=torch.float64, device=device)
    draws_rejected = torch.zeros(batch, dtype=torch.long, device=device)
    for column in range(depth):
        nodes, valid, tokens, cand_uniforms = _candidates(paths, uniforms, node_tokens, node, walking, column, False)
        target.load(node, p)
        draft.load(node, q)
        draws = valid.sum(-1)
        rho, beta = _spectr_rho(p, q, draws, num_paths, scratch)
        q_token, p_token = q.gather(1, tokens), p.gather(1, tokens)
        ratio = torch.where(q_token > 0, p_token / (rho[:, None] * q_token).clamp(min=1e-300), 0.0)
        accepted, first = _first_hit(valid & (cand_uniforms.double() < ratio.clamp(max=1.0)))
        rejecting = valid.any(-1) & ~accepted
        chosen = nodes.gather(1, first[:, None]).squeeze(1)
        accepted_nodes[:, column] = torch.where(accepted, chosen, -1)
        node = torch.where(accepted, chosen, node)
        rho_rejected = torch.where(rejecting, rho, rho_rejected)
        beta_rejected = torch.where(rejecting, beta, beta_rejected)
        draws_rejected = torch.where(rejecting, draws, draws_rejected)
        rejected |= rejecting
        walking = accepted
    # the residual norm((p - min(q, p / rho) * (1 - (1 - beta)^K) / beta)+) where a row rejected (p where beta <= 0
    # or that sums to 0), else p at the last node (the bonus token)
    target.load(node, p)
    draft.load(node, q)
    scale = (1.0 - _integer_power(1.0 - beta_rejected, draws_rejected, num_paths)) / beta_rejected
    torch.div(p, rho_rejected[:, None], out=scratch)
    torch.minimum(q, scratch, out=scratch).mul_(scale[:, None])
    rest = torch.sub(p, scratch, out=scratch).clamp_(min=0.0)
    rest_total = rest.sum(-1, keepdim=True)
    use_residual = (rejected & (beta_rejected > 0))[:, None] & (rest_total > 0)
    divisors = torch.where(use_residual, rest_total, 1.0)
    return accepted_nodes, torch.where(use_residual, rest.div_(rest_total), p, out=p), divisors


def _walk_greedy(paths, node_tokens, target_probs, uniforms):
    """Greedy, one step per depth: the first candidate (node order) whose token is the target's argmax. Returns
    accepted_nodes [B, L], whether a row stopped on a mismatch, and the argmax at each row's last node."""
    batch, num_paths, depth = paths.shape
    device = paths.device
    rows = torch.arange(batch, device=device)
    node = torch.zeros(batch, dtype=torch.long, device=device)
    walking = torch.ones(batch, dtype=torch.bool, device=device)
    rejected = torch.zeros(batch, dtype=torch.bool, device=device)
    accepted_nodes = torch.full((batch, depth), -1, dtype=torch.long, device=device)
    for column in range(depth):
        nodes, valid, tokens, cand_uniforms = _candidates(paths, uniforms, node_tokens, node, walking, column, True)
        best = target_probs[rows, node].argmax(-1)
        accept = (tokens == best[:, None]).double()
        accepted, first = _first_hit(valid & (cand_uniforms.double() < accept))
        rejecting = valid.any(-1) & ~accepted
        chosen = nodes.gather(1, first[:, None]).squeeze(1)
        accepted_nodes[:, column] = torch.where(accepted, chosen, -1)
        node = torch.where(accepted, chosen, node)
        rejected |= rejecting
        walking = accepted
    return accepted_nodes, rejected, target_probs[rows, node].argmax(-1)


def _tree_parents(paths: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each node's parent (the entry before it on a path, the root for the first column; 0 for nodes on no path) and
    whether it has children, [B, N+1] each, from `paths` [B, P, L] read as a tree."""
    batch = paths.shape[0]
    above = torch.cat([paths.new_zeros(batch, paths.shape[1], 1), paths[:, :, :-1]], dim=2).flatten(1)
    valid = (paths >= 0).flatten(1)
    nodes = torch.where(valid, paths.flatten(1), num_slots)  # invalid entries land in a scratch column
    parents = paths.new_zeros(batch, num_slots + 1).scatter_(1, nodes, above)[:, :num_slots]
    has_children = torch.zeros(batch, num_slots + 1, dtype=torch.bool, device=paths.device)
    has_children.scatter_(1, torch.where(valid, above, num_slots), True)
    return parents, has_children[:, :num_slots]


_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}
_BLOCK = 64  # tokens per block of the support search


def _positive_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """[B, N+1, V / _BLOCK, _BLOCK] -> [B, N+1, V / _BLOCK]: whether each block holds an entry > 0. One pass that
    writes nothing vocabulary-sized: the largest entry of each block, compared as an integer (the bits of an IEEE
    float > 0, a positive NaN included, are the integers > 0)."""
    if blocks.dtype.is_floating_point and blocks.element_size() in _BITS:
        return blocks.view(_BITS[blocks.element_size()]).amax(-1) > 0
    return (blocks > 0).any(-1)


def _positive_entries(p: torch.Tensor | None, q: torch.Tensor | None, has_children: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(b, node, token) [M] where p > 0, or q > 0 at a node with children, in increasing (b, node, token) order,
    for [B, N+1, W] distributions with W a multiple of _BLOCK (p None: q's entries only)."""
    batch, slots, width = (p if p is not None else q).shape
    blocks = torch.zeros(batch, slots, width // _BLOCK, dtype=torch.bool, device=has_children.device)
    if p is not None:
        p = p.unflatten(-1, (width // _BLOCK, _BLOCK))
        blocks |= _positive_blocks(p)
    if q is not None:
        q = q.unflatten(-1, (width // _BLOCK, _BLOCK))
        blocks |= _positive_blocks(q) & has_children[..., None]
    b, u, block = torch.nonzero(blocks, as_tuple=True)
    flat = (b * slots + u) * blocks.shape[-1] + block

    def gather(probs: torch.Tensor) -> torch.Tensor:  # [M', _BLOCK]: the blocks found, copied whole
        if probs.is_contiguous():
            return probs.view(-1, _BLOCK).index_select(0, flat)
        return probs[b, u, block]

    entry = gather(p) > 0 if p is not None else torch.zeros(len(flat), _BLOCK, dtype=torch.bool, device=flat.device)
    if q is not None:
        entry |= (gather(q) > 0) & has_children[b, u, None]
    pair, offset = torch.nonzero(entry, as_tuple=True)
    return b[pair], u[pair], block[pair] * _BLOCK + offset


def _support_entries(p: torch.Tensor | None, q: torch.Tensor | None, has_children: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, tokens) [M]: the tokens where p > 0, or q > 0 at a node with children (q elsewhere is never read:
    garbage there, as the loop leaves it, must not widen the support), row = b * (N+1) + node, in increasing row,
    then token order (p None: q's alone). First the blocks of _BLOCK tokens that hold one, then the tokens in those
    blocks: beyond one read of p and q, the work is proportional to the support, not to the vocabulary."""
    slots, vocab = has_children.shape[1], (p if p is not None else q).shape[2]
    whole = vocab - vocab % _BLOCK
    b, u, tokens = _positive_entries(None if p is None else p[..., :whole], None if q is None else q[..., :whole],
                                     has_children)
    rows = b * slots + u
    if whole < vocab:  # the last tokens, fewer than a block: entry by entry, then merged in (a stable sort by row)
        tail = torch.zeros(has_children.shape + (vocab - whole,), dtype=torch.bool, device=has_children.device)
        if p is not None:
            tail |= p[..., whole:] > 0
        if q is not None:
            tail |= (q[..., whole:] > 0) & has_children[..., None]
        tail_b, tail_u, tail_tokens = torch.nonzero(tail, as_tuple=True)
        rows = torch.cat([rows, tail_b * slots + tail_u])
        tokens = torch.cat([tokens, tail_tokens + whole])
        rows, order = torch.sort(rows, stable=True)
        tokens = tokens[order]
    return rows, tokens


def _positive_count(probs: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [...] float: at least the number of entries > 0 of probabilities in [0, 1], as the float sum of
    their ceilings (each 1 where > 0, 0 where 0; exact in float32 to 2^24 entries). `count_nonzero` converts a
    vocabulary-sized bool tensor to int64 first: 7x slower on a CPU. A NaN makes the sum NaN (the caller widens it)."""
    return probs.ceil().sum(-1, dtype=torch.float32)


def _support_bounds(p: torch.Tensor, q: torch.Tensor | None, has_children: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, N+1] each: at least as many as the entries `_support_entries` finds at each node (p > 0, or q > 0 where it
    has children): the positive entries of p plus those of q where the node has children (q elsewhere may be
    garbage); and at least as many as q's alone there (0 without q)."""
    vocab = p.shape[-1]
    draft_counts = torch.zeros_like(has_children, dtype=torch.float32) if q is None else \
        torch.where(has_children, _positive_count(q), 0)
    counts = _positive_count(p) + draft_counts
    return tuple(c.nan_to_num_(nan=vocab).clamp_(max=vocab).long() for c in (counts, draft_counts))


class _TreeTables:
    """The tree's side of verifying every node at once: each node's parent, whether it has children, and the
    candidate table of every node (`_path_children`, distinct for RRS), with `steps` a bound on any node's number of
    candidates (the number of paths, or the inputs' `max_children` for RRS: nothing read back)."""

    def __init__(self, inputs: VerifyInputs, paths: torch.Tensor, slots: int):
        self.paths = paths  # long, on the distributions' device
        self.parents, self.has_children = _tree_parents(paths, slots)
        table = _path_children(paths, inputs.accept_uniforms.to(paths.device), slots)
        if inputs.rule != "spectr":
            table = _distinct(*table)
            table = (torch.where(table[1], table[0], 0), *table[1:])
        self.children, self.valid, self.uniforms = table
        bound = inputs.max_children if inputs.rule != "spectr" else None  # SpecTr's candidates are draws
        self.steps = paths.shape[1] if bound is None else min(bound, paths.shape[1])


class _Support(_TreeTables):
    """What compacting a dense verification problem needs, from one read back: `width` = a bound on the largest
    support of any (row, node) + 1 (the compact vocabulary, a zero slot included; `_support_bounds`), `draft_width`
    the same for q's support alone at nodes with children + 1 (the lumped compact vocabulary, the lump included), the
    tree's tables with `steps` the most candidates any node has. `entries()` then lists the support itself (work
    proportional to it): only when the problem is compacted, not when its support turns out too wide."""

    def __init__(self, inputs: VerifyInputs, paths: torch.Tensor):
        batch, slots, _ = inputs.target_probs.shape
        super().__init__(inputs, paths, slots)
        self.target_probs = inputs.target_probs
        self.draft_probs = None if inputs.draft_probs is None else inputs.draft_probs.to(paths.device)
        self.slots = batch * slots
        largest, draft_largest, self.steps = 0, 0, 0
        if batch * slots > 0:
            bounds, draft_bounds = _support_bounds(self.target_probs, self.draft_probs, self.has_children)
            # data-dependent sizes: on the host (CPU tensors) this costs no device round trip
            largest, draft_largest, self.steps = torch.stack(
                [bounds.max(), draft_bounds.max(), self.valid.sum(-1).max()]).tolist()  # the read
        self.width, self.draft_width = largest + 1, draft_largest + 1

    def entries(self, lumped: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, tokens) [M] of the support (row = b * (N+1) + node, in increasing row, then token order; `lumped`:
        q's alone) and `starts` [B * (N+1)], the first entry of each row."""
        rows, tokens = _support_entries(None if lumped else self.target_probs, self.draft_probs, self.has_children)
        return rows, tokens, torch.searchsorted(rows, torch.arange(self.slots, device=rows.device))


def compact_vocabulary(inputs: VerifyInputs, support: _Support | None = None, lumped: bool = False
                       ) -> tuple[VerifyInputs, torch.Tensor]:
    """The same verification problem on the union of the supports of p and q only: (inputs over V' = K + 1 entries,
    token_ids [B, N+1, V']), where K is the largest support of any (row, node) (read back to the host once).

    Entry j of node u's compact distributions is token `token_ids[b, u, j]`: u's support (p > 0, or q > 0 where u
    has children) in increasing token order, then slots of token V - 1 with p = q = 0 (at least one). Every node's
    token becomes its index in its parent's support (a token outside it: a zero slot, where p = q = 0 as at that
    token). The verifier's decisions are unchanged: every elementwise formula maps zeros to zeros, a vocabulary sum
    only loses zero terms, and the inverse-CDF draw over the compact distribution meets the same partial sums at the
    same tokens (the last slot, token V - 1, is also where a draw that finds no step lands, as the clamp to V - 1
    does). Only the summation order of the sums differs, which the numerics allow (`hf_specdec.verification`). The
    next token of a result on these inputs is `token_ids[b, node, next_tokens[b]]` at the node it is drawn at (the
    last accepted node, else the root): `expand_result`.

    `lumped`: the entries are q's support alone (where u has children) and the last slot, the lump, holds p's mass
    outside it (q = 0 there): where q = 0 every formula of the rules is p, or p scaled (RRS: (Theta - 0)+ = Theta,
    then a division by a vocabulary sum; SpecTr: p - scale * min(0, p / rho) = p), so each decision and each residual
    on the support comes out as on the vocabulary, and the residual outside it is p divided by the same totals
    (`_verify_lumped` draws the next token from it on the whole vocabulary). Unused slots (zeros) and the lump have
    token id V, past the vocabulary; a node's token outside its parent's support becomes the lump (q = 0: never
    accepted)."""
    device = inputs.target_probs.device
    paths = inputs.paths.to(device=device, dtype=torch.long)
    support = support or _Support(inputs, paths)
    batch, slots, vocab = inputs.target_probs.shape
    width = support.draft_width if lumped else support.width
    rows, tokens, starts = support.entries(lumped)
    entry = rows * width + (torch.arange(len(rows), device=device) - starts[rows])
    token_ids = torch.full((batch * slots * width,), vocab if lumped else vocab - 1, dtype=torch.long, device=device)
    token_ids[entry] = tokens
    token_ids = token_ids.view(batch, slots, width)
    b, u = rows // slots, rows % slots

    def compact(probs: torch.Tensor | None) -> torch.Tensor | None:
        if probs is None:
            return None
        out = torch.zeros(batch * slots * width, dtype=torch.float64, device=device)
        out[entry] = probs.to(device)[b, u, tokens].double()
        return out.view(batch, slots, width)

    target_probs = compact(inputs.target_probs)
    if lumped:
        _lump(target_probs, inputs.target_probs.to(device))
    return _compacted(inputs, paths, support.parents, token_ids, target_probs, compact(inputs.draft_probs)), token_ids


def _lump(compact_target: torch.Tensor, target_probs: torch.Tensor) -> None:
    """p's mass outside the compact entries into their last slot (a sum of the rest, as a vocabulary sum would add
    it)."""
    outside = target_probs.sum(-1, dtype=torch.float64) - compact_target.sum(-1)
    compact_target[..., -1] = outside.clamp_(min=0.0)


def _compacted(inputs: VerifyInputs, paths: torch.Tensor, parents: torch.Tensor, token_ids: torch.Tensor,
               target_probs: torch.Tensor, draft_probs: torch.Tensor) -> VerifyInputs:
    """The problem on compact distributions whose entries at node u are the tokens `token_ids[b, u]` (increasing,
    the first of equal ones holding the mass): each node's token becomes its index in its parent's entries (not
    found: the last slot, where p = q = 0 or the lump, as at that token)."""
    device, width = token_ids.device, token_ids.shape[-1]
    node_tokens = inputs.node_tokens.to(device).long().contiguous()  # a slice of the tree's buffer: searchsorted warns
    parent_ids = token_ids.gather(1, parents[..., None].expand(-1, -1, width))
    index = torch.searchsorted(parent_ids, node_tokens[..., None]).clamp_(max=width - 1)
    found = parent_ids.gather(2, index) == node_tokens[..., None]
    compact_tokens = torch.where(found, index, width - 1).squeeze(2)
    return VerifyInputs(inputs.rule, paths, compact_tokens, target_probs, draft_probs,
                        inputs.accept_uniforms.to(device), inputs.sample_uniforms.to(device), inputs.max_children)


def union_vocabulary(inputs: VerifyInputs, tables: _TreeTables) -> tuple[VerifyInputs, torch.Tensor]:
    """`compact_vocabulary` for sparse p and q (`SparseProbs` both): node u's entries are the tokens of its p
    entries, then of its q entries, then token V - 1 with p = q = 0, sorted (stable) by token; a token in both keeps
    its mass in its first slot and leaves a zero slot. A static width (C_p + C_q + 1), so nothing is read back, and
    the same decisions and tokens as on the vocabulary, for the reasons `compact_vocabulary` gives (the last slot is
    token V - 1, where a draw that finds no step lands)."""
    p, q = inputs.target_probs, inputs.draft_probs
    device = p.values.device
    batch, slots, p_entries = p.values.shape
    q_values, q_ids = q.values[:, :slots].to(device), q.token_ids[:, :slots].to(device)
    last = torch.full((batch, slots, 1), p.vocab_size - 1, dtype=torch.long, device=device)
    token_ids, order = torch.sort(torch.cat([p.token_ids, q_ids, last], -1), dim=-1, stable=True)
    first = torch.searchsorted(token_ids, token_ids)  # the first slot of each entry's token

    def compact(values: torch.Tensor, start: int) -> torch.Tensor:  # `values` at entries start .. of the concatenation
        placed = torch.zeros(token_ids.shape, dtype=torch.float64, device=device)
        placed[..., start:start + values.shape[-1]] = values
        return torch.zeros_like(placed).scatter_add_(2, first, placed.gather(2, order))  # x + 0 == x

    compacted = _compacted(inputs, tables.paths, tables.parents, token_ids, compact(p.values, 0),
                           compact(q_values, p_entries))
    return compacted, token_ids


def lumped_vocabulary(inputs: VerifyInputs, tables: _TreeTables) -> tuple[VerifyInputs, torch.Tensor]:
    """`compact_vocabulary(lumped=True)` for dense p and sparse q (`SparseProbs`, e.g. a reduced-vocabulary draft's
    kept tokens): node u's entries are q's, sorted by token, then the lump (token V); q's entries are known, so
    nothing is searched or read back."""
    p, q = inputs.target_probs, inputs.draft_probs
    device = p.device
    batch, slots, vocab = p.shape
    token_ids, order = torch.sort(q.token_ids[:, :slots].to(device), dim=-1)
    lump = torch.full((batch, slots, 1), vocab, dtype=torch.long, device=device)
    target_probs = F.pad(p.gather(2, token_ids).double(), (0, 1))
    _lump(target_probs, p)
    draft_probs = F.pad(q.values[:, :slots].to(device).gather(2, order).double(), (0, 1))
    token_ids = torch.cat([token_ids, lump], -1)
    return _compacted(inputs, tables.paths, tables.parents, token_ids, target_probs, draft_probs), token_ids


def expand_result(result: VerifyResult, inputs: VerifyInputs, token_ids: torch.Tensor) -> VerifyResult:
    """A result on `compact_vocabulary(inputs)` as a result on `inputs`: the next token mapped back to its token id
    (through the compact vocabulary of the node it was drawn at), the accepted tokens read from `inputs`."""
    accepted_nodes, num_accepted = result.accepted_nodes, result.num_accepted
    node = _last_nodes(accepted_nodes, num_accepted)
    rows = torch.arange(len(node), device=node.device)
    next_tokens = token_ids[rows, node].gather(1, result.next_tokens[:, None]).squeeze(1)
    accepted_tokens = tokens_at(inputs.node_tokens.to(accepted_nodes.device), accepted_nodes)
    return VerifyResult(accepted_nodes, accepted_tokens, num_accepted, next_tokens)


def _last_nodes(accepted_nodes: torch.Tensor, num_accepted: torch.Tensor) -> torch.Tensor:
    """[B]: each row's last accepted node, else the root: where its next token is drawn."""
    last = accepted_nodes.gather(1, (num_accepted - 1).clamp(min=0)[:, None]).squeeze(1)
    return torch.where(num_accepted > 0, last, 0)


def _recursive_rejection_everywhere(p, q, tokens, valid, steps):
    """RRS's decisions at every node at once: accept probabilities [B, N+1, steps] of each node's candidates (given
    the earlier ones were rejected) and the residual [B, N+1, V] after all of them. Node u's Theta_k, q_k evolve as
    in the walk, candidate by candidate, for every node in one step (they depend on the candidates, not on the
    uniforms); a node past its last candidate keeps its Theta."""
    theta, qk = p.clone(), q.clone()
    rest = torch.empty_like(theta)
    accept = torch.zeros(valid.shape, dtype=torch.float64, device=p.device)
    for k in range(steps):
        token, active = tokens[:, :, k, None], valid[:, :, k, None]
        q_token, theta_token = qk.gather(2, token), theta.gather(2, token)
        accept[:, :, k, None] = torch.where(q_token > 0, (theta_token / q_token).clamp(max=1.0), 0.0)
        # rejected: Theta_{k+1} = norm((Theta_k - q_k)+) (kept where that sums to 0), q_{k+1} = norm(q_k without X_k)
        rest, rest_total = _rejection_residual(theta, qk, rest)
        theta = torch.where(active & (rest_total > 0), rest.div_(rest_total), theta)
        qk.scatter_(2, token, 0.0)  # a node past its candidates: q is not read any more
        q_total = qk.sum(-1, keepdim=True)
        qk.div_(torch.where(q_total > 0, q_total, 1.0))  # x / 1 == x: norm's fallback
    return accept, theta


def _spectr_everywhere(p, q, tokens, valid, num_paths):
    """SpecTr K-SEQ's decisions at every node at once: the accept probability [B, N+1, P] of each draw at its node
    and the node's residual [B, N+1, V] (p where beta <= 0 or the residual sums to 0)."""
    draws = valid.sum(-1)
    scratch = torch.empty_like(p)
    rho, beta = _spectr_rho(p, q, draws, num_paths, scratch)
    q_token, p_token = q.gather(2, tokens), p.gather(2, tokens)
    ratio = torch.where(q_token > 0, p_token / (rho[..., None] * q_token).clamp(min=1e-300), 0.0)
    scale = (1.0 - _integer_power(1.0 - beta, draws, num_paths)) / beta
    torch.div(p, rho[..., None], out=scratch)
    torch.minimum(q, scratch, out=scratch).mul_(scale[..., None])
    rest = torch.sub(p, scratch, out=scratch).clamp_(min=0.0)
    rest_total = rest.sum(-1, keepdim=True)
    use_residual = (beta > 0)[..., None] & (rest_total > 0)
    return ratio.clamp(max=1.0), torch.where(use_residual, rest.div_(rest_total), p)


def _walk_decided(children, valid, uniforms, accept, depth):
    """The walk once every node's decisions are known: at each depth, each row's first candidate (table order)
    whose uniform is below its accept probability. Returns accepted_nodes [B, L], the last node and whether the row
    stopped by rejecting every candidate there."""
    batch = children.shape[0]
    rows = torch.arange(batch, device=children.device)
    node = torch.zeros(batch, dtype=torch.long, device=children.device)
    walking = valid[:, 0].any(-1)
    rejected = torch.zeros_like(walking)
    accepted_nodes = torch.full((batch, depth), -1, dtype=torch.long, device=children.device)
    hits_at = valid & (uniforms.double() < accept)  # [B, N+1, P]: candidate k of node u passes its test
    for column in range(depth):
        hit, first = _first_hit(hits_at[rows, node])
        hit &= walking
        chosen = children[rows, node, first]
        rejected |= walking & ~hit
        accepted_nodes[:, column] = torch.where(hit, chosen, -1)
        node = torch.where(hit, chosen, node)
        walking = hit & valid[rows, node].any(-1)
    return accepted_nodes, node, rejected


def _verify_everywhere(inputs: VerifyInputs, support: _TreeTables) -> VerifyResult:
    """The sampling rules with every node's decision computed at once, then one step per depth: for small (compact)
    vocabularies, where a step's cost is its number of tensor operations. `support` gives the candidate tables and
    a bound on the candidates of a node (RRS's sequential steps). Same tokens as the walks above."""
    p, q = inputs.target_probs, inputs.draft_probs
    children, valid, uniforms = support.children, support.valid, support.uniforms
    tokens = _tokens_of(inputs.node_tokens.long(), children, valid)
    if inputs.rule == "spectr":
        accept, residual = _spectr_everywhere(p, q, tokens, valid, inputs.paths.shape[1])
    else:
        steps = max(support.steps, 1)
        children, valid, uniforms, tokens = (t[:, :, :steps] for t in (children, valid, uniforms, tokens))
        accept, residual = _recursive_rejection_everywhere(p, q, tokens, valid, steps)
    accepted_nodes, node, rejected = _walk_decided(children, valid, uniforms, accept, inputs.paths.shape[2])
    rows = torch.arange(len(node), device=node.device)
    next_dist = torch.where(rejected[:, None], residual[rows, node], p[rows, node])
    num_accepted = (accepted_nodes >= 0).sum(-1)
    next_tokens = sample_with_uniform(next_dist, inputs.sample_uniforms)
    return VerifyResult(accepted_nodes, accepted_nodes.clamp(min=0), num_accepted, next_tokens)


def _verify_lumped(inputs: VerifyInputs, compacted: VerifyInputs, token_ids: torch.Tensor) -> VerifyResult:
    """The walk on the lumped compact vocabulary (`compacted`, `token_ids`: `compact_vocabulary(lumped=True)` or
    `lumped_vocabulary`: q's support and one slot for p's mass outside it), the next token drawn on the whole
    vocabulary from the row's last distribution there: p at its last node divided by the totals the walk divided it
    by since, in the same order (the reference's operations on those entries, so the same values), with the walk's
    own values on q's support. Same tokens as the walks above; the vocabulary-sized work is a few passes over B
    rows, not several per candidate."""
    rows_of = (_Rows(compacted.target_probs), _Rows(compacted.draft_probs))
    if inputs.rule == "spectr":
        walked = _walk_spectr(compacted.paths, compacted.node_tokens, *rows_of, compacted.accept_uniforms)
    else:  # chains too
        walked = _walk_recursive_rejection(compacted.paths, compacted.node_tokens, *rows_of, compacted.accept_uniforms,
                                           with_divisors=True)
    accepted_nodes, last_dist, divisors = walked
    num_accepted = (accepted_nodes >= 0).sum(-1)
    node = _last_nodes(accepted_nodes, num_accepted)
    batch, _, vocab = inputs.target_probs.shape
    device = node.device
    rows = torch.arange(batch, device=device)
    # [B, V + 1]: a scratch column past the vocabulary takes the writes of unused slots and of the lump
    next_dist = torch.zeros(batch, vocab + 1, dtype=torch.float64, device=device)
    next_dist[:, :vocab] = inputs.target_probs.to(device)[rows, node]
    for divisor in divisors.unbind(1):  # x / 1 == x
        next_dist[:, :vocab].div_(divisor[:, None])
    next_dist.scatter_(1, token_ids[rows, node], last_dist)
    next_tokens = sample_with_uniform(next_dist[:, :vocab], compacted.sample_uniforms)
    return VerifyResult(accepted_nodes, tokens_at(inputs.node_tokens.to(device), accepted_nodes), num_accepted,
                        next_tokens)


# compaction is considered from this vocabulary size on, and used when the compact vocabulary is at most this share
COMPACT_MIN_VOCAB = 64
COMPACT_MAX_SHARE = 0.5


def _compaction_considered(inputs: VerifyInputs, compact: bool | None) -> bool:
    if compact is False or inputs.rule == "greedy" or inputs.paths.shape[1] == 0 or inputs.paths.shape[2] == 0:
        return False
    if compact:
        return True
    if inputs.rule == "rrs" and inputs.paths.shape[1] == 1:  # a chain's walk reads one node's distributions anyway
        return False
    return inputs.target_probs.device.type == "cpu" and inputs.target_probs.shape[-1] >= COMPACT_MIN_VOCAB


def verify_tree_batched(inputs: VerifyInputs, compact: bool | str | None = None) -> VerifyResult:
    """The verifier interface with every row walked at once on the inputs' device; the result is on that device.

    `compact`: verify on the union of the supports of p and q instead of the vocabulary (`compact_vocabulary`, with
    every node's decision computed at once: `_verify_everywhere`; the same tokens), or, "lumped", on q's support
    and p's mass outside it (`_verify_lumped`: sampling without top-k leaves p nonzero everywhere, while a
    reduced-vocabulary or top-k draft's q is not). None (default): for the sampling rules on CPU tensors with a
    vocabulary of at least COMPACT_MIN_VOCAB (but not RRS on chains, whose walk reads one node's distributions only),
    the union where it is at most COMPACT_MAX_SHARE of the vocabulary, else for SpecTr the lumped one where that is
    (its bisection makes 40 vocabulary passes per depth: 18.7 -> 13.3 ms per step for spectr:k=2,l=3 on the default
    pair, AMD EPYC; RRS's walk costs its number of tensor operations more than their width, and finding q's support
    cost more than it saved: 5.4 -> 8.8 ms); learning their sizes reads back one small tensor, the only read
    (elsewhere, e.g. on CUDA, nothing is read back). True: the union always, "lumped": the lumped one always
    (sampling rules); False: never.

    Sparse inputs (`SparseProbs`, which the loop gives where a top-k warper or a reduced-vocabulary draft bounds a
    support) say their supports: p and q both sparse are verified on the union of their entries (`union_vocabulary`),
    dense p with sparse q on q's entries and the lump (`lumped_vocabulary`), with nothing searched or read back;
    `compact=False` or the greedy rule: on their dense form."""
    inputs.check()
    if inputs.is_sparse:
        return _verify_sparse(inputs, compact)
    if _compaction_considered(inputs, compact):
        support = _Support(inputs, inputs.paths.to(device=inputs.target_probs.device, dtype=torch.long))
        limit = COMPACT_MAX_SHARE * inputs.target_probs.shape[-1]
        if compact == "lumped" or (compact is None and inputs.rule == "spectr" and support.width > limit
                                   and support.draft_width <= limit):
            return _verify_lumped(inputs, *compact_vocabulary(inputs, support, lumped=True))
        if compact or support.width <= limit:
            compacted, token_ids = compact_vocabulary(inputs, support)
            return expand_result(_verify_everywhere(compacted, support), inputs, token_ids)
    return _verify(inputs)


def _verify_sparse(inputs: VerifyInputs, compact: bool | str | None) -> VerifyResult:
    target_sparse = isinstance(inputs.target_probs, SparseProbs)
    device = (inputs.target_probs.values if target_sparse else inputs.target_probs).device
    paths = inputs.paths.to(device=device, dtype=torch.long)
    draft_sparse = isinstance(inputs.draft_probs, SparseProbs)
    if compact is False or inputs.rule == "greedy" or 0 in paths.shape[1:] or not draft_sparse:
        return verify_tree_batched(inputs.dense(), compact)  # the dense paths, their compaction included
    tables = _TreeTables(inputs, paths, inputs.node_tokens.shape[1])
    if target_sparse:
        compacted, token_ids = union_vocabulary(inputs, tables)
        return expand_result(_verify_everywhere(compacted, tables), inputs, token_ids)
    return _verify_lumped(inputs, *lumped_vocabulary(inputs, tables))


def _verify(inputs: VerifyInputs) -> VerifyResult:
    rule, paths, node_tokens, target_probs = inputs.rule, inputs.paths, inputs.node_tokens, inputs.target_probs
    draft_probs, accept_uniforms, sample_uniforms = inputs.draft_probs, inputs.accept_uniforms, inputs.sample_uniforms
    device = target_probs.device
    batch, num_paths, depth = paths.shape
    paths = paths.to(device=device, dtype=torch.long)
    node_tokens = node_tokens.to(device)
    token_index = node_tokens.long()
    accept_uniforms = accept_uniforms.to(device)
    sample_uniforms = sample_uniforms.to(device)

    empty = num_paths == 0 or depth == 0  # no candidates anywhere: every row stops at the root
    no_walk = torch.full((batch, depth), -1, dtype=torch.long, device=device)
    if rule == "greedy":
        if empty:
            accepted_nodes, rejected = no_walk, torch.zeros(batch, dtype=torch.bool, device=device)
            best = target_probs[:, 0].argmax(-1)
        else:
            accepted_nodes, rejected, best = _walk_greedy(paths, token_index, target_probs, accept_uniforms)
        # rejected: the residual is the one-hot of the argmax (drawn as the reference draws it); else the bonus argmax
        one_hot = torch.zeros(batch, target_probs.shape[-1], dtype=torch.float64, device=device)
        one_hot.scatter_(1, best[:, None], 1.0)
        next_tokens = torch.where(rejected, sample_with_uniform(one_hot, sample_uniforms), best)
    else:
        target = _Rows(target_probs)
        if empty:
            accepted_nodes = no_walk
            next_dist = target.load(torch.zeros(batch, dtype=torch.long, device=device),
                                    torch.empty(batch, target.vocab, dtype=torch.float64, device=device))
        else:
            walk = _walk_spectr if rule == "spectr" else _walk_chain if num_paths == 1 else _walk_recursive_rejection
            accepted_nodes, next_dist = walk(paths, token_index, target, _Rows(draft_probs.to(device)),
                                           accept_uniforms)[:2]  # the divisors serve `_verify_lumped`
        next_tokens = sample_with_uniform(next_dist, sample_uniforms)
    num_accepted = (accepted_nodes >= 0).sum(-1)
    return VerifyResult(accepted_nodes, tokens_at(node_tokens, accepted_nodes), num_accepted, next_tokens)

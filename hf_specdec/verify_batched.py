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

A row stops at a leaf or at the last depth (the bonus token is drawn from p there; greedy: its argmax) or when every
candidate at its node is rejected (the next token is drawn from the rule's residual at that node). Every elementwise
formula is the reference's, in the same order and in float64, so equal uniforms give equal tokens; vocabulary sums
run per row (the summation order of the backend's row reduction). Vocabulary-sized work runs in preallocated [B, V]
buffers (on CPU, allocating them per operation costs more than the arithmetic).
"""

from __future__ import annotations

import torch

from hf_specdec.verification import SPECTR_BISECTION_STEPS, VerifyInputs, VerifyResult, sample_with_uniform

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


def _child_tables(paths: torch.Tensor, uniforms: torch.Tensor, node_tokens: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The RRS candidates of every node u = 0..N of every row at once: u's children on the paths (the entry after u
    on a path; the root's: the first column), distinct, in increasing node index, each with the uniform of the first
    path holding it. Returns nodes, tokens, uniforms [B, N+1, P] (the valid ones first) and counts [B, N+1]."""
    batch, num_paths, depth = paths.shape
    num_slots = node_tokens.shape[1]
    above = torch.cat([paths.new_zeros(batch, num_paths, 1), paths[:, :, :-1]], dim=2)  # the root above column 0
    slots = torch.arange(num_slots, device=paths.device)[None, :, None, None]
    match = (paths >= 0)[:, None] & (above[:, None] == slots)  # [B, N+1, P, L]: path k's entry at column d is below u
    column = match.to(torch.int8).argmax(-1, keepdim=True)  # a node lies once on a path: its child's column
    child = paths[:, None].expand(-1, num_slots, -1, -1).gather(3, column).squeeze(3)
    child_uniforms = uniforms[:, None].expand(-1, num_slots, -1, -1).gather(3, column).squeeze(3)
    child, valid, child_uniforms = _distinct(child, match.any(-1), child_uniforms)
    child = torch.where(valid, child, 0)
    tokens = torch.where(valid, node_tokens.gather(1, child.flatten(1)).view_as(child), 0)
    return child, tokens, child_uniforms, valid.sum(-1)


def _walk_recursive_rejection(paths, node_tokens, target, draft, uniforms):
    """RRS: candidate tests as steps (see the module docstring). Returns accepted_nodes [B, L] and, per row, the
    distribution the next token is drawn from: the last Theta where the row rejected, else p at its last node."""
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
    for _ in range(steps):
        index = (node * num_paths + k.clamp(max=num_paths - 1))[:, None]
        candidate, token, uniform = (t.gather(1, index) for t in table)
        q_token, theta_token = qk.gather(1, token), theta.gather(1, token)
        accept = torch.where(q_token > 0, (theta_token / q_token).clamp(max=1.0), 0.0)
        hit = walking & (uniform.double() < accept).squeeze(1)
        miss = walking & ~hit
        # rejected: Theta_{k+1} = norm((Theta_k - q_k)+) (kept where that sums to 0), q_{k+1} = norm(q_k without X_k)
        torch.sub(theta, qk, out=rest).clamp_(min=0.0)
        rest_total = rest.sum(-1, keepdim=True)
        update = miss & (rest_total > 0).squeeze(1)
        theta_rows.index_copy_(0, torch.where(update, rows, spare), rest.div_(rest_total))
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
    return accepted_nodes[:, :depth], theta


def _integer_power(base: torch.Tensor, exponent: torch.Tensor, max_exponent: int) -> torch.Tensor:
    """base ** exponent per row as repeated products (`integer_power`); factors past the exponent are 1 (exact)."""
    factors = torch.where(torch.arange(max_exponent, device=base.device) < exponent[:, None], base[:, None], 1.0)
    result = torch.ones_like(base)
    for step in range(max_exponent):
        result.mul_(factors[:, step])
    return result


def _spectr_rho(p: torch.Tensor, q: torch.Tensor, draws: torch.Tensor, max_draws: int, scratch: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """`spectr_rho` for every row (p, q [B, V] float64, K = draws [B]): rho* and beta(rho*)."""

    def beta(rho: torch.Tensor) -> torch.Tensor:
        torch.div(p, rho[:, None], out=scratch)
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
    min(1, p / (rho* q)) in path order. Returns accepted_nodes [B, L] and the next token's distribution per row: the
    K-SEQ residual where every draw was rejected, else p at the last node."""
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
    return accepted_nodes, torch.where(use_residual, rest.div_(rest_total), p, out=p)


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


def verify_tree_batched(inputs: VerifyInputs) -> VerifyResult:
    """The verifier interface with every row walked at once on the inputs' device (no host syncs); the result is on
    that device."""
    inputs.check()
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
            walk = _walk_spectr if rule == "spectr" else _walk_recursive_rejection
            accepted_nodes, next_dist = walk(paths, token_index, target, _Rows(draft_probs.to(device)), accept_uniforms)
        next_tokens = sample_with_uniform(next_dist, sample_uniforms)
    num_accepted = (accepted_nodes >= 0).sum(-1)
    accepted_tokens = torch.where(accepted_nodes >= 0, node_tokens.gather(1, accepted_nodes.clamp(min=0)), -1)
    return VerifyResult(accepted_nodes, accepted_tokens, num_accepted, next_tokens)

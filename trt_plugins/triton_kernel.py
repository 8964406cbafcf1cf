"""Triton kernel of the `VerifyTree` operator (the GPU implementation; CI runs it on CPU with TRITON_INTERPRET=1).

One program per batch row walks that row's tree from the root; every per-node rule loops over the vocabulary in
blocks. It implements `hf_specdec.verification` in Triton: the same candidate order, the same float64 elementwise
formulas in the same order (see the numerics note there); only sums over the vocabulary are blocked.

Recursive rejection keeps no vocabulary-sized state: after j rejections, Theta_{j+1}(x) and q_{j+1}(x) follow from
p(x), q(x) and the j normalisers and rejected tokens, so each rejection costs one pass over the vocabulary.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hf_specdec.trt_plugins.verify_op import check_rule
from hf_specdec.verification import RULES, SPECTR_BISECTION_STEPS, VerifyInputs, VerifyResult

RULE_IDS = {rule: index for index, rule in enumerate(RULES)}
RRS, SPECTR, GREEDY = RULE_IDS["rrs"], RULE_IDS["spectr"], RULE_IDS["greedy"]
NONE = 2**30  # "no candidate" key, larger than any node or path index
BLOCK_V = 1024


@triton.jit
def _pick(vector, index, lanes):
    """vector[index] of a small register vector (a sum with one non-zero term is exact)."""
    return tl.sum(tl.where(lanes == index, vector, 0), axis=0)


@triton.jit
def _integer_power(base, exponent):
    result = tl.full([], 1.0, tl.float64)
    for _ in range(exponent):
        result = result * base
    return result


@triton.jit
def _rrs_state(p, q, x, steps, rejected_tokens, theta_sums, q_sums, lanes):
    """Theta and q of recursive rejection at tokens x after `steps` rejections (`recursive_rejection`'s updates)."""
    theta = p
    qk = q
    for j in range(steps):
        theta_sum = _pick(theta_sums, j, lanes)
        q_sum = _pick(q_sums, j, lanes)
        removed = tl.where(x == _pick(rejected_tokens, j, lanes), 0.0, qk)
        theta = tl.where(theta_sum > 0, tl.maximum(theta - qk, 0.0) / theta_sum, theta)
        qk = tl.where(q_sum > 0, removed / q_sum, removed)
    return theta, qk


@triton.jit
def _load_block(target_row, draft_row, start, vocab, BLOCK_V: tl.constexpr):
    """Tokens x of the vocabulary block at `start`, with p(x) and q(x) in float64 (0 past the vocabulary)."""
    x = start + tl.arange(0, BLOCK_V)
    p = tl.load(target_row + x, mask=x < vocab, other=0.0).to(tl.float64)
    q = tl.load(draft_row + x, mask=x < vocab, other=0.0).to(tl.float64)
    return x, p, q


@triton.jit
def _sample(values_row, vocab, uniform, BLOCK_V: tl.constexpr):
    """`sample_with_uniform` over a row (read as float64): threshold u * cdf[-1], then the number of CDF values
    <= threshold. The CDF is blocked (a carry plus a block cumsum) and computed alike in both passes, so that its last
    value is the total."""
    carry = tl.full([], 0.0, tl.float64)
    for start in range(0, vocab, BLOCK_V):
        x = start + tl.arange(0, BLOCK_V)
        values = tl.load(values_row + x, mask=x < vocab, other=0.0).to(tl.float64)
        carry = tl.max(carry + tl.cumsum(values, axis=0), axis=0)
    threshold = uniform.to(tl.float64) * carry
    carry = tl.full([], 0.0, tl.float64)
    count = tl.full([], 0, tl.int32)
    for start in range(0, vocab, BLOCK_V):
        x = start + tl.arange(0, BLOCK_V)
        values = tl.load(values_row + x, mask=x < vocab, other=0.0).to(tl.float64)
        cdf = carry + tl.cumsum(values, axis=0)
        count += tl.sum(((x < vocab) & (cdf <= threshold)).to(tl.int32), axis=0)
        carry = tl.max(cdf, axis=0)
    return tl.minimum(count, vocab - 1)


@triton.jit
def _argmax(target_row, vocab, BLOCK_V: tl.constexpr):
    """The first index of the maximum (torch.argmax)."""
    best_value = tl.full([], float("-inf"), tl.float32)
    best_index = tl.full([], 0, tl.int32)
    for start in range(0, vocab, BLOCK_V):
        x = start + tl.arange(0, BLOCK_V)
        scores = tl.load(target_row + x, mask=x < vocab, other=float("-inf")).to(tl.float32)
        block_max = tl.max(scores, axis=0)
        block_index = start + tl.argmax(scores, axis=0, tie_break_left=True)
        better = block_max > best_value
        best_index = tl.where(better, block_index, best_index)
        best_value = tl.where(better, block_max, best_value)
    return best_index


@triton.jit
def _next_candidate(keys, previous_key, lanes, NONE: tl.constexpr):
    """The candidate after `previous_key` in verification order: its key and its lane (path index)."""
    key = tl.min(tl.where(keys > previous_key, keys, NONE), axis=0)
    lane = tl.min(tl.where(keys == key, lanes, NONE), axis=0)
    return key, lane


@triton.jit
def _greedy_node(target_row, tokens_row, column, keys, uniforms, lanes, vocab, BLOCK_V: tl.constexpr, NONE: tl.constexpr):
    """`greedy_match`: accept the first candidate equal to the target's argmax; else the argmax is the next token."""
    best = _argmax(target_row, vocab, BLOCK_V)
    candidate_tokens = tl.load(tokens_row + column, mask=keys < NONE, other=-1)
    hit_keys = tl.where((candidate_tokens == best) & (uniforms < 1.0), keys, NONE)
    key, lane = _next_candidate(hit_keys, -1, lanes, NONE)
    return tl.where(key < NONE, _pick(column, lane, lanes), -1), best


@triton.jit
def _spectr_beta(target_row, draft_row, vocab, rho, BLOCK_V: tl.constexpr):
    """beta(rho) = sum_x min(q(x), p(x) / rho)."""
    beta = tl.full([], 0.0, tl.float64)
    for start in range(0, vocab, BLOCK_V):
        x, p, q = _load_block(target_row, draft_row, start, vocab, BLOCK_V)
        beta += tl.sum(tl.minimum(q, p / rho), axis=0)
    return beta


@triton.jit
def _spectr_feasible(target_row, draft_row, vocab, rho, num_draws, BLOCK_V: tl.constexpr):
    beta = _spectr_beta(target_row, draft_row, vocab, rho, BLOCK_V)
    return 1.0 - _integer_power(1.0 - beta, num_draws) <= rho * beta + 1e-12


@triton.jit
def _spectr_rho(target_row, draft_row, vocab, num_draws, BISECTION_STEPS: tl.constexpr, BLOCK_V: tl.constexpr):
    """`spectr_rho`: the smallest feasible rho in [1, K] by bisection, and beta(rho)."""
    low = tl.full([], 1.0, tl.float64)
    high = num_draws.to(tl.float64)
    if _spectr_feasible(target_row, draft_row, vocab, low, num_draws, BLOCK_V):
        high = low
    else:
        for _ in range(BISECTION_STEPS):
            middle = 0.5 * (low + high)
            if _spectr_feasible(target_row, draft_row, vocab, middle, num_draws, BLOCK_V):
                high = middle
            else:
                low = middle
    return high, _spectr_beta(target_row, draft_row, vocab, high, BLOCK_V)


@triton.jit
def _spectr_node(target_row, draft_row, residual_row, tokens_row, column, keys, uniforms, sample_uniform, lanes,
                 vocab, BISECTION_STEPS: tl.constexpr, BLOCK_V: tl.constexpr, NONE: tl.constexpr):
    """`spectr_kseq`: each draw accepted w.p. min(1, p / (rho* q)); all rejected: sample the K-SEQ residual."""
    num_draws = tl.sum((keys < NONE).to(tl.int32), axis=0)
    rho, beta = _spectr_rho(target_row, draft_row, vocab, num_draws, BISECTION_STEPS, BLOCK_V)
    accepted = tl.full([], -1, tl.int32)
    previous = tl.full([], -1, tl.int32)
    for _ in range(num_draws):
        key, lane = _next_candidate(keys, previous, lanes, NONE)
        candidate = _pick(column, lane, lanes)
        token = tl.load(tokens_row + candidate)
        p_token = tl.load(target_row + token).to(tl.float64)
        q_token = tl.load(draft_row + token).to(tl.float64)
        accept = tl.where(q_token > 0, tl.minimum(p_token / tl.maximum(rho * q_token, 1e-300), 1.0), 0.0)
        accepted = tl.where((accepted < 0) & (_pick(uniforms, lane, lanes) < accept), candidate, accepted)
        previous = key
    next_token = tl.full([], 0, tl.int32)
    if accepted < 0:
        # norm([p - min(q, p / rho) * (1 - (1 - beta)^K) / beta]+), or p where beta = 0 or that is empty
        scale = (1.0 - _integer_power(1.0 - beta, num_draws)) / tl.where(beta > 0, beta, 1.0)
        total = tl.full([], 0.0, tl.float64)
        for start in range(0, vocab, BLOCK_V):
            x, p, q = _load_block(target_row, draft_row, start, vocab, BLOCK_V)
            total += tl.sum(tl.maximum(p - tl.minimum(q, p / rho) * scale, 0.0), axis=0)
        for start in range(0, vocab, BLOCK_V):
            x, p, q = _load_block(target_row, draft_row, start, vocab, BLOCK_V)
            residual = tl.maximum(p - tl.minimum(q, p / rho) * scale, 0.0) / tl.where(total > 0, total, 1.0)
            tl.store(residual_row + x, tl.where((beta > 0) & (total > 0), residual, p), mask=x < vocab)
        tl.debug_barrier()  # the sampler's threads read what other threads wrote
        next_token = _sample(residual_row, vocab, sample_uniform, BLOCK_V)
    return accepted, next_token


@triton.jit
def _rrs_node(target_row, draft_row, residual_row, tokens_row, column, keys, uniforms, sample_uniform, lanes, vocab,
              MAX_PATHS: tl.constexpr, BLOCK_V: tl.constexpr, NONE: tl.constexpr):
    """`recursive_rejection`: candidates tried in order, each rejection updates Theta and q (one vocabulary pass);
    all rejected: sample the last Theta."""
    num_candidates = tl.sum((keys < NONE).to(tl.int32), axis=0)
    rejected_tokens = tl.full([MAX_PATHS], -1, tl.int32)
    theta_sums = tl.zeros([MAX_PATHS], tl.float64)
    q_sums = tl.zeros([MAX_PATHS], tl.float64)
    accepted = tl.full([], -1, tl.int32)
    previous = tl.full([], -1, tl.int32)
    for k in range(num_candidates):
        if accepted < 0:
            key, lane = _next_candidate(keys, previous, lanes, NONE)
            candidate = _pick(column, lane, lanes)
            token = tl.load(tokens_row + candidate)
            p_token = tl.load(target_row + token).to(tl.float64)
            q_token = tl.load(draft_row + token).to(tl.float64)
            theta_token, q_k_token = _rrs_state(p_token, q_token, token, k, rejected_tokens, theta_sums, q_sums, lanes)
            accept = tl.where(q_k_token > 0, tl.minimum(theta_token / tl.where(q_k_token > 0, q_k_token, 1.0), 1.0), 0.0)
            if _pick(uniforms, lane, lanes) < accept:
                accepted = candidate
            else:
                theta_sum = tl.full([], 0.0, tl.float64)
                q_sum = tl.full([], 0.0, tl.float64)
                for start in range(0, vocab, BLOCK_V):
                    x, p, q = _load_block(target_row, draft_row, start, vocab, BLOCK_V)
                    theta, qk = _rrs_state(p, q, x, k, rejected_tokens, theta_sums, q_sums, lanes)
                    theta_sum += tl.sum(tl.maximum(theta - qk, 0.0), axis=0)
                    q_sum += tl.sum(tl.where(x == token, 0.0, qk), axis=0)
                rejected_tokens = tl.where(lanes == k, token, rejected_tokens)
                theta_sums = tl.where(lanes == k, theta_sum, theta_sums)
                q_sums = tl.where(lanes == k, q_sum, q_sums)
            previous = key
    next_token = tl.full([], 0, tl.int32)
    if accepted < 0:
        for start in range(0, vocab, BLOCK_V):
            x, p, q = _load_block(target_row, draft_row, start, vocab, BLOCK_V)
            theta, _ = _rrs_state(p, q, x, num_candidates, rejected_tokens, theta_sums, q_sums, lanes)
            tl.store(residual_row + x, theta, mask=x < vocab)
        tl.debug_barrier()  # the sampler's threads read what other threads wrote
        next_token = _sample(residual_row, vocab, sample_uniform, BLOCK_V)
    return accepted, next_token


@triton.jit
def verify_tree_kernel(
    paths_ptr, node_tokens_ptr, target_ptr, draft_ptr, accept_uniforms_ptr, sample_uniforms_ptr, residual_ptr,
    accepted_nodes_ptr, accepted_tokens_ptr, num_accepted_ptr, next_tokens_ptr,
    num_paths, depth, num_nodes, vocab,
    RULE: tl.constexpr, MAX_PATHS: tl.constexpr, BLOCK_V: tl.constexpr, BISECTION_STEPS: tl.constexpr,
    NONE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, MAX_PATHS)
    real_path = lanes < num_paths
    paths_row = paths_ptr + row * num_paths * depth
    uniforms_row = accept_uniforms_ptr + row * num_paths * depth
    tokens_row = node_tokens_ptr + row * num_nodes
    residual_row = residual_ptr + row * vocab
    sample_uniform = tl.load(sample_uniforms_ptr + row)

    node = tl.full([], 0, tl.int32)
    count = tl.full([], 0, tl.int32)
    walking = tl.full([], 1, tl.int32)  # 0 once the walk stopped (a leaf, or every candidate rejected)
    rejected = tl.full([], 0, tl.int32)
    next_token = tl.full([], 0, tl.int32)
    for level in range(depth):
        column = tl.load(paths_row + lanes * depth + level, mask=real_path & (walking != 0), other=-1)
        parent = tl.load(paths_row + lanes * depth + level - 1, mask=real_path & (level > 0) & (walking != 0), other=-1)
        alive = (column >= 0) & ((parent == node) | (level == 0))
        if RULE == 1:  # SPECTR: one candidate per path (draws, duplicates included), in path order
            keys = tl.where(alive, lanes, NONE)
        else:  # distinct nodes in increasing node index, each with the uniform of its first path
            earlier_same = (column[:, None] == column[None, :]) & alive[None, :] & (lanes[None, :] < lanes[:, None])
            keys = tl.where(alive & (tl.max(earlier_same.to(tl.int32), axis=1) == 0), column, NONE)
        if tl.min(keys, axis=0) == NONE:
            walking = 0  # a leaf: the bonus token follows
        else:
            uniforms = tl.load(uniforms_row + lanes * depth + level, mask=real_path, other=1.0).to(tl.float64)
            target_row = target_ptr + (row * num_nodes + node) * vocab
            draft_row = draft_ptr + (row * num_nodes + node) * vocab
            if RULE == 2:
                accepted, next_token = _greedy_node(target_row, tokens_row, column, keys, uniforms, lanes, vocab,
                                                    BLOCK_V, NONE)
            elif RULE == 1:
                accepted, next_token = _spectr_node(target_row, draft_row, residual_row, tokens_row, column, keys,
                                                    uniforms, sample_uniform, lanes, vocab, BISECTION_STEPS, BLOCK_V, NONE)
            else:
                accepted, next_token = _rrs_node(target_row, draft_row, residual_row, tokens_row, column, keys,
                                                 uniforms, sample_uniform, lanes, vocab, MAX_PATHS, BLOCK_V, NONE)
            if accepted >= 0:
                tl.store(accepted_nodes_ptr + row * depth + count, accepted)
                tl.store(accepted_tokens_ptr + row * depth + count, tl.load(tokens_row + accepted))
                count += 1
                node = accepted
            else:
                walking = 0
                rejected = 1
    if rejected == 0:  # a leaf or the drafted depth: the bonus token comes from p at the last accepted node
        target_row = target_ptr + (row * num_nodes + node) * vocab
        if RULE == 2:
            next_token = _argmax(target_row, vocab, BLOCK_V)
        else:
            next_token = _sample(target_row, vocab, sample_uniform, BLOCK_V)
    tl.store(num_accepted_ptr + row, count)
    tl.store(next_tokens_ptr + row, next_token)


def verify_tree_triton(inputs: VerifyInputs, out: tuple[torch.Tensor, ...] | None = None,
                       residual: torch.Tensor | None = None) -> VerifyResult:
    """The verifier interface by the Triton kernel, on the inputs' device.

    A TensorRT plugin passes its buffers: `out`, the int32 outputs (accepted_nodes, accepted_tokens, num_accepted,
    next_tokens), and `residual`, float64 scratch of [batch, vocab] (sampling rules)."""
    inputs = inputs.dense()  # the kernel walks [B, N+1, V] distributions
    rule, paths, node_tokens = check_rule(inputs.rule), inputs.paths, inputs.node_tokens
    target_probs, draft_probs = inputs.target_probs, inputs.draft_probs
    accept_uniforms, sample_uniforms = inputs.accept_uniforms, inputs.sample_uniforms
    batch, num_paths, depth = paths.shape
    num_nodes, vocab = target_probs.shape[1], target_probs.shape[2]
    if draft_probs is None:
        if rule != "greedy" and num_paths > 0:
            raise ValueError(f"rule {rule!r} needs draft_probs")
        draft_probs = target_probs
    elif rule != "greedy" and draft_probs.shape != target_probs.shape:
        raise ValueError(f"draft_probs {tuple(draft_probs.shape)} must have target_probs' shape {tuple(target_probs.shape)}")
    device = target_probs.device
    int32 = dict(dtype=torch.int32, device=device)
    outputs = out if out is not None else (
        torch.empty(batch, depth, **int32), torch.empty(batch, depth, **int32),
        torch.empty(batch, **int32), torch.empty(batch, **int32),
    )
    outputs[0].fill_(-1)
    outputs[1].fill_(-1)
    if residual is None:  # the residual distribution of a row's rejecting node (sampling rules only)
        residual = torch.empty((batch, vocab) if rule != "greedy" else (1,), dtype=torch.float64, device=device)
    if batch > 0:
        verify_tree_kernel[(batch,)](
            paths.to(**int32).contiguous(), node_tokens.to(**int32).contiguous(),
            target_probs.float().contiguous(), draft_probs.float().contiguous(),
            accept_uniforms.float().contiguous(), sample_uniforms.float().contiguous(), residual,
            *outputs, num_paths, depth, num_nodes, vocab,
            RULE=RULE_IDS[rule], MAX_PATHS=max(triton.next_power_of_2(num_paths), 2), BLOCK_V=BLOCK_V,
            BISECTION_STEPS=SPECTR_BISECTION_STEPS, NONE=NONE,
        )
    return VerifyResult(*(output.long() for output in outputs))


def compile_kernel(rule: str, capability: int, max_paths: int = 16) -> bytes:
    """Compile the kernel for a GPU of this compute capability (e.g. 89) without one; returns the cubin."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    pointers = {"paths_ptr": "*i32", "node_tokens_ptr": "*i32", "target_ptr": "*fp32", "draft_ptr": "*fp32",
                "accept_uniforms_ptr": "*fp32", "sample_uniforms_ptr": "*fp32", "residual_ptr": "*fp64",
                "accepted_nodes_ptr": "*i32", "accepted_tokens_ptr": "*i32", "num_accepted_ptr": "*i32",
                "next_tokens_ptr": "*i32"}
    sizes = {name: "i32" for name in ("num_paths", "depth", "num_nodes", "vocab")}
    constants = {"RULE": RULE_IDS[check_rule(rule)], "MAX_PATHS": max_paths, "BLOCK_V": BLOCK_V,
                 "BISECTION_STEPS": SPECTR_BISECTION_STEPS, "NONE": NONE}
    source = ASTSource(verify_tree_kernel, {**pointers, **sizes, **{k: "constexpr" for k in constants}}, constants)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32)).asm["cubin"]

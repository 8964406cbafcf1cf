"""`verify_tree_batched` (all rows at once on the device, no host syncs) returns the reference's tokens.

Reference: `hf_specdec.verification.verify_tree`. The trees are random tries (tests/verify_cases.py), trees grown by
the drafters themselves (`DRAFTERS` on a `DraftTree`), and batches that mix rows of different sizes; the vocabularies
are tiny so that candidates repeat and the thresholds of every rule are hit, and the uniforms are also placed on the
thresholds (the accept probability itself and its floating-point neighbours, CDF steps of the next token's
distribution), where a one-ulp difference in any probability would change a token.
"""

from __future__ import annotations

import math

import pytest
import torch

from hf_specdec.config import SpeculativeConfig
from hf_specdec.drafting import DRAFTERS
from hf_specdec.trees import DraftTree
from hf_specdec.verification import NODE_RULES, RULES, SparseProbs, VerifyInputs, VerifyResult, candidates_at, verify_tree
from hf_specdec.verify_batched import verify_tree_batched
from verify_cases import random_case

def reference(case: dict) -> VerifyResult:
    return verify_tree(VerifyInputs(**case))


def batched(case: dict) -> VerifyResult:
    return verify_tree_batched(VerifyInputs(**case))

FIELDS = ("accepted_nodes", "accepted_tokens", "num_accepted", "next_tokens")
BELOW_ONE = math.nextafter(1.0, 0.0)


def assert_same(expected: VerifyResult, found: VerifyResult, case: dict) -> None:
    for name in FIELDS:
        want, got = getattr(expected, name), getattr(found, name)
        assert got.device == case["target_probs"].device and got.dtype == want.dtype, name
        assert torch.equal(want, got.to(want.device)), (
            f"{case['rule']}: {name} {got.tolist()} != reference {want.tolist()} (paths {case['paths'].tolist()})"
        )


def check(case: dict) -> VerifyResult:
    expected = reference(case)
    assert_same(expected, batched(case), case)
    return expected


# ---------------------------------------------------------------- problems


def with_rule(case: dict, rule: str) -> dict:
    """The same tree and distributions verified by another rule (greedy reads the target's argmax)."""
    return {**case, "rule": rule, "draft_probs": None if rule == "greedy" else case["draft_probs"]}


def distributions(batch: int, slots: int, vocab: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """p, q [B, slots, V] (float32): per node, related random distributions, p == q, one-hot p, zeros in p or q,
    disjoint supports."""
    logits = torch.randn(batch, slots, vocab, generator=generator) * float(torch.empty(1).uniform_(0.3, 3.0, generator=generator))
    q = logits.softmax(-1)
    p = (logits + torch.randn(batch, slots, vocab, generator=generator)).softmax(-1)
    kind = torch.randint(0, 7, (batch, slots, 1), generator=generator)
    holes = torch.rand(batch, slots, vocab, generator=generator) < 0.4
    p = torch.where(kind == 1, q, p)
    p = torch.where(kind == 2, torch.nn.functional.one_hot(p.argmax(-1), vocab).float(), p)
    q = torch.where((kind == 3) & holes, 0.0, q)
    p = torch.where((kind == 4) & holes, 0.0, p)
    p = torch.where((kind == 5) & holes, 0.0, p)
    q = torch.where((kind == 5) & ~holes, 0.0, q)
    # keep some mass in each (a drafter samples from q); renormalise
    q = torch.where(q.sum(-1, keepdim=True) > 0, q, torch.full_like(q, 1.0 / vocab))
    p = torch.where(p.sum(-1, keepdim=True) > 0, p, torch.full_like(p, 1.0 / vocab))
    return p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)


def drafted_case(method: str, batch: int, vocab: int, generator: torch.Generator) -> dict:
    """A tree grown by the method's drafter on a `DraftTree`, as the speculative loop does (q with zeros leaves rows
    with fewer nodes); q at nodes the draft never ran is NaN (the loop leaves it uninitialised: never read)."""
    depth = int(torch.randint(1, 5, (1,), generator=generator))
    if method == "sd":
        config = SpeculativeConfig.sd(depth)
    elif method == "rsd-c":
        config = SpeculativeConfig.rsd_c(torch.randint(1, 4, (depth,), generator=generator).tolist())
    elif method == "rsd-s":
        config = SpeculativeConfig("rsd-s", depth=depth, beam_width=int(torch.randint(1, 5, (1,), generator=generator)))
    else:
        config = SpeculativeConfig.spectr(int(torch.randint(1, 6, (1,), generator=generator)), depth)
    greedy = bool(torch.rand(1, generator=generator) < 0.25)
    drafter = DRAFTERS[method](config, greedy)
    capacity = config.tree_size
    p, q = distributions(batch, capacity + 1, vocab, generator)
    if method in ("rsd-c", "rsd-s"):  # rows whose root draws nothing (a top-k warper leaving no token): empty rows
        q[:, 0] = torch.where(torch.rand(batch, 1, generator=generator) < 0.1, 0.0, q[:, 0])
    tree = DraftTree(torch.randint(0, vocab, (batch,), generator=generator), capacity, config.depth)
    state = drafter.start(tree)
    rows = torch.arange(batch)[:, None]
    frontier = torch.zeros(batch, 1, dtype=torch.long)
    frontier_valid = torch.ones(batch, 1, dtype=torch.bool)
    for level in range(1, config.depth + 1):
        new_nodes = drafter.expand(tree, state, frontier, frontier_valid, q[rows, frontier].log())
        if level == config.depth or new_nodes.shape[1] == 0:
            break
        frontier, frontier_valid = new_nodes, tree.valid.gather(1, new_nodes)
    size = tree.size
    paths = drafter.paths(tree, state)
    parents = tree.parents[:, :size]
    children = torch.zeros(batch, size, dtype=torch.long).scatter_add_(1, parents.clamp(min=0), (parents >= 0).long())
    assert int(children.max()) <= drafter.max_children(), "the bound the loop gives the verifier"
    draft_probs = torch.where(children[..., None] > 0, q[:, :size], float("nan"))
    rule = "greedy" if greedy else ("spectr" if method == "spectr" else "rrs")
    return dict(
        rule=rule,
        paths=paths,
        node_tokens=tree.tokens[:, :size].clone(),
        target_probs=p[:, :size],
        draft_probs=draft_probs,  # greedy ignores it
        accept_uniforms=torch.rand(paths.shape, generator=generator),
        sample_uniforms=torch.rand(batch, generator=generator),
        max_children=drafter.max_children(),
    )


def with_any_tokens(case: dict, generator: torch.Generator) -> dict:
    """Half of the draft tokens replaced by any token of the vocabulary (q(token) may be 0, siblings may repeat a
    token, the last token (say eos) is frequent): a verifier must not assume that tokens were drawn from q."""
    tokens = case["node_tokens"].clone()
    vocab = case["target_probs"].shape[-1]
    other = torch.randint(0, vocab + 2, tokens.shape, generator=generator).clamp_(max=vocab - 1)
    replace = torch.rand(tokens.shape, generator=generator) < 0.5
    replace[:, 0] = False
    return {**case, "node_tokens": torch.where(replace, other, tokens)}


def merged(cases: list[dict]) -> dict:
    """One batch of the rows of `cases` (same rule and vocabulary), padded to the largest P, L and node count: rows
    with fewer paths, shallower paths and fewer nodes. Padded node slots hold NaN distributions (never read)."""
    num_paths = max(c["paths"].shape[1] for c in cases)
    depth = max(c["paths"].shape[2] for c in cases)
    slots = max(c["node_tokens"].shape[1] for c in cases)

    def pad(t: torch.Tensor, shape: tuple[int, ...], value: float) -> torch.Tensor:
        out = torch.full((t.shape[0], *shape), value, dtype=t.dtype)
        out[(slice(None), *(slice(0, n) for n in t.shape[1:]))] = t
        return out

    vocab = cases[0]["target_probs"].shape[-1]
    fields = dict(
        paths=[pad(c["paths"], (num_paths, depth), -1) for c in cases],
        node_tokens=[pad(c["node_tokens"], (slots,), vocab - 1) for c in cases],
        target_probs=[pad(c["target_probs"], (slots, vocab), float("nan")) for c in cases],
        accept_uniforms=[pad(c["accept_uniforms"], (num_paths, depth), 0.5) for c in cases],
        sample_uniforms=[c["sample_uniforms"] for c in cases],
    )
    if cases[0]["draft_probs"] is not None:
        fields["draft_probs"] = [pad(c["draft_probs"], (slots, vocab), float("nan")) for c in cases]
    out = {name: torch.cat(parts) for name, parts in fields.items()}
    return dict(rule=cases[0]["rule"], **{"draft_probs": None, **out})


def near(value: float, generator: torch.Generator) -> float:
    """`value`, or its floating-point neighbour below or above, in [0, 1)."""
    choice = int(torch.randint(0, 3, (1,), generator=generator))
    value = (value, math.nextafter(value, 0.0), math.nextafter(value, 1.0))[choice]
    return min(max(value, 0.0), BELOW_ONE)


def walk_nodes(paths: torch.Tensor, depth: int) -> list[int]:
    """The nodes whose candidates sit at column `depth` (the root at depth 0)."""
    return [0] if depth == 0 else sorted(set(paths[:, depth - 1].tolist()) - {-1})


def at_accept_thresholds(case: dict, generator: torch.Generator) -> dict:
    """Every accept uniform (float64) on or next to the accept probability of the candidate that reads it."""
    uniforms = case["accept_uniforms"].double().clone()
    rule, distinct = case["rule"], case["rule"] != "spectr"
    for b in range(uniforms.shape[0]):
        paths = case["paths"][b]
        for depth in range(paths.shape[1]):
            for node in walk_nodes(paths, depth):
                candidates, path_index = candidates_at(paths, node, depth, distinct)
                if len(candidates) == 0:
                    continue
                q = None if case["draft_probs"] is None else case["draft_probs"][b, node]
                decision = NODE_RULES[rule](case["target_probs"][b, node], q, case["node_tokens"][b, candidates])
                for k, accept in zip(path_index.tolist(), decision.accept_probs.tolist()):
                    uniforms[b, k, depth] = near(accept, generator)
    return {**case, "accept_uniforms": uniforms}


def at_cdf_steps(case: dict, result: VerifyResult, generator: torch.Generator) -> dict:
    """Every sample uniform (float64) on or next to a step of the CDF the reference draws the next token from (the
    residual where the walk rejected, p at its last node otherwise); the walk itself does not depend on it."""
    uniforms = case["sample_uniforms"].double().clone()
    rule, paths = case["rule"], case["paths"]
    for b in range(uniforms.shape[0]):
        count = int(result.num_accepted[b])
        node = int(result.accepted_nodes[b, count - 1]) if count else 0
        candidates = torch.zeros(0, dtype=torch.long)
        if count < paths.shape[2] and paths.shape[1] > 0:
            candidates, _ = candidates_at(paths[b], node, count, rule != "spectr")
        dist = case["target_probs"][b, node].double()
        if len(candidates) > 0 and rule != "greedy":
            decision = NODE_RULES[rule](dist, case["draft_probs"][b, node], case["node_tokens"][b, candidates])
            dist = decision.residual
        cdf = dist.cumsum(0)
        if rule != "greedy" and cdf[-1] > 0:
            step = int(torch.randint(0, len(cdf), (1,), generator=generator))
            uniforms[b] = near(float(cdf[step] / cdf[-1]), generator)
    return {**case, "sample_uniforms": uniforms}


# ---------------------------------------------------------------- agreement with the reference


@pytest.mark.parametrize("rule", RULES)
def test_matches_reference_on_random_trees(rule):
    """Random tries of 1-16 nodes (a different tree in every row, padded paths), p == q, one-hot p, zeros in q, and
    in every other batch tokens not drawn from q (q(token) = 0, repeated sibling tokens); SpecTr paths are draws with
    replacement (duplicates); vocabularies of 2 to 37 tokens. 2,400 trees per rule."""
    generator = torch.Generator().manual_seed(100 + RULES.index(rule))
    for vocab in (2, 3, 4, 5, 8, 37):
        for round_ in range(25):
            case = random_case(rule, batch=16, vocab=vocab, max_nodes=16, generator=generator)
            check(with_any_tokens(case, generator) if round_ % 2 else case)


@pytest.mark.parametrize("method", sorted(DRAFTERS))
def test_matches_reference_on_drafted_trees(method):
    """Trees grown by the drafters (chains, Gumbel top-k branches, stochastic beams, SpecTr sequence tries with
    duplicate sequences), with q at nodes the draft never ran NaN, each verified by every rule."""
    generator = torch.Generator().manual_seed(200 + sorted(DRAFTERS).index(method))
    for vocab in (2, 3, 5, 8):
        for _ in range(12):
            case = drafted_case(method, batch=12, vocab=vocab, generator=generator)
            for rule in RULES:
                check(with_rule(case, rule))


@pytest.mark.parametrize("rule", RULES)
def test_matches_reference_on_thresholds(rule):
    """Accept uniforms on or one ulp off each candidate's accept probability, sample uniforms on the CDF's steps
    (where a last-bit difference in a residual changes the token)."""
    generator = torch.Generator().manual_seed(300 + RULES.index(rule))
    methods = {"rrs": ("rsd-c", "rsd-s", "sd"), "spectr": ("spectr",), "greedy": ("rsd-c", "spectr")}[rule]
    for round_ in range(36):
        vocab = (2, 3, 4, 6)[round_ % 4]
        case = random_case(rule, batch=8, vocab=vocab, max_nodes=12, generator=generator)
        if round_ % 2:
            case = with_rule(drafted_case(methods[round_ % len(methods)], batch=8, vocab=vocab, generator=generator), rule)
        if round_ % 3 == 0:
            case = with_any_tokens(case, generator)
        case = at_accept_thresholds(case, generator)
        expected = check(case)
        check(at_cdf_steps(case, expected, generator))


@pytest.mark.parametrize("rule", RULES)
def test_matches_reference_on_mixed_rows(rule):
    """Rows of different sizes in one batch: fewer paths, shallower paths, fewer node slots, empty rows (all paths
    -1), padded with NaN distributions that must not be read."""
    generator = torch.Generator().manual_seed(400 + RULES.index(rule))
    for _ in range(20):
        parts = [random_case(rule, batch=int(torch.randint(1, 4, (1,), generator=generator)), vocab=5,
                             max_nodes=int(torch.randint(1, 14, (1,), generator=generator)), generator=generator)
                 for _ in range(4)]
        empty = {**parts[0], "paths": torch.full_like(parts[0]["paths"], -1)}
        check(merged([*parts, empty]))


def test_matches_reference_on_chains():
    """One path per row (SD's chains, `_walk_chain`): rows of every length from empty to the whole chain, tokens drawn
    from q at their parent or not (q(token) = 0), p == q and one-hot p rows, uniforms on the accept thresholds and on
    the residual's CDF steps."""
    generator = torch.Generator().manual_seed(460)
    for round_ in range(60):
        case = random_case("rrs", batch=8, vocab=(2, 3, 5, 9)[round_ % 4], max_nodes=10, generator=generator)
        nodes = case["target_probs"].shape[1] - 1
        lengths = torch.randint(0, nodes + 1, (8,), generator=generator)
        depth = torch.arange(nodes)
        paths = torch.where(depth < lengths[:, None], depth + 1, -1)[:, None, :]
        tokens = case["node_tokens"].clone()
        for node in range(1, nodes + 1):  # drawn from q at the chain parent, as SD drafts (every other round: any)
            if round_ % 2 == 0:
                tokens[:, node] = torch.multinomial(case["draft_probs"][:, node - 1], 1, generator=generator)[:, 0]
        case = {**case, "paths": paths, "node_tokens": tokens,
                "accept_uniforms": torch.rand(paths.shape, generator=generator)}
        if round_ % 3 == 0:
            case = at_accept_thresholds(case, generator)
        expected = check(case)
        check(at_cdf_steps(case, expected, generator))


def test_recursive_rejection_once_q_is_exhausted():
    """The first candidates cover q's support and more follow (tokens not drawn from q): q_k sums to 0 and is kept
    as it is (`_normalize`'s fallback), the later candidates have q_k(x) = 0, and the residual after them is sampled
    on its CDF's steps."""
    generator = torch.Generator().manual_seed(450)
    batch, vocab, width = 64, 7, 4
    p = (torch.randn(batch, width + 1, vocab, generator=generator) * 2).softmax(-1)
    support = torch.randint(1, 3, (batch, 1, 1), generator=generator)
    q = torch.rand(batch, width + 1, vocab, generator=generator) * (torch.arange(vocab) < support)
    q /= q.sum(-1, keepdim=True)
    # the root's children (nodes 1..4, tried in this order): q's support in random order, then other tokens
    order = (torch.rand(batch, vocab, generator=generator) + (torch.arange(vocab) >= support[:, 0])).argsort(-1)
    tokens = torch.cat([torch.zeros(batch, 1, dtype=torch.long), order[:, :width]], 1)
    case = dict(rule="rrs", paths=torch.arange(1, width + 1).expand(batch, width)[..., None].contiguous(),
                node_tokens=tokens, target_probs=p, draft_probs=q,
                accept_uniforms=torch.full((batch, width, 1), BELOW_ONE), sample_uniforms=torch.rand(batch, generator=generator))
    expected = check(case)
    assert int((expected.num_accepted == 0).sum()) > batch // 2
    check(at_cdf_steps(case, expected, generator))


def test_matches_reference_on_a_large_vocabulary():
    """Sums over 32k tokens (a blocked / vectorised reduction) still give the reference's decisions."""
    generator = torch.Generator().manual_seed(500)
    for rule in RULES:
        case = at_accept_thresholds(random_case(rule, batch=3, vocab=32768, max_nodes=6, generator=generator), generator)
        check(case)


@pytest.mark.parametrize("rule", RULES)
def test_input_layouts_and_dtypes(rule):
    """Distributions that are slices of larger buffers (as the loop's tree.draft_probs[:, :size]), float64 and
    bfloat16 distributions, int32 paths and tokens, float64 uniforms."""
    generator = torch.Generator().manual_seed(550)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        case = random_case(rule, batch=8, vocab=6, max_nodes=10, generator=generator)
        batch, slots, vocab = case["target_probs"].shape
        for name in ("target_probs", "draft_probs"):
            if case[name] is not None:
                buffer = torch.full((batch, slots + 3, vocab), float("nan"), dtype=dtype)
                buffer[:, :slots] = case[name]
                case[name] = buffer[:, :slots]
        case = {**case, "paths": case["paths"].int(), "node_tokens": case["node_tokens"].int(),
                "accept_uniforms": case["accept_uniforms"].double(), "sample_uniforms": case["sample_uniforms"].double()}
        check(case)


@pytest.mark.parametrize("rule", RULES)
def test_empty_trees(rule):
    """No draft (paths [B, 0, 0]), paths without depth ([B, P, 0]) or without paths ([B, 0, L]), an empty batch:
    the next token comes from p at the root."""
    generator = torch.Generator().manual_seed(600)
    for batch, num_paths, depth in ((3, 0, 0), (3, 2, 0), (3, 0, 2), (0, 2, 2), (0, 0, 0)):
        probs = torch.rand(batch, 3, 7, generator=generator).softmax(-1)
        case = dict(rule=rule, paths=torch.full((batch, num_paths, depth), -1, dtype=torch.long),
                    node_tokens=torch.randint(0, 7, (batch, 3), generator=generator), target_probs=probs,
                    draft_probs=None if rule == "greedy" or num_paths == 0 else probs.flip(-1),
                    accept_uniforms=torch.rand(batch, num_paths, depth, generator=generator),
                    sample_uniforms=torch.rand(batch, generator=generator))
        check(case)


def test_spectr_rho_and_integer_power_are_the_reference_bits():
    """The batched bisection returns the reference's rho* and beta bit for bit (the sample and accept thresholds
    depend on them), and powers are the reference's repeated products."""
    from hf_specdec.verification import integer_power, spectr_rho
    from hf_specdec.verify_batched import _integer_power, _spectr_rho

    generator = torch.Generator().manual_seed(460)
    p, q = (t.double()[:, 0] for t in distributions(256, 1, 6, generator))
    draws = torch.randint(0, 9, (256,), generator=generator)
    rho, beta = _spectr_rho(p, q, draws, 8, torch.empty_like(p))
    for b in range(256):
        if draws[b] > 0:
            assert (float(rho[b]), float(beta[b])) == spectr_rho(p[b], q[b], int(draws[b]))
    base = torch.rand(256, generator=generator, dtype=torch.float64)
    powers = _integer_power(base, draws, 8)
    assert powers.tolist() == [integer_power(x, int(k)) for x, k in zip(base.tolist(), draws.tolist())]


def test_argument_errors():
    case = random_case("rrs", batch=2, vocab=5, max_nodes=4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="unknown verification rule"):
        batched({**case, "rule": "typical"})
    with pytest.raises(ValueError, match="needs draft_probs"):
        batched({**case, "draft_probs": None})


# ---------------------------------------------------------------- no host round trips


SYNCING_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy")


def counting(calls: list, name: str, original):
    """`original`, appending `name` to `calls` at each call."""
    def wrapper(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)
    return wrapper


@pytest.mark.parametrize("rule", RULES)
def test_no_host_syncs(rule, monkeypatch):
    """Nothing is read back to the host: no tensor method that copies a value to Python or to the CPU is called."""
    generator = torch.Generator().manual_seed(700)
    cases = [random_case(rule, batch=6, vocab=9, max_nodes=14, generator=generator) for _ in range(3)]
    cases.append(drafted_case("spectr" if rule == "spectr" else "rsd-c", batch=6, vocab=9, generator=generator))
    expected = [reference(with_rule(case, rule)) for case in cases]
    calls = []

    for name in SYNCING_METHODS:
        monkeypatch.setattr(torch.Tensor, name, counting(calls, name, getattr(torch.Tensor, name)))
    for name in ("unique", "nonzero", "unique_consecutive", "bincount"):
        monkeypatch.setattr(torch, name, counting(calls, f"torch.{name}", getattr(torch, name)))
    results = [batched(with_rule(case, rule)) for case in cases]
    monkeypatch.undo()
    assert calls == []
    for case, want, got in zip(cases, expected, results):
        assert_same(want, got, with_rule(case, rule))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rule", RULES)
def test_on_gpu_matches_reference_without_syncs(rule):
    """On CUDA tensors: the result stays on the GPU, equals the reference's, and no call synchronises the device."""
    generator = torch.Generator().manual_seed(800)
    for vocab in (5, 49152):
        case = random_case(rule, batch=8, vocab=vocab, max_nodes=16, generator=generator)
        on_gpu = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in case.items()}
        batched(on_gpu)  # warm-up (lazy CUDA initialisation may synchronise)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            found = batched(on_gpu)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert_same(reference(case), found, on_gpu)


# ---------------------------------------------------------------- vocabulary compaction


def compacted(case: dict) -> VerifyResult:
    return verify_tree_batched(VerifyInputs(**case), compact=True)


def dense(case: dict) -> VerifyResult:
    return verify_tree_batched(VerifyInputs(**case), compact=False)


def lumped(case: dict) -> VerifyResult:
    return verify_tree_batched(VerifyInputs(**case), compact="lumped")


def as_sparse(probs: torch.Tensor, extra: int, generator: torch.Generator) -> SparseProbs:
    """`probs` [B, S, V] as `SparseProbs`: per node its nonzero entries (NaN included) and zero entries at other
    tokens, in random order, C = the most nonzeros of a node + `extra` (at most V) entries per node."""
    nonzero = probs != 0
    entries = min(int(nonzero.sum(-1).max()) + extra, probs.shape[-1])
    key = torch.rand(probs.shape, generator=generator) + nonzero.float()
    token_ids = key.topk(entries, dim=-1).indices
    shuffled = token_ids.gather(-1, torch.rand(token_ids.shape, generator=generator).argsort(-1))
    return SparseProbs(probs.gather(-1, shuffled), shuffled, probs.shape[-1])


def sparse_forms(case: dict) -> list[dict]:
    """The case with p and q as `SparseProbs` (the loop's top-k form), and with q alone (a reduced-vocabulary draft's
    form), each with a few zero entries past the supports."""
    generator = torch.Generator().manual_seed(5)
    p, q = case["target_probs"], case["draft_probs"]
    return [{**case, "target_probs": as_sparse(p, 3, generator), "draft_probs": as_sparse(q, 2, generator)},
            {**case, "draft_probs": as_sparse(q, 1, generator)}]


def check_compaction(case: dict) -> VerifyResult:
    """Both compact verifications (forced) give the dense one's and the reference's results, and so do sparse inputs
    (`SparseProbs`) of the same problem."""
    expected = reference(case)
    assert_same(expected, dense(case), case)
    assert_same(expected, compacted(case), case)
    assert_same(expected, lumped(case), case)
    for form in sparse_forms(case):
        assert_same(expected, batched(form), case)
    return expected


def sparse(case: dict, generator: torch.Generator) -> dict:
    """p and q of `case` with zeros, as after top-k / top-p warpers: per node, only the k largest entries (k from
    1 to V, p and q independently, ties at the k-th kept), renormalised; some nodes with p == q (every residual
    (p - q)+ is zero), some with p uniform on its support (ties everywhere)."""
    out = dict(case)
    for name in ("target_probs", "draft_probs"):
        probs = case[name]
        if probs is None:
            continue
        vocab = probs.shape[-1]
        k = torch.randint(1, vocab + 1, probs.shape[:-1], generator=generator)
        kth = probs.sort(-1, descending=True).values.gather(-1, (k - 1)[..., None])
        probs = torch.where(probs >= kth, probs, 0.0)
        out[name] = probs / probs.sum(-1, keepdim=True)
    if out["draft_probs"] is not None:
        p, q = out["target_probs"], out["draft_probs"]
        kind = torch.randint(0, 4, p.shape[:-1] + (1,), generator=generator)
        p = torch.where(kind == 1, q, p)
        uniform = (p > 0).float()
        p = torch.where(kind == 2, uniform / uniform.sum(-1, keepdim=True), p)
        out["target_probs"] = p
    return out


@pytest.mark.parametrize("rule", ["rrs", "spectr"])
def test_compaction_matches_dense_on_random_trees(rule):
    """Random tries with sparse p and q (supports of any size, p == q, uniform p with ties), half of the batches with
    tokens not drawn from q (outside the parent's support, repeated, the last token), vocabularies that are and are
    not multiples of the search's block: the compact verification returns the dense one's tokens."""
    generator = torch.Generator().manual_seed(900 + ("rrs", "spectr").index(rule))
    for vocab in (2, 5, 37, 64, 130, 256):
        for round_ in range(12):
            case = sparse(random_case(rule, batch=12, vocab=vocab, max_nodes=16, generator=generator), generator)
            check_compaction(with_any_tokens(case, generator) if round_ % 2 else case)


@pytest.mark.parametrize("method", sorted(set(DRAFTERS) - {"spectr"}) + ["spectr"])
def test_compaction_matches_dense_on_drafted_trees(method):
    """Trees grown by the drafters from sparse q (rows with fewer nodes, empty rows), NaN q where the draft never
    ran: compact and dense verification agree under every sampling rule."""
    generator = torch.Generator().manual_seed(950 + sorted(DRAFTERS).index(method))
    for vocab in (3, 8, 70):
        for _ in range(8):
            case = drafted_case(method, batch=10, vocab=vocab, generator=generator)
            never_run = case["draft_probs"].isnan()
            case = sparse({**case, "draft_probs": case["draft_probs"].nan_to_num(0.5)}, generator)
            case["draft_probs"] = case["draft_probs"].masked_fill(never_run, float("nan"))
            for rule in ("rrs", "spectr"):
                check_compaction(with_rule(case, rule))


@pytest.mark.parametrize("rule", ["rrs", "spectr"])
def test_compaction_matches_the_reference_on_thresholds(rule):
    """Uniforms on or one ulp off the accept probabilities and on the residual's CDF steps of the compacted problem:
    the compact path makes the reference's decisions on it, bit for bit. (Against the whole vocabulary its sums
    run in another order, so there a uniform within a few ulps of a threshold may go the other way, as the numerics
    allow; SpecTr's bisection can widen that to ~1e-10: see the next test.)"""
    from hf_specdec.verify_batched import compact_vocabulary, expand_result

    generator = torch.Generator().manual_seed(980 + ("rrs", "spectr").index(rule))
    for round_ in range(24):
        vocab = (3, 6, 9, 70)[round_ % 4]
        case = sparse(random_case(rule, batch=8, vocab=vocab, max_nodes=12, generator=generator), generator)
        if round_ % 3 == 0:
            case = with_any_tokens(case, generator)
        inputs = VerifyInputs(**case)
        small, token_ids = compact_vocabulary(inputs)
        small_case = dict(rule=rule, paths=small.paths, node_tokens=small.node_tokens, target_probs=small.target_probs,
                          draft_probs=small.draft_probs, accept_uniforms=small.accept_uniforms,
                          sample_uniforms=small.sample_uniforms)
        small_case = at_accept_thresholds(small_case, generator)
        small_case = at_cdf_steps(small_case, reference(small_case), generator)
        case = {**case, "accept_uniforms": small_case["accept_uniforms"],
                "sample_uniforms": small_case["sample_uniforms"]}
        assert_same(expand_result(reference(small_case), inputs, token_ids), compacted(case), case)


def test_compact_spectr_rho_is_the_dense_one_up_to_summation_order():
    """SpecTr's rho* and beta on a node's support only, against the whole vocabulary: the same up to the bisection's
    resolution (a sum's last bit can move one of its 40 decisions near the feasibility boundary)."""
    from hf_specdec.verify_batched import _spectr_rho

    generator = torch.Generator().manual_seed(985)
    p, q = (t.double()[:, 0] for t in distributions(512, 1, 40, generator))
    p, q = (torch.where(t >= t.topk(12, -1).values[:, -1:], t, 0.0) for t in (p, q))
    draws = torch.randint(1, 9, (512,), generator=generator)
    support = (p > 0) | (q > 0)
    order = torch.sort((~support).to(torch.int8), dim=-1, stable=True).indices  # the support first, in token order
    rho, beta = _spectr_rho(p, q, draws, 8, torch.empty_like(p))
    small_rho, small_beta = _spectr_rho(p.gather(1, order), q.gather(1, order), draws, 8, torch.empty_like(p))
    assert (rho - small_rho).abs().max() < 1e-9 and (beta - small_beta).abs().max() < 1e-9


@pytest.mark.parametrize("rule", ["rrs", "spectr"])
def test_lumped_compaction_where_p_is_nonzero_everywhere(rule, monkeypatch):
    """Sampling without top-k: p is nonzero on the whole vocabulary, q on a draft's kept tokens or its top-k only.
    The union of the supports is the vocabulary; the default verifies SpecTr on q's support plus p's lumped rest,
    with the reference's tokens, and on the whole vocabulary where q's support is wide too (RRS always: see
    `verify_tree_batched`). (The residual's totals are sums
    in another order than the reference's, so a uniform within a few ulps of one of its CDF steps may go the other
    way, as the numerics allow.)"""
    import hf_specdec.verify_batched as verify_batched

    ran = []
    lumped_path = verify_batched._verify_lumped
    monkeypatch.setattr(verify_batched, "_verify_lumped", lambda *args: ran.append(1) or lumped_path(*args))
    generator = torch.Generator().manual_seed(970 + ("rrs", "spectr").index(rule))
    vocab = 512
    for round_ in range(16):
        case = random_case(rule, batch=6, vocab=vocab, max_nodes=14, generator=generator)
        q = case["draft_probs"]
        kept = 8 if round_ % 4 else vocab  # a top-k or reduced-vocabulary draft; the last: q everywhere too
        q = torch.where(q >= q.topk(kept, -1).values[..., -1:], q, 0.0)
        case["draft_probs"] = q / q.sum(-1, keepdim=True)
        case = with_any_tokens(case, generator) if round_ % 2 else case
        ran.clear()
        check(case)
        assert ran == ([1] if kept < vocab and rule == "spectr" else []), "lumped where it pays, else dense"
        assert_same(reference(case), lumped(case), case)
        # q as the loop gives it (`SparseProbs` of its top entries, zeros past its support): lumped on those entries
        sparse_q = {**case, "draft_probs": as_sparse(case["draft_probs"], 2, generator)}
        ran.clear()
        assert_same(reference(case), batched(sparse_q), case)
        assert ran == ([1] if min(case["paths"].shape[1:]) > 0 else []), "sparse q: lumped on its entries"


def test_compaction_when_every_residual_is_zero():
    """p == q at every node: every rejection leaves (p - q)+ = 0 (Theta is kept), and tokens outside the support
    (q = 0 there, never accepted) are candidates too; the next token comes from the kept Theta."""
    generator = torch.Generator().manual_seed(990)
    for round_ in range(20):
        case = sparse(random_case("rrs", batch=16, vocab=40, max_nodes=14, generator=generator), generator)
        case = {**case, "target_probs": case["draft_probs"].clone()}
        case = with_any_tokens(case, generator) if round_ % 2 else case
        expected = check_compaction(case)
        check_compaction(at_cdf_steps(case, expected, generator))


def test_compact_vocabulary_layout():
    """Each node's compact vocabulary is its support (p > 0, or q > 0 at a node with children) in increasing token
    order, then zero slots of the last token; every node's token is its index in its parent's support, or a zero slot
    (p = q = 0) where it is outside it."""
    from hf_specdec.verify_batched import compact_vocabulary

    generator = torch.Generator().manual_seed(995)
    case = with_any_tokens(sparse(random_case("rrs", batch=6, vocab=50, max_nodes=10, generator=generator), generator),
                           generator)
    inputs = VerifyInputs(**case)
    small, token_ids = compact_vocabulary(inputs)
    batch, slots, vocab = case["target_probs"].shape
    width = token_ids.shape[-1]
    assert small.target_probs.shape == small.draft_probs.shape == (batch, slots, width)
    has_children = torch.zeros(batch, slots, dtype=torch.bool)
    parents = torch.zeros(batch, slots, dtype=torch.long)
    for b in range(batch):
        for path in case["paths"][b].tolist():
            nodes = [0] + [n for n in path if n >= 0]
            for parent, child in zip(nodes, nodes[1:]):
                has_children[b, parent] = True
                parents[b, child] = parent
    counts, bounds = [], []
    for b in range(batch):
        for u in range(slots):
            p, q = case["target_probs"][b, u], case["draft_probs"][b, u]
            support = ((p > 0) | ((q > 0) & has_children[b, u])).nonzero().flatten()
            counts.append(len(support))
            # the width comes from a bound read in one pass: the nonzeros of p, plus q's where u has children
            bounds.append(min(int((p != 0).sum()) + int(has_children[b, u]) * int((q != 0).sum()), vocab))
            assert token_ids[b, u, : len(support)].tolist() == support.tolist()
            assert (token_ids[b, u, len(support):] == vocab - 1).all()
            assert torch.equal(small.target_probs[b, u, : len(support)], p[support].double())
            assert (small.target_probs[b, u, len(support):] == 0).all()
            if has_children[b, u]:
                assert torch.equal(small.draft_probs[b, u, : len(support)], q[support].double())
            if u > 0:
                index, parent = int(small.node_tokens[b, u]), int(parents[b, u])
                token = int(case["node_tokens"][b, u])
                if token in token_ids[b, parent].tolist()[: counts[b * slots + parent]]:
                    assert int(token_ids[b, parent, index]) == token
                else:
                    assert small.target_probs[b, parent, index] == small.draft_probs[b, parent, index] == 0
    assert width == max(bounds) + 1 >= max(counts) + 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_support_bounds_count_the_positive_entries(dtype):
    """The compact widths' bounds: per node, the entries > 0 of p (subnormals and exact ones included) plus those of
    q where the node has children, and q's alone there; q's garbage elsewhere (NaN, inf, negative, above one) is not
    read; a NaN bounds by the whole vocabulary (nothing is compacted away)."""
    from hf_specdec.verify_batched import _support_bounds

    generator = torch.Generator().manual_seed(7)
    batch, slots, vocab = 3, 5, 4096
    tiny = torch.finfo(dtype).tiny * torch.finfo(dtype).eps  # the smallest subnormal
    p = torch.rand(batch, slots, vocab, generator=generator) * (torch.rand(batch, slots, vocab, generator=generator) < 0.02)
    q = torch.rand(batch, slots, vocab, generator=generator) * (torch.rand(batch, slots, vocab, generator=generator) < 0.05)
    p, q = p.to(dtype), q.to(dtype)
    p[0, 0, :3] = torch.tensor([tiny, 1.0, tiny], dtype=dtype)
    has_children = torch.rand(batch, slots, generator=generator) < 0.5
    has_children[0, 1], has_children[1, 1] = True, False
    garbage = torch.tensor([float("nan"), float("inf"), -5.0, 3.7], dtype=dtype)
    q[1, 1, :4] = garbage  # a node without children
    draft_expected = torch.where(has_children, (q > 0).sum(-1), 0)
    expected = (p > 0).sum(-1) + draft_expected
    bounds, draft_bounds = _support_bounds(p, q, has_children)
    assert torch.equal(bounds, expected) and torch.equal(draft_bounds, draft_expected)
    bounds, draft_bounds = _support_bounds(p, None, has_children)
    assert torch.equal(bounds, (p > 0).sum(-1)) and not draft_bounds.any()
    p[2, 3, 10] = float("nan")
    q[0, 1, 7] = float("nan")  # a node with children
    bounds, draft_bounds = _support_bounds(p, q, has_children)
    assert bounds[2, 3] == vocab and draft_bounds[0, 1] == vocab
    assert bounds.dtype == draft_bounds.dtype == torch.long


@pytest.mark.parametrize("rule", ["rrs", "spectr"])
def test_compaction_on_a_large_vocabulary(rule, monkeypatch):
    """49,152 tokens with top-50 supports (as the loop sees them): the default takes the compact path (one read
    back: the compact width), q holds garbage where the draft never ran (it must not widen the support), the
    distributions are slices of larger buffers; same tokens as the dense walk and the reference."""
    import hf_specdec.verify_batched as verify_batched

    generator = torch.Generator().manual_seed(996)
    vocab = 49152
    case = random_case(rule, batch=3, vocab=vocab, max_nodes=12, generator=generator)
    for name in ("target_probs", "draft_probs"):
        logits = case[name].log()
        kth = logits.topk(50, dim=-1).values[..., -1:]
        case[name] = logits.masked_fill(logits < kth, float("-inf")).softmax(-1)
    has_children = torch.zeros(case["node_tokens"].shape, dtype=torch.bool)
    for b in range(3):
        for path in case["paths"][b].tolist():
            nodes = [0] + [n for n in path if n >= 0]
            has_children[b, nodes[:-1]] = True
    garbage = torch.rand(case["draft_probs"].shape, generator=generator)
    case["draft_probs"] = torch.where(has_children[..., None], case["draft_probs"], garbage)
    batch, slots, _ = case["target_probs"].shape
    buffer = torch.full((batch, slots + 2, vocab), float("nan"))
    buffer[:, :slots] = case["draft_probs"]
    case["draft_probs"] = buffer[:, :slots]
    calls = []
    original = verify_batched._verify_everywhere
    monkeypatch.setattr(verify_batched, "_verify_everywhere", lambda *a: calls.append(a[1].width) or original(*a))
    expected = reference(case)
    assert_same(expected, batched(case), case)
    assert calls and calls[0] <= 101  # the union of two top-50 supports, and a zero slot
    assert_same(expected, dense(case), case)


@pytest.mark.parametrize("rule", ["rrs", "spectr"])
def test_compaction_input_layouts_and_dtypes(rule):
    """Slices of larger buffers, float64 and bfloat16 distributions (and p, q of different dtypes), int32 paths and
    tokens, float64 uniforms, on the compact path."""
    generator = torch.Generator().manual_seed(997)
    for target_dtype, draft_dtype in ((torch.float32, torch.float32), (torch.float64, torch.float64),
                                      (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float64)):
        case = sparse(random_case(rule, batch=8, vocab=70, max_nodes=10, generator=generator), generator)
        batch, slots, vocab = case["target_probs"].shape
        for name, dtype in (("target_probs", target_dtype), ("draft_probs", draft_dtype)):
            buffer = torch.full((batch, slots + 3, vocab), float("nan"), dtype=dtype)
            buffer[:, :slots] = case[name]
            case[name] = buffer[:, :slots]
        case = {**case, "paths": case["paths"].int(), "node_tokens": case["node_tokens"].int(),
                "accept_uniforms": case["accept_uniforms"].double(),
                "sample_uniforms": case["sample_uniforms"].double()}
        check_compaction(case)


def test_compaction_on_mixed_and_empty_rows():
    """Rows of different sizes, padded with NaN distributions, and rows without any path, compacted."""
    generator = torch.Generator().manual_seed(998)
    for rule in ("rrs", "spectr"):
        for _ in range(8):
            parts = []
            for _ in range(3):
                nodes = int(torch.randint(1, 14, (1,), generator=generator))
                parts.append(sparse(random_case(rule, batch=2, vocab=66, max_nodes=nodes, generator=generator), generator))
            empty = {**parts[0], "paths": torch.full_like(parts[0]["paths"], -1)}
            check_compaction(merged([*parts, empty]))


def test_compaction_reads_back_once(monkeypatch):
    """On CPU the compact path reads one small tensor back (its width and the most candidates of a node); forced off,
    nothing. Greedy never compacts."""
    generator = torch.Generator().manual_seed(999)
    case = sparse(random_case("rrs", batch=4, vocab=80, max_nodes=12, generator=generator), generator)
    calls = []

    for name in SYNCING_METHODS:
        monkeypatch.setattr(torch.Tensor, name, counting(calls, name, getattr(torch.Tensor, name)))
    compacted(case)
    assert calls == ["tolist"]
    calls.clear()
    dense(case)
    verify_tree_batched(VerifyInputs(**with_rule(case, "greedy")))
    assert calls == []

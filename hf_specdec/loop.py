"""The speculative decoding loop, written once for every backend.

One step, per batch of active rows:
  1. draft: the draft model grows a tree level by level (one forward per level, tree mask over its own cache);
  2. score: the target runs the root and every draft node in one forward (tree mask + position ids);
  3. verify: the verifier walks the tree and returns the accepted path and one more token;
  4. commit: tokens are appended (stopping criteria checked after every token), both caches keep the accepted path.
The root of a step is the last committed token: the target has not seen it yet, and it is the draft's pending input.

The step stays on the models' device. Tree shapes are static per step (every level has its configured width), so
the host needs no tensor to lay out the next forward: it mirrors each row's committed length, and one host sync per
step (`StepSummary`: accepted and committed counts, finished rows) tells it all it needs. User stopping criteria
that must see every token (stop strings, custom `StoppingCriteria`), prefix-dependent logits processors, streamers
and per-token scores read more, only when they are used.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from transformers.generation import stopping_criteria as sc

from hf_specdec.backends.base import ModelBackend
from hf_specdec.cache_layout import CacheLayout
from hf_specdec.config import SpeculativeConfig
from hf_specdec.drafting import DraftProbsBuffer, compact_log_probs, make_drafter
from hf_specdec.limits import check_step_fits
from hf_specdec.processors import NodeScorer, prefix_lengths
from hf_specdec.trees import DraftTree, compact_rows
from hf_specdec.verification import SparseProbs, Verifier, VerifyInputs, rule_for_method


@contextlib.contextmanager
def host_threads(backends):
    """PyTorch's threads for the loop's own tensor work: the fewest any backend asks for (`host_threads`, e.g. 1 for
    a runtime with its own CPU thread pool, see `OrtBackend`), restored after; unchanged where none asks."""
    asked = [n for n in (getattr(backend, "host_threads", None) for backend in backends) if n]
    before = torch.get_num_threads()
    if not asked or min(asked) >= before:
        yield
        return
    torch.set_num_threads(min(asked))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class SpeculativeStats:
    """What one generate call did. Block efficiency = generated tokens / (target forwards per row)."""

    config: str
    batch_size: int
    target_calls: int = 0  # decoding forwards of the target (the prompt prefill not counted)
    draft_calls: int = 0  # draft forwards (the prompt prefill not counted)
    row_steps: int = 0  # sum over target calls of the rows they served
    generated_tokens: int = 0  # over all rows, up to and including each row's stop token
    accepted_lengths: list[list[int]] = field(default_factory=list)  # per row: accepted draft tokens at each of its steps
    time_prefill: float = 0.0
    time_draft: float = 0.0
    time_target: float = 0.0
    time_verify: float = 0.0
    time_total: float = 0.0

    @property
    def block_efficiency(self) -> float:
        return self.generated_tokens / max(self.row_steps, 1)

    def as_dict(self) -> dict:
        return {**asdict(self), "block_efficiency": self.block_efficiency}

    def summary(self) -> str:
        other = self.time_total - self.time_prefill - self.time_draft - self.time_target - self.time_verify
        per_step = 1e3 / max(self.target_calls, 1)
        return (
            f"{self.config}: {self.generated_tokens} tokens in {self.time_total:.2f}s, "
            f"block efficiency {self.block_efficiency:.2f}, {self.target_calls} target / {self.draft_calls} draft calls; "
            f"per step: draft {self.time_draft * per_step:.1f} ms, target {self.time_target * per_step:.1f} ms, "
            f"verify {self.time_verify * per_step:.1f} ms, other {other * per_step:.1f} ms"
        )


@dataclass
class DecodeResult:
    sequences: torch.Tensor
    stats: SpeculativeStats
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None


def check_prompt(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    """Prompts the loop can continue: at least one token, every row with a real last token."""
    if input_ids.shape[1] == 0:
        raise ValueError(
            f"the prompt is empty (input_ids of shape {list(input_ids.shape)}): give every row at least one token, "
            "e.g. the tokenizer's bos_token_id"
        )
    empty_rows = (~attention_mask.any(1)).nonzero().flatten().tolist()
    if empty_rows:
        raise ValueError(
            f"row(s) {empty_rows} of the batch are all padding (attention_mask is 0 everywhere): remove them, or give "
            "each at least one token (e.g. the tokenizer's bos_token_id)"
        )
    if not attention_mask[:, -1].all():
        raise ValueError("the last prompt token of every row must be a real token: pad on the left (padding_side='left')")


class _Timer:
    """Wall-clock phases. On CUDA a phase boundary synchronises (so that asynchronous kernels are charged to the
    right phase), which costs a host sync per phase: only when `profile` (statistics requested)."""

    def __init__(self, device: torch.device, profile: bool):
        self.sync = device.type == "cuda" and profile
        self.enabled = device.type != "cuda" or profile

    def now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()


@dataclass
class StopRule:
    """The stopping criteria generate() builds (max length, eos ids) as tensors, checked for all rows and tokens at
    once; `per_token` holds any other criterion (stop strings, a user's), which must see every token in turn."""

    max_length: int
    eos_ids: torch.Tensor | None
    per_token: sc.StoppingCriteriaList | None

    @classmethod
    def from_criteria(cls, criteria, max_length: int, device: torch.device) -> "StopRule":
        criteria = list(criteria or [])
        eos = [c.eos_token_id for c in criteria if isinstance(c, sc.EosTokenCriteria)]
        lengths = [c.max_length for c in criteria if isinstance(c, sc.MaxLengthCriteria)]
        others = [c for c in criteria if not isinstance(c, (sc.EosTokenCriteria, sc.MaxLengthCriteria))]
        return cls(
            max_length=min([max_length, *lengths]),
            eos_ids=torch.cat([e.flatten().to(device) for e in eos]) if eos else None,
            per_token=sc.StoppingCriteriaList(others) if others else None,
        )


@dataclass
class DecodeState:
    """What the loop carries between steps, indexed by active row a (`rows[a]`: its row in the caller's batch).
    Host mirrors (`host_*`) are kept from each step's summary, so that laying out a step reads no tensor."""

    rows: torch.Tensor  # [A]
    root_positions: torch.Tensor  # [A] position id of the last committed token (the next step's root)
    target_layout: CacheLayout
    draft_layout: CacheLayout | None
    # the draft's inputs not yet in its cache, right-aligned in K slots, the root last (see `DraftInputs`)
    draft_pending: torch.Tensor | None  # [A, K] tokens
    draft_pending_valid: torch.Tensor | None  # [A, K]
    draft_pending_features: torch.Tensor | None  # [A, K, H] the target's feature before each (feature drafts)
    host_rows: list[int]
    host_lengths: list[int]  # committed tokens (left padding included) per active row
    host_pending: list[int]  # valid entries of draft_pending per row

    def select(self, keep: list[int]) -> torch.Tensor:
        """Keep these active rows; returns their index tensor (the backends select the same)."""
        index = torch.tensor(keep, dtype=torch.long, device=self.rows.device)
        self.rows, self.root_positions = self.rows[index], self.root_positions[index]
        self.target_layout.select_rows(index)
        if self.draft_layout is not None:
            self.draft_layout.select_rows(index)
            self.draft_pending, self.draft_pending_valid = self.draft_pending[index], self.draft_pending_valid[index]
            if self.draft_pending_features is not None:
                self.draft_pending_features = self.draft_pending_features[index]
        self.host_rows = [self.host_rows[a] for a in keep]
        self.host_lengths = [self.host_lengths[a] for a in keep]
        self.host_pending = [self.host_pending[a] for a in keep]
        return index


@dataclass(frozen=True)
class DraftInputs:
    """What the draft reads and keeps, by kind of draft.

    A standalone draft (tokens only) keeps the K/V of every accepted node it ran: its pending inputs are at most the
    deepest accepted node (when it was a leaf the draft never ran) and the root, K = 2.
    A feature draft (`reads_features`) reads the target's feature at the previous position with every token; its tree
    nodes ran on its own predicted features, so their K/V are dropped, and the accepted path is read again with the
    target's features: its pending inputs are the accepted path and the root, K = depth + 1."""

    reads_features: bool
    width: int  # K

    @classmethod
    def for_draft(cls, draft: ModelBackend, config: SpeculativeConfig) -> "DraftInputs":
        reads = bool(getattr(draft, "reads_features", False))
        return cls(reads, config.depth + 1 if reads else 2)

    def unkept_accepted(self, num_accepted, levels_run: int):
        """Accepted nodes whose draft K/V is not kept (they become pending inputs); per row, as ints or a tensor."""
        if self.reads_features:
            return num_accepted
        unkept = num_accepted - levels_run
        return unkept.clamp(min=0) if isinstance(unkept, torch.Tensor) else max(unkept, 0)


def gather_nodes(values: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
    """values [A, N, H] at nodes [A, n] -> [A, n, H]."""
    return values.gather(1, nodes[..., None].expand(-1, -1, values.shape[-1]))


@dataclass
class DraftStep:
    """What drafting leaves for keeping the draft cache after verification."""

    paths: torch.Tensor  # [A, P, depth] the verifier's root-to-leaf paths
    block_start: int  # first draft cache slot of this step
    pending_slots: torch.Tensor  # [A, 2] slots of the pending inputs
    node_slots: torch.Tensor  # [A, N+1] slot of every node the draft ran, -1 for the others
    levels_run: int  # tree levels whose nodes the draft ran (all but the last)


@dataclass
class StepSummary:
    """The one host read of a step."""

    num_accepted: list[int]
    committed: list[int]
    finished: list[bool]


@dataclass
class Output:
    """What the caller gets, indexed by its own rows."""

    sequences: torch.Tensor  # [B, W] committed tokens, left padding included
    lengths: torch.Tensor  # [B]
    stats: SpeculativeStats
    scores: list[list[torch.Tensor]] | None
    logits: list[list[torch.Tensor]] | None


class SpeculativeDecoder:
    def __init__(
        self,
        target: ModelBackend,
        draft: ModelBackend | None,
        config: SpeculativeConfig,
        logits_processor,
        stopping_criteria,
        do_sample: bool,
        max_length: int,
        pad_token_id: int | None,
        verifier: Verifier,
        streamer=None,
        output_scores: bool = False,
        output_logits: bool = False,
        profile: bool = True,
    ):
        """`verifier`: any implementation of the verifier interface (`hf_specdec.verification.Verifier`).
        `profile`: time the phases (on CUDA that synchronises at each phase boundary)."""
        if config.is_speculative and draft is None:
            raise ValueError(f"speculative_config={str(config)!r} needs a draft model: pass draft_model=...")
        self.target, self.draft, self.config = target, draft, config
        self.scorer = NodeScorer(logits_processor)
        self.stopping_criteria = stopping_criteria
        self.do_sample, self.max_length, self.pad_token_id = do_sample, max_length, pad_token_id
        self.streamer = streamer
        self.output_scores, self.output_logits = output_scores, output_logits
        self.verifier = verifier
        self.profile = profile
        self.rule = rule_for_method(config.method, do_sample)
        self.drafter = make_drafter(config, greedy=not do_sample) if config.is_speculative else None
        self.draft_inputs = DraftInputs.for_draft(draft, config) if self.drafter is not None else None
        self._draft_probs = DraftProbsBuffer()  # storage reused by every step, not state

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> DecodeResult:
        with host_threads(self._backends()):
            return self._generate(input_ids, attention_mask)

    def _backends(self) -> tuple:
        return (self.target, self.draft) if self.drafter is not None else (self.target,)

    def _generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> DecodeResult:
        device = input_ids.device
        timer = _Timer(device, self.profile)
        start_time = timer.now()
        batch, prompt_length = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        attention_mask = attention_mask.bool()
        check_prompt(input_ids, attention_mask)
        if prompt_length >= self.max_length:  # as generate refuses it
            raise ValueError(f"the prompt has {prompt_length} tokens but max_length is {self.max_length}: increase "
                             "max_length or, better, set max_new_tokens")
        width = self.max_length + self.config.depth + 2  # room for one step past max_length
        check_step_fits(self.config, batch, self.target.vocab_size, width, self.do_sample, device)
        stop = StopRule.from_criteria(self.stopping_criteria, self.max_length, device)
        if batch > 1 and stop.per_token is not None and stop.eos_ids is None:
            # without an eos token, generate keeps generating real tokens in a row its criterion stopped until every
            # row has stopped; this loop ends a row where it stops
            raise ValueError(
                "with batch size > 1, stop strings or custom stopping criteria need an eos token: set eos_token_id "
                "(e.g. to the tokenizer's eos_token_id), or generate one row at a time"
            )

        out = Output(
            sequences=torch.full((batch, width), self.pad_token_id or 0, dtype=torch.long, device=device),
            lengths=torch.full((batch,), prompt_length, dtype=torch.long, device=device),
            stats=SpeculativeStats(config=str(self.config), batch_size=batch, accepted_lengths=[[] for _ in range(batch)]),
            scores=[[] for _ in range(batch)] if self.output_scores else None,
            logits=[[] for _ in range(batch)] if self.output_logits else None,
        )
        out.sequences[:, :prompt_length] = input_ids
        if self.streamer is not None:
            self.streamer.put(input_ids.cpu())

        # position ids as generate computes them: count of real tokens before, pads at 1
        positions = torch.where(attention_mask, attention_mask.long().cumsum(1) - 1, 1)
        state = self._prefill(input_ids, positions, attention_mask)
        out.stats.time_prefill = timer.now() - start_time

        while state.host_rows:
            self._step(state, out, stop, timer)

        if self.streamer is not None:
            self.streamer.end()
        longest = int(out.lengths.max())
        for backend in self._backends():
            backend.finish(longest - prompt_length)
        out.stats.time_total = timer.now() - start_time
        return self._result(out, longest)

    # ------------------------------------------------------------------ steps
    def _prefill(self, input_ids, positions, attention_mask) -> DecodeState:
        """Both caches take the prompt but its last token (the first step's root)."""
        batch, device = input_ids.shape[0], input_ids.device
        root_positions = positions[:, -1].clone()
        prompt_lengths = root_positions + 1  # real tokens per row
        state = DecodeState(
            rows=torch.arange(batch, device=device),
            root_positions=root_positions,
            target_layout=CacheLayout(batch, device),
            draft_layout=CacheLayout(batch, device) if self.drafter is not None else None,
            draft_pending=None,
            draft_pending_valid=None,
            draft_pending_features=None,
            host_rows=list(range(batch)),
            host_lengths=[input_ids.shape[1]] * batch,
            host_pending=[1] * batch,
        )
        reads_features = self.drafter is not None and self.draft_inputs.reads_features
        self.target.reset(batch, prompt_lengths)
        features = None
        if input_ids.shape[1] > 1:
            slots = state.target_layout.append(attention_mask[:, :-1], positions[:, :-1])
            features = self.target.prefill(input_ids[:, :-1], positions[:, :-1], state.target_layout.mask(slots),
                                           state.target_layout.positions, return_features=reads_features)
        if self.drafter is None:
            return state
        # the draft's first pending input: the root, the last prompt token (with the feature before it)
        width = self.draft_inputs.width
        state.draft_pending = input_ids.new_zeros(batch, width)
        state.draft_pending[:, -1] = input_ids[:, -1]
        state.draft_pending_valid = torch.zeros(batch, width, dtype=torch.bool, device=device)
        state.draft_pending_valid[:, -1] = True
        self.draft.reset(batch, prompt_lengths)
        if reads_features:
            state.draft_pending_features = torch.zeros(batch, width, self.target.hidden_size, device=device,
                                                       dtype=features.dtype if features is not None else torch.float32)
        if input_ids.shape[1] == 1:
            return state
        draft_features = None
        if reads_features:
            # token t is read with the target's feature at t - 1; a row's first real token with zeros
            before = F.pad(attention_mask[:, :-1], (1, 0), value=False)[..., None]  # [B, P, 1]: t - 1 is a real token
            shifted = F.pad(features, (0, 0, 1, 0))
            draft_features = shifted[:, :-1] * before[:, :-1]
            state.draft_pending_features[:, -1] = shifted[:, -1] * before[:, -1]
        slots = state.draft_layout.append(attention_mask[:, :-1], positions[:, :-1])
        self.draft.prefill(input_ids[:, :-1], positions[:, :-1], state.draft_layout.mask(slots),
                           state.draft_layout.positions, features=draft_features)
        return state

    def _step(self, state: DecodeState, out: Output, stop: StopRule, timer: _Timer) -> None:
        rows = state.rows
        lengths = state.host_lengths
        root_tokens = out.sequences[rows, out.lengths[rows] - 1]
        # no deeper than the row with the most room left needs
        depth = min(self.config.depth, max(self.max_length - min(lengths) - 1, 0))
        device = root_tokens.device

        tick = timer.now()
        tree = DraftTree(
            root_tokens,
            capacity=self.config.tree_size,
            max_depth=self.config.depth,
            # q is recorded in storage kept between steps (see `DraftProbsBuffer`)
            draft_probs=self._draft_probs.start((len(rows), self.config.tree_size + 1, self.target.vocab_size), device)
            if (self.do_sample and depth > 0) else None,
        )
        draft = self._draft(state, out, tree, depth) if depth > 0 else None
        tock = timer.now()

        size = tree.size
        node_ids = torch.arange(size, device=device).expand(len(rows), size)
        tokens = tree.tokens[:, :size]
        positions = state.root_positions[:, None] + tree.depths[:, :size]
        target_start = state.target_layout.length
        slots = state.target_layout.append(tree.valid[:, :size], positions, torch.where(node_ids == 0, -1, node_ids))
        mask = state.target_layout.mask(slots, tree.ancestors)
        logits, target_features = self.target.forward(
            tokens, positions, mask, state.target_layout.positions,
            return_features=draft is not None and self.draft_inputs.reads_features)
        tick2 = timer.now()

        scores, target_probs = self._target_probs(logits, out, state, tree, draft is not None)
        paths = draft.paths if draft is not None else torch.zeros(len(rows), 0, 0, dtype=torch.long, device=device)
        result = self.verifier(VerifyInputs(
            rule=self.rule,
            paths=paths,
            node_tokens=tokens,
            target_probs=target_probs,
            draft_probs=None if tree.draft_probs is None else tree.draft_probs.probs(size),
            accept_uniforms=torch.rand(paths.shape, device=device),
            sample_uniforms=torch.rand(len(rows), device=device),
            max_children=self.drafter.max_children() if draft is not None else None,
        ))
        tock2 = timer.now()
        if timer.enabled:
            out.stats.time_draft += tock - tick
            out.stats.time_target += tick2 - tock
            out.stats.time_verify += tock2 - tick2

        new_tokens = self._new_tokens(result.accepted_tokens, result.num_accepted, result.next_tokens)
        if stop.per_token is None:
            summary = self._commit(state, out, stop, new_tokens, result.num_accepted)
        else:
            summary = self._commit_per_token(state, out, stop, new_tokens, result.num_accepted)
        self._record(state, out, summary, result.accepted_nodes, new_tokens, scores, logits)
        self._keep_accepted(state, target_start, result.accepted_nodes, result.num_accepted, new_tokens,
                            draft, target_features, summary)
        if any(summary.finished):
            self._drop_rows(state, [a for a, done in enumerate(summary.finished) if not done])

    def _target_probs(self, logits, out: Output, state: DecodeState, tree: DraftTree, drafted: bool):
        """(scores [B, N+1, V] or None, p): the target's processed scores at the tree's nodes and what the verifier
        reads, p (sampling) or the scores (greedy). Where a top-k warper bounds p's support and the draft's q came
        sparse too, p is `SparseProbs` on each node's highest logits (`NodeScorer.top_support`): the processors and
        the softmax run on C entries per node instead of the vocabulary (scores then None: not asked for). On the
        CPU only: learning whether ties overflow the entries is a read back, which a GPU would wait on, and a GPU's
        vocabulary-wide passes are cheap."""
        rows, size = state.rows, tree.size
        if (self.do_sample and drafted and not self.output_scores and tree.draft_probs.sparse is not None
                and logits.device.type == "cpu"
                and (capacity := self.scorer.support_capacity(self.target.vocab_size)) is not None):
            node_prefix_lengths = prefix_lengths(state.host_lengths, tree.node_depths(), logits.device) \
                if self.scorer.reads_prefix_lengths else None
            top = self.scorer.top_support(logits, rows, capacity, node_prefix_lengths)
            if top is not None:
                return None, SparseProbs(top[0].softmax(-1), top[1], self.target.vocab_size)
        scores = self.scorer(logits, out.sequences[rows], tree.path_tokens[:, :size], rows, state.host_lengths,
                             tree.node_depths())
        return scores, scores.softmax(-1) if self.do_sample else scores

    def _draft(self, state: DecodeState, out: Output, tree: DraftTree, depth: int) -> DraftStep:
        """Grow the draft tree to `depth` levels."""
        batch, device = len(state.rows), state.rows.device
        layout = state.draft_layout
        draft_state = self.drafter.start(tree)
        # level 0: the pending inputs, right-aligned, the root last; its logits give q at the root
        width = state.draft_pending.shape[1]
        pending_positions = (state.root_positions[:, None] + torch.arange(1 - width, 1, device=device)).clamp(min=0)
        block_start = layout.length
        pending_slots = layout.append(state.draft_pending_valid, pending_positions)
        logits, features = self.draft.forward(state.draft_pending, pending_positions, layout.mask(pending_slots),
                                              layout.positions, features=state.draft_pending_features)
        logits = logits[:, -1:]
        out.stats.draft_calls += 1
        # a feature draft's input at a node is its own predicted feature of the node's parent
        node_features = None
        if features is not None:
            node_features = features.new_zeros(batch, tree.tokens.shape[1], features.shape[-1])
            node_features[:, 0] = features[:, -1]
        # cache slot of every node the draft has run (the root's slot is among the pending ones)
        node_slots = torch.full((batch, tree.tokens.shape[1]), -1, dtype=torch.long, device=device)
        frontier = torch.zeros(batch, 1, dtype=torch.long, device=device)
        frontier_valid = torch.ones(batch, 1, dtype=torch.bool, device=device)
        levels_run = 0
        first = 0  # the frontier's nodes: first .. tree.size - 1
        for level in range(1, depth + 1):
            logq, token_ids = self._draft_log_probs(state, out, logits, tree, frontier, first)
            first = tree.size
            new_nodes = self.drafter.expand(tree, draft_state, frontier, frontier_valid, logq, token_ids)
            if level == depth:
                break
            new_valid = tree.valid.gather(1, new_nodes)
            grows = new_valid
            if self.config.min_path_q:
                # a dynamic tree: only nodes the draft itself reaches with probability >= q grow children (a decision
                # on q alone, so every verifier stays exact); none left: the tree ends at this level
                grows = new_valid & (tree.path_log_q.gather(1, new_nodes) >= math.log(self.config.min_path_q))
                if not bool(grows.any()):  # a host read per level, for dynamic trees only
                    break
            positions = (state.root_positions[:, None] + level).expand_as(new_nodes)
            slots = layout.append(new_valid, positions, new_nodes)
            mask = layout.mask(slots, tree.ancestors)
            parents = tree.parents.gather(1, new_nodes).clamp(min=0)
            parent_features = None if node_features is None else gather_nodes(node_features, parents)
            logits, features = self.draft.forward(tree.tokens.gather(1, new_nodes), positions, mask, layout.positions,
                                                  features=parent_features)
            out.stats.draft_calls += 1
            if node_features is not None:
                node_features.scatter_(1, new_nodes[..., None].expand_as(features), features)
            node_slots.scatter_(1, new_nodes, slots)
            frontier, frontier_valid = new_nodes, grows
            levels_run = level
        return DraftStep(self.drafter.paths(tree, draft_state), block_start, pending_slots, node_slots, levels_run)

    def _draft_log_probs(self, state, out, logits: torch.Tensor, tree: DraftTree, nodes: torch.Tensor,
                         first: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """log q at `nodes` [B, n] (one level: nodes first .. first + n - 1): the draft's logits through the same
        processors as the target; sampling drafters record q in the tree for the verifier. Where q's support is
        known to be small, drafting works on it only and this returns compact log q [B, n, C] with its token ids
        [B, n, C]: under a top-k warper (`compact_log_probs`, or, when the processors allow,
        `NodeScorer.on_top_logits`: processed on the C highest logits only), or on a reduced-vocabulary draft's kept
        tokens (`NodeScorer.on_entries`). Else dense log q [B, n, V] and None."""
        vocab = self.target.vocab_size
        if logits.shape[-1] != vocab:
            raise ValueError(f"draft logits have {logits.shape[-1]} entries, the target's vocabulary {vocab}")
        depths = [tree.depth] * nodes.shape[1]
        node_prefix_lengths = prefix_lengths(state.host_lengths, depths, logits.device) \
            if self.scorer.reads_prefix_lengths else None
        capacity = None if tree.draft_probs is None else self.scorer.support_capacity(vocab)  # None: greedy, no top-k
        top = None if capacity is None else self.scorer.on_top_logits(logits, state.rows, capacity, node_prefix_lengths)
        support = getattr(self.draft, "logit_support", None)
        if top is None and support is not None and (capacity is None or capacity > len(support)):
            scores = self.scorer.on_entries(logits[..., support], state.rows, support, node_prefix_lengths)
            if scores is not None:
                top = scores, support.expand(*scores.shape)
        if top is not None:
            scores, token_ids = top
            logq = scores.log_softmax(-1)
        else:
            path_tokens = tree.path_tokens.gather(1, nodes[..., None].expand(-1, -1, tree.path_tokens.shape[-1]))
            scores = self.scorer(logits, out.sequences[state.rows], path_tokens, state.rows, state.host_lengths, depths)
            if capacity is None:
                logq, token_ids = scores.log_softmax(-1), None
            else:
                logq, token_ids = compact_log_probs(scores, capacity)
        if tree.draft_probs is not None:
            tree.draft_probs.record(first, first + nodes.shape[1], logq, token_ids)
        return logq, token_ids

    @staticmethod
    def _new_tokens(accepted_tokens, num_accepted, next_tokens) -> torch.Tensor:
        """[A, depth + 1]: the accepted tokens, then the next token (what follows is never committed)."""
        offsets = torch.arange(accepted_tokens.shape[1] + 1, device=next_tokens.device)
        padded = torch.cat([accepted_tokens, next_tokens[:, None]], 1)
        return torch.where(offsets == num_accepted[:, None], next_tokens[:, None], padded)

    def _commit(self, state, out, stop: StopRule, new_tokens, num_accepted) -> StepSummary:
        """Append each row's new tokens up to its first stop (eos, max length), for all rows and tokens at once."""
        rows = state.rows
        lengths = out.lengths[rows]
        offsets = torch.arange(new_tokens.shape[1], device=new_tokens.device)
        limit = torch.minimum(num_accepted + 1, stop.max_length - lengths)
        count = limit
        if stop.eos_ids is not None:
            eos = torch.isin(new_tokens, stop.eos_ids) & (offsets < limit[:, None])
            first_eos = torch.where(eos.any(1), eos.to(torch.int8).argmax(1) + 1, limit)
            count = torch.minimum(limit, first_eos)
            finished = eos.any(1)
        else:
            finished = torch.zeros_like(limit, dtype=torch.bool)
        finished = finished | (lengths + count >= stop.max_length)
        self._write(out, rows, lengths, new_tokens, count)
        summary = torch.stack([num_accepted, count, finished.long()]).tolist()  # the step's host sync
        return StepSummary(summary[0], summary[1], [bool(f) for f in summary[2]])

    def _commit_per_token(self, state, out, stop: StopRule, new_tokens, num_accepted) -> StepSummary:
        """Criteria that must see every token (stop strings, a user's): appended and checked one token at a time."""
        host_accepted = num_accepted.tolist()
        host_tokens = new_tokens.tolist()
        eos = set() if stop.eos_ids is None else set(stop.eos_ids.tolist())
        committed, finished = [], []
        for a, row in enumerate(state.host_rows):
            length, done = state.host_lengths[a], False
            for token in host_tokens[a][: host_accepted[a] + 1]:
                out.sequences[row, length] = token
                length += 1
                done = length >= stop.max_length or token in eos or bool(stop.per_token(out.sequences[row : row + 1, :length], None).any())
                if done:
                    break
            out.lengths[row] = length
            committed.append(length - state.host_lengths[a])
            finished.append(done)
        return StepSummary(host_accepted, committed, finished)

    @staticmethod
    def _write(out, rows, lengths, new_tokens, count) -> None:
        offsets = torch.arange(new_tokens.shape[1], device=new_tokens.device)
        columns = lengths[:, None] + offsets
        written = offsets < count[:, None]
        rows_2d = rows[:, None].expand_as(columns)
        out.sequences[rows_2d, columns] = torch.where(written, new_tokens, out.sequences[rows_2d, columns])
        out.lengths[rows] = lengths + count

    def _record(self, state, out, summary: StepSummary, accepted_nodes, new_tokens, scores, logits) -> None:
        """Statistics, and what was asked for per token (scores, logits, streamed text)."""
        stats = out.stats
        stats.target_calls += 1
        stats.row_steps += len(state.host_rows)
        stats.generated_tokens += sum(summary.committed)
        for a, row in enumerate(state.host_rows):
            stats.accepted_lengths[row].append(summary.num_accepted[a])
            state.host_lengths[a] += summary.committed[a]
        if out.scores is not None or out.logits is not None:
            # the node whose distribution produced each token: the root, then the accepted path
            source_nodes = torch.cat([accepted_nodes.new_zeros(len(accepted_nodes), 1), accepted_nodes.clamp(min=0)], 1)
            for a, row in enumerate(state.host_rows):
                nodes = source_nodes[a, : summary.committed[a]]
                if out.scores is not None:
                    out.scores[row].extend(scores[a, nodes].unbind(0))
                if out.logits is not None:
                    out.logits[row].extend(logits[a, nodes].unbind(0))
        if self.streamer is not None:
            self.streamer.put(new_tokens[0, : summary.committed[0]].cpu())

    def _keep_accepted(self, state, target_start, accepted, num_accepted, new_tokens, draft, target_features,
                       summary) -> None:
        """Both caches keep the root and the accepted path; the next token becomes the next step's root."""
        width = max(summary.num_accepted)
        root = accepted.new_zeros(len(accepted), 1)
        # target: the root's slot, then the accepted nodes' slots (node n sits at target_start + n)
        keep_valid = torch.cat([root == 0, accepted[:, :width] >= 0], 1)
        keep_slots = target_start + torch.cat([root, accepted[:, :width].clamp(min=0)], 1)
        self.target.keep(target_start, keep_slots)
        state.target_layout.keep(target_start, keep_slots, keep_valid)
        if draft is not None:
            self._keep_draft(state, draft, accepted, num_accepted, new_tokens, target_features, summary)
        state.root_positions = state.root_positions + num_accepted + 1

    def _keep_draft(self, state, draft: DraftStep, accepted, num_accepted, new_tokens, target_features,
                    summary) -> None:
        """The draft keeps its pending inputs and, unless it reads features, the accepted nodes it ran (levels
        1..levels_run), compacted. Its next pending inputs: the accepted nodes it keeps no K/V of, then the next token
        (right-aligned, see `DraftInputs`)."""
        inputs = self.draft_inputs
        node_slots = draft.node_slots.gather(1, accepted.clamp(min=0))
        processed = (accepted >= 0) & (node_slots >= 0) & (not inputs.reads_features)
        unkept = [inputs.unkept_accepted(n, draft.levels_run) for n in summary.num_accepted]
        kept = [pending + n - u for pending, n, u in zip(state.host_pending, summary.num_accepted, unkept)]
        keep_valid, keep_slots = compact_rows(
            torch.cat([state.draft_pending_valid, processed], 1),
            torch.cat([draft.pending_slots, node_slots.clamp(min=draft.block_start)], 1),
            width=max(kept),
        )
        self.draft.keep(draft.block_start, keep_slots)
        state.draft_layout.keep(draft.block_start, keep_slots, keep_valid)
        # pending slot k holds new token j = n - (K - 1) + k: valid from the first unkept accepted node on
        width = inputs.width
        index = num_accepted[:, None] - (width - 1) + torch.arange(width, device=accepted.device)
        num_unkept = inputs.unkept_accepted(num_accepted, draft.levels_run)
        state.draft_pending = new_tokens.gather(1, index.clamp(min=0))
        state.draft_pending_valid = index >= (num_accepted - num_unkept)[:, None]
        if inputs.reads_features:
            # the feature before new token j: the target's at the root (j = 0) or at accepted node j - 1
            sources = torch.cat([accepted.new_zeros(len(accepted), 1), accepted.clamp(min=0)], 1)
            state.draft_pending_features = gather_nodes(target_features, sources.gather(1, index.clamp(min=0)))
        state.host_pending = [u + 1 for u in unkept]

    def _drop_rows(self, state: DecodeState, keep: list[int]) -> None:
        if not keep:
            state.host_rows = []
            return
        index = state.select(keep)
        self.target.select_rows(index)
        if self.drafter is not None:
            self.draft.select_rows(index)

    # ------------------------------------------------------------------ output
    def _result(self, out: Output, longest: int) -> DecodeResult:
        sequences = out.sequences[:, :longest].clone()
        beyond = torch.arange(longest, device=sequences.device)[None, :] >= out.lengths[:, None]
        if (out.lengths < longest).any():
            if self.pad_token_id is None:
                raise ValueError("rows finished at different lengths and pad_token_id is not set; set pad_token_id")
            sequences[beyond] = self.pad_token_id
        return DecodeResult(sequences, out.stats, self._stack(out.scores), self._stack(out.logits))

    @staticmethod
    def _stack(per_row: list[list[torch.Tensor]] | None) -> tuple[torch.Tensor, ...] | None:
        """Per generated position, a [B, V] tensor, as generate returns; a row that had already finished gets zeros
        there (generate would score the pad token it appends: a row is not scored after it finishes)."""
        if per_row is None:
            return None
        longest = max(len(r) for r in per_row)
        template = next(r[0] for r in per_row if r)
        return tuple(
            torch.stack([r[i] if i < len(r) else torch.zeros_like(template) for r in per_row]) for i in range(longest)
        )

"""The speculative decoding loop, written once for every backend.

One step, per batch of active rows:
  1. draft: the draft model grows a tree level by level (one forward per level, tree mask over its own cache);
  2. score: the target runs the root and every draft node in one forward (tree mask + position ids);
  3. verify: the verifier walks the tree and returns the accepted path and one more token;
  4. commit: tokens are appended (stopping criteria checked after every token), both caches keep the accepted path.
The root of a step is the last committed token: the target has not seen it yet, and it is the draft's pending input.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from hf_specdec.backends.base import ModelBackend
from hf_specdec.cache_layout import CacheLayout
from hf_specdec.config import SpeculativeConfig
from hf_specdec.drafting import make_drafter
from hf_specdec.limits import check_step_fits
from hf_specdec.processors import NodeScorer
from hf_specdec.trees import DraftTree, compact_rows
from hf_specdec.verification import rule_for_method, verify_tree


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
    """Wall-clock phases; synchronises CUDA so that asynchronous kernels are charged to the right phase."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


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
        streamer=None,
        output_scores: bool = False,
        output_logits: bool = False,
        verifier=verify_tree,
    ):
        """`verifier`: `verify_tree` or an implementation with its signature (a kernel, an engine)."""
        if config.is_speculative and draft is None:
            raise ValueError(f"speculative_config={str(config)!r} needs a draft model: pass draft_model=...")
        self.target, self.draft, self.config = target, draft, config
        self.scorer = NodeScorer(logits_processor)
        self.stopping_criteria = stopping_criteria
        self.do_sample, self.max_length, self.pad_token_id = do_sample, max_length, pad_token_id
        self.streamer = streamer
        self.output_scores, self.output_logits = output_scores, output_logits
        self.verifier = verifier
        self.rule = rule_for_method(config.method, do_sample)
        self.drafter = make_drafter(config, greedy=not do_sample) if config.is_speculative else None

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> DecodeResult:
        device = input_ids.device
        timer = _Timer(device)
        start_time = timer.now()
        batch, prompt_length = input_ids.shape
        self.stats = SpeculativeStats(config=str(self.config), batch_size=batch, accepted_lengths=[[] for _ in range(batch)])
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        attention_mask = attention_mask.bool()
        check_prompt(input_ids, attention_mask)
        width = max(self.max_length, prompt_length) + self.config.depth + 2
        check_step_fits(self.config, batch, self.target.vocab_size, width, self.do_sample, device)

        # committed tokens of every row (left padding included, as in generate); room for one step past max_length
        self.sequences = torch.full((batch, width), self.pad_token_id or 0, dtype=torch.long, device=device)
        self.sequences[:, :prompt_length] = input_ids
        self.lengths = torch.full((batch,), prompt_length, dtype=torch.long, device=device)
        self.rows = torch.arange(batch, device=device)  # original index of each active row
        self.kept_scores = [[] for _ in range(batch)] if self.output_scores else None
        self.kept_logits = [[] for _ in range(batch)] if self.output_logits else None
        if self.streamer is not None:
            self.streamer.put(input_ids.cpu())

        # position ids as generate computes them: count of real tokens before, pads at 1
        positions = torch.where(attention_mask, attention_mask.long().cumsum(1) - 1, 1)
        self.root_positions = positions[:, -1].clone()
        self._prefill(input_ids[:, :-1], positions[:, :-1], attention_mask[:, :-1])
        self.stats.time_prefill = timer.now() - start_time

        while len(self.rows):
            self._step(timer)

        if self.streamer is not None:
            self.streamer.end()
        generated = int(self.lengths.max()) - prompt_length
        for backend in (self.target, self.draft) if self.drafter is not None else (self.target,):
            backend.finish(generated)
        self.stats.time_total = timer.now() - start_time
        return self._result()

    # ------------------------------------------------------------------ steps
    def _prefill(self, input_ids, positions, valid):
        batch = input_ids.shape[0]
        self.target_layout = CacheLayout(batch, input_ids.device)
        prompt_lengths = self.root_positions + 1  # real tokens per row
        self.target.reset(batch, prompt_lengths)
        models = [(self.target, self.target_layout)]
        if self.drafter is not None:
            self.draft_layout = CacheLayout(batch, input_ids.device)
            self.draft.reset(batch, prompt_lengths)
            models.append((self.draft, self.draft_layout))
            # the draft's inputs not yet in its cache: the root (and, after a step, a leaf it never processed)
            self.draft_pending = input_ids.new_zeros(batch, 2)
            self.draft_pending_valid = torch.zeros(batch, 2, dtype=torch.bool, device=input_ids.device)
        if input_ids.shape[1] == 0:
            return
        for backend, layout in models:
            slots = layout.append(valid, positions)
            backend.prefill(input_ids, positions, layout.mask(slots), layout.positions)

    def _step(self, timer: _Timer) -> None:
        rows = self.rows
        root_tokens = self.sequences[rows, self.lengths[rows] - 1]
        remaining = int((self.max_length - self.lengths[rows]).max())
        depth = min(self.config.depth, max(remaining - 1, 0))

        tick = timer.now()
        tree = DraftTree(
            root_tokens,
            capacity=self.config.tree_size,
            max_depth=self.config.depth,
            vocab_size=self.target.vocab_size if (self.do_sample and depth > 0) else None,
        )
        paths = torch.zeros(len(rows), 0, 0, dtype=torch.long, device=root_tokens.device)
        if depth > 0:
            paths = self._draft(tree, root_tokens, depth)
        tock = timer.now()
        self.stats.time_draft += tock - tick

        size = tree.size
        node_ids = torch.arange(size, device=root_tokens.device).expand(len(rows), size)
        tokens = tree.tokens[:, :size]
        positions = self.root_positions[:, None] + tree.depths[:, :size]
        start = self.target_layout.length
        slots = self.target_layout.append(tree.valid[:, :size], positions, torch.where(node_ids == 0, -1, node_ids))
        mask = self.target_layout.mask(slots, tree.ancestors)
        logits = self.target.forward(tokens, positions, mask, self.target_layout.positions)
        tick = timer.now()
        self.stats.time_target += tick - tock

        scores = self.scorer(
            logits, self.sequences[rows], self.lengths[rows], tree.path_tokens[:, :size], tree.depths[:, :size], rows
        )
        target_probs = scores.softmax(-1) if self.do_sample else scores
        result = self.verifier(
            self.rule,
            paths,
            tokens,
            target_probs,
            None if tree.draft_probs is None else tree.draft_probs[:, :size],
            torch.rand(paths.shape, device=paths.device),
            torch.rand(len(rows), device=paths.device),
        )
        self.stats.time_verify += timer.now() - tick

        accepted = result.accepted_nodes.to(root_tokens.device)
        num_accepted = result.num_accepted.to(root_tokens.device)
        next_tokens = result.next_tokens.to(root_tokens.device)
        self.stats.target_calls += 1
        self.stats.row_steps += len(rows)
        finished = self._commit(tree, accepted, num_accepted, next_tokens, scores, logits)
        self._keep_accepted(start, accepted, num_accepted, tree, next_tokens)
        if finished.any():
            self._drop_rows(~finished)

    def _draft(self, tree: DraftTree, root_tokens: torch.Tensor, depth: int) -> torch.Tensor:
        """Grow the draft tree to `depth` levels; return its verification paths."""
        rows = self.rows
        batch = len(rows)
        layout = self.draft_layout
        self.drafter.start(tree)
        # level 0: the pending inputs, the root last; its logits give q at the root
        self.draft_pending[:, 1] = root_tokens
        self.draft_pending_valid[:, 1] = True
        pending_positions = (self.root_positions[:, None] + torch.tensor([-1, 0], device=root_tokens.device)).clamp(min=0)
        self.draft_block_start = layout.length
        self.draft_pending_slots = layout.append(self.draft_pending_valid, pending_positions)
        mask = layout.mask(self.draft_pending_slots)
        logits = self.draft.forward(self.draft_pending, pending_positions, mask, layout.positions)[:, -1:]
        self.stats.draft_calls += 1
        # cache slot of every node the draft has run (the root's slot is among the pending ones)
        self.draft_node_slots = torch.full((batch, tree.tokens.shape[1]), -1, dtype=torch.long, device=root_tokens.device)
        frontier = torch.zeros(batch, 1, dtype=torch.long, device=root_tokens.device)
        frontier_valid = torch.ones(batch, 1, dtype=torch.bool, device=root_tokens.device)
        for level in range(1, depth + 1):
            logq = self._draft_log_probs(logits, tree, frontier)
            new_nodes = self.drafter.expand(tree, frontier, frontier_valid, logq)
            if level == depth or new_nodes.shape[1] == 0:
                break
            new_valid = tree.valid.gather(1, new_nodes)
            positions = self.root_positions[:, None] + level
            positions = positions.expand_as(new_nodes)
            slots = layout.append(new_valid, positions, new_nodes)
            mask = layout.mask(slots, tree.ancestors)
            logits = self.draft.forward(tree.tokens.gather(1, new_nodes), positions, mask, layout.positions)
            self.stats.draft_calls += 1
            self.draft_node_slots.scatter_(1, new_nodes, slots)
            frontier, frontier_valid = new_nodes, new_valid
        return self.drafter.paths(tree)

    def _draft_log_probs(self, logits: torch.Tensor, tree: DraftTree, nodes: torch.Tensor) -> torch.Tensor:
        """log q at `nodes` [B, n]: the draft's logits through the same processors as the target; sampling
        drafters record q in the tree for the verifier."""
        rows = self.rows
        path_tokens = tree.path_tokens.gather(1, nodes[..., None].expand(-1, -1, tree.path_tokens.shape[-1]))
        scores = self.scorer(logits, self.sequences[rows], self.lengths[rows], path_tokens, tree.depths.gather(1, nodes), rows)
        vocab = self.target.vocab_size
        if scores.shape[-1] != vocab:
            raise ValueError(f"draft logits have {scores.shape[-1]} entries, the target's vocabulary {vocab}")
        logq = scores.log_softmax(-1)
        if tree.draft_probs is not None:
            row_index = torch.arange(len(rows), device=nodes.device)[:, None]
            tree.draft_probs[row_index, nodes] = logq.exp()
        return logq

    def _commit(self, tree, accepted, num_accepted, next_tokens, scores, logits) -> torch.Tensor:
        """Append accepted tokens and the next token row by row, checking the stopping criteria after each token.
        Returns which active rows finished."""
        finished = torch.zeros(len(self.rows), dtype=torch.bool)
        for b, row in enumerate(self.rows.tolist()):
            count = int(num_accepted[b])
            self.stats.accepted_lengths[row].append(count)
            new_tokens = torch.cat([tree.tokens[b, accepted[b, :count]], next_tokens[b : b + 1]])
            # the node whose distribution produced each token: the root, then the accepted path
            source_nodes = torch.cat([accepted.new_zeros(1), accepted[b, :count]])
            length = int(self.lengths[row])
            committed = 0
            for token in new_tokens:
                self.sequences[row, length] = token
                length += 1
                committed += 1
                if self.stopping_criteria(self.sequences[row : row + 1, :length], None).any():
                    finished[b] = True
                    break
            self.lengths[row] = length
            self.stats.generated_tokens += committed
            if self.kept_scores is not None:
                self.kept_scores[row].extend(scores[b, source_nodes[:committed]].unbind(0))
            if self.kept_logits is not None:
                self.kept_logits[row].extend(logits[b, source_nodes[:committed]].unbind(0))
            if self.streamer is not None:
                self.streamer.put(new_tokens[:committed].cpu())
        return finished.to(self.rows.device)

    def _keep_accepted(self, target_start, accepted, num_accepted, tree, next_tokens) -> None:
        """Both caches keep the root and the accepted path; the next token becomes the next step's root."""
        width = int(num_accepted.max())
        root = accepted.new_zeros(len(accepted), 1)
        # target: the root's slot, then the accepted nodes' slots (node n sits at target_start + n)
        keep_valid = torch.cat([root == 0, accepted[:, :width] >= 0], 1)
        keep_slots = target_start + torch.cat([root, accepted[:, :width].clamp(min=0)], 1)
        self.target.keep(target_start, keep_slots)
        self.target_layout.keep(target_start, keep_slots, keep_valid)

        if self.drafter is not None and tree.depth > 0:
            self._keep_draft(accepted, num_accepted, tree, next_tokens)
        self.root_positions = self.root_positions + num_accepted + 1

    def _keep_draft(self, accepted, num_accepted, tree, next_tokens) -> None:
        node_slots = self.draft_node_slots.gather(1, accepted.clamp(min=0))
        processed = (accepted >= 0) & (node_slots >= 0)
        keep_valid, keep_slots = compact_rows(
            torch.cat([self.draft_pending_valid, processed], 1),
            torch.cat([self.draft_pending_slots, node_slots.clamp(min=self.draft_block_start)], 1),
        )
        self.draft.keep(self.draft_block_start, keep_slots)
        self.draft_layout.keep(self.draft_block_start, keep_slots, keep_valid)
        # the deepest accepted node is pending if the draft never ran it (it was a leaf of the last level)
        last = accepted.gather(1, (num_accepted - 1).clamp(min=0)[:, None]).squeeze(1)
        leaf_pending = (num_accepted > 0) & (self.draft_node_slots.gather(1, last.clamp(min=0)[:, None]).squeeze(1) < 0)
        self.draft_pending = torch.stack([tree.tokens.gather(1, last.clamp(min=0)[:, None]).squeeze(1), next_tokens], 1)
        self.draft_pending_valid = torch.stack([leaf_pending, torch.ones_like(leaf_pending)], 1)

    def _drop_rows(self, keep: torch.Tensor) -> None:
        index = keep.nonzero().squeeze(-1)
        self.rows = self.rows[index]
        self.root_positions = self.root_positions[index]
        if len(index) == 0:
            return
        self.target.select_rows(index)
        self.target_layout.select_rows(index)
        if self.drafter is not None:
            self.draft.select_rows(index)
            self.draft_layout.select_rows(index)
            self.draft_pending, self.draft_pending_valid = self.draft_pending[index], self.draft_pending_valid[index]

    # ------------------------------------------------------------------ output
    def _result(self) -> DecodeResult:
        longest = int(self.lengths.max())
        sequences = self.sequences[:, :longest].clone()
        pad = self.pad_token_id
        beyond = torch.arange(longest, device=sequences.device)[None, :] >= self.lengths[:, None]
        if beyond.any():
            if pad is None:
                raise ValueError("rows finished at different lengths and pad_token_id is not set; set pad_token_id")
            sequences[beyond] = pad
        return DecodeResult(sequences, self.stats, self._stack(self.kept_scores), self._stack(self.kept_logits))

    @staticmethod
    def _stack(per_row: list[list[torch.Tensor]] | None) -> tuple[torch.Tensor, ...] | None:
        """Per generated position, a [B, V] tensor (zeros for rows that had already finished), as generate returns."""
        if per_row is None:
            return None
        longest = max(len(r) for r in per_row)
        template = next(r[0] for r in per_row if r)
        return tuple(
            torch.stack([r[i] if i < len(r) else torch.zeros_like(template) for r in per_row]) for i in range(longest)
        )

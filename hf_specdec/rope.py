"""Rotary embeddings whose frequencies depend on the sequence length, computed per token as plain decoding does.

transformers' "longrope" (Phi-3) and "dynamic" (NTK) rotary embeddings choose their frequencies in every forward from
the largest position id of the call (`dynamic_rope_update`): plain decoding rotates each token with the frequencies
of the one-token forward that processed it, and the cache keeps keys rotated at their own time. A tree step holds
positions up to root + depth for all rows at once, so left to itself it would rotate every node with the frequencies
of its deepest node (and of the most advanced row).

`PlainDecodingRope` makes each token's rotation the one plain decoding gives it. Plain decoding processes column c of
the (left-padded) batch in a forward whose largest position is c - min_padding, so a token is rotated for the
sequence length S = max(position + row_offset, prompt_length - 1) + 1, where row_offset is the row's padding beyond
the least padded row and prompt_length the longest real prompt (the prompt is one forward). The frequencies for each S
come from replaying transformers' own update on the module, once per S in the order plain decoding visits them, so
whatever state the module carries (dynamic NTK keeps the longest length it has seen, across calls too) is followed;
at the end the module is left as plain decoding leaves it.
"""

from __future__ import annotations

import contextlib

import torch


def _rope_types(module) -> list[str]:
    rope_type = getattr(module, "rope_type", None)
    if isinstance(rope_type, dict):
        return list(rope_type.values())
    return [rope_type] if isinstance(rope_type, str) else []


def length_dependent(module: torch.nn.Module) -> bool:
    """A rotary embedding whose frequencies transformers recomputes from the sequence length in every forward."""
    decorated = hasattr(type(module).forward, "__wrapped__")
    return decorated and any("dynamic" in t or t == "longrope" for t in _rope_types(module))


def _layer_types(module) -> list[str | None]:
    return list(module.rope_type) if isinstance(module.rope_type, dict) else [None]


def _state(module) -> dict:
    """The attributes transformers' frequency update reads and writes (buffers, lengths, scalings)."""
    return {
        name: value.clone() if isinstance(value, torch.Tensor) else value
        for name, value in {**vars(module), **module._buffers}.items()
        if not name.startswith("_") and isinstance(value, (torch.Tensor, int, float)) and not isinstance(value, bool)
    }


def _restore(module, state: dict) -> None:
    for name, value in state.items():
        setattr(module, name, value.clone() if isinstance(value, torch.Tensor) else value)


@contextlib.contextmanager
def state_preserved(model):
    """Forwards that are not part of a generation (timing the kernels, calibrating the planner) leave the
    length-dependent rotary modules as they found them: dynamic NTK would otherwise keep the measurement's length."""
    modules = [m for m in model.modules() if length_dependent(m)]
    states = [_state(m) for m in modules]
    try:
        yield
    finally:
        for module, state in zip(modules, states):
            _restore(module, state)


class _ModuleSchedule:
    """One rotary module: its state after plain decoding's forward of each sequence length S (replayed in order)."""

    def __init__(self, module, first_length: int, device: torch.device):
        self.module, self.device = module, device
        self.inner = type(module).forward.__wrapped__  # the forward without transformers' frequency update
        self.first_length = first_length
        self.states: list[dict] = []  # states[i]: after the forward of sequence length first_length + i

    def state_for(self, length: int) -> dict:
        if len(self.states) <= length - self.first_length and self.states:
            _restore(self.module, self.states[-1])  # the replay goes on from the last length it reached
        while len(self.states) <= length - self.first_length:
            seq_len = self.first_length + len(self.states)
            positions = torch.tensor([[seq_len - 1]], device=self.device)
            probe = torch.zeros(1, device=self.device)
            for layer_type in _layer_types(self.module):
                # the decorated forward: transformers updates the module's frequencies for this length
                type(self.module).forward(self.module, probe, positions, *([layer_type] if layer_type else []))
            self.states.append(_state(self.module))
        return self.states[length - self.first_length]

    def rotary(self, x, position_ids, lengths: torch.Tensor, layer_type=None):
        """cos, sin for every token with the frequencies of its own sequence length `lengths` [B, T]."""
        current = _state(self.module)
        extra = [layer_type] if layer_type is not None else []
        cos = sin = None
        for length in torch.unique(lengths).tolist():
            _restore(self.module, self.state_for(length))
            cos_s, sin_s = self.inner(self.module, x, position_ids, *extra)
            chosen = (lengths == length)[..., None]
            cos = cos_s if cos is None else torch.where(chosen, cos_s, cos)
            sin = sin_s if sin is None else torch.where(chosen, sin_s, sin)
        _restore(self.module, current)
        return cos, sin


class PlainDecodingRope:
    """Per-token length-dependent rotary embeddings for one model, during one generate call (see the module doc)."""

    def __init__(self, modules: list[torch.nn.Module]):
        self.modules = modules
        self.schedules: list[_ModuleSchedule] = []
        self.row_offsets: torch.Tensor | None = None

    @classmethod
    def for_model(cls, model) -> "PlainDecodingRope | None":
        modules = [m for m in model.modules() if length_dependent(m)]
        return cls(modules) if modules else None

    def start(self, prompt_lengths: torch.Tensor) -> None:
        """A new call; `prompt_lengths` [B]: real (unpadded) prompt tokens per row."""
        self.first_length = int(prompt_lengths.max())
        self.row_offsets = self.first_length - prompt_lengths
        self.schedules = [_ModuleSchedule(m, self.first_length, prompt_lengths.device) for m in self.modules]

    def select_rows(self, rows: torch.Tensor) -> None:
        self.row_offsets = self.row_offsets[rows]

    def lengths(self, position_ids: torch.Tensor) -> torch.Tensor:
        """The sequence length of plain decoding's forward that processes each token [B, T]."""
        return (position_ids + self.row_offsets[:, None]).clamp(min=self.first_length - 1) + 1

    def patched(self, position_ids: torch.Tensor):
        """Context: the rotary modules compute per-token frequencies for this forward's `position_ids`."""
        lengths = self.lengths(position_ids)
        return _Patched([(s, lengths) for s in self.schedules])

    def finish(self, generated_tokens: int) -> None:
        """Leave every module as plain decoding leaves it after `generated_tokens` new tokens (its last forward had
        sequence length first_length + generated_tokens - 1)."""
        last = self.first_length + max(generated_tokens - 1, 0)
        for schedule in self.schedules:
            _restore(schedule.module, schedule.state_for(last))


class _Patched:
    def __init__(self, schedules):
        self.schedules = schedules

    def __enter__(self):
        for schedule, lengths in self.schedules:
            def forward(x, position_ids, layer_type=None, schedule=schedule, lengths=lengths):
                return schedule.rotary(x, position_ids, lengths, layer_type)

            schedule.module.forward = forward

    def __exit__(self, *exc):
        for schedule, _ in self.schedules:
            del schedule.module.forward


def check_supported(model, attention_mask: torch.Tensor, max_length: int) -> None:
    """Refuse the one case of a length-dependent rotary embedding that the loop cannot reproduce.

    Phi-3's generate (`prepare_inputs_for_generation`) recomputes the whole cache when the sequence grows past
    original_max_position_embeddings, so that every cached key switches to the long factors at once. That happens
    when the prompt's padded width is at most that length and the output crosses it; it changes the keys' rotation
    only if some row has no left padding (otherwise the recompute still uses the short factors, which the per-token
    schedule reproduces).
    """
    for module in model.modules():
        if not length_dependent(module) or "longrope" not in _rope_types(module):
            continue
        parameters = module.config.rope_parameters
        parameters = next(iter(parameters.values())) if "rope_type" not in parameters else parameters
        switch = parameters.get("original_max_position_embeddings") or getattr(module.config, "original_max_position_embeddings")
        width = attention_mask.shape[1]
        unpadded_row = bool(attention_mask[:, 0].bool().any())
        if width <= switch and max_length >= switch + 2 and unpadded_row:
            raise ValueError(
                f"rope_type='longrope': this generation crosses original_max_position_embeddings={switch}, where "
                f"{type(model).__name__}'s generate recomputes the whole cache with the long factors, which speculative "
                f"decoding cannot reproduce exactly; keep prompt + max_new_tokens <= {switch + 1} tokens, or use plain "
                "generate() for outputs that cross it (prompts longer than it are fine)"
            )

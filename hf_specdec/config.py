"""`SpeculativeConfig`: which draft tree to build and how to verify it.

String grammar (round-trips through `SpeculativeConfig.parse(str(cfg))`):

    ar                  no speculation: the target decodes one token per forward pass
    sd:l=L              a chain of L draft tokens (speculative decoding)
    spectr:k=K,l=L      K i.i.d. draft sequences of length L merged into a trie (SpecTr)
    rsd-c:b=3-2-2       RSD with a constant branching tree: b_l children per node at depth l
    rsd-s:w=W,d=L       RSD with stochastic beam search: width W, depth L
    auto                the planner picks one of the above for this model, device and batch size

Any tree may add `,q=Q` (0 < Q < 1): a dynamic tree that grows a node's children only while the draft's own
probability of the path to the node is at least Q (`min_path_q`), and stops drafting when no node qualifies. The
decisions depend on q alone, so every verifier stays exact; the shape above is then the largest tree.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

METHODS = ("ar", "sd", "spectr", "rsd-c", "rsd-s", "auto")

GRAMMAR = "ar | sd:l=L | spectr:k=K,l=L | rsd-c:b=B1-B2-... | rsd-s:w=W,d=L | auto (trees may add ,q=Q)"

_KEYS = {"ar": (), "auto": (), "sd": ("l",), "spectr": ("k", "l"), "rsd-c": ("b",), "rsd-s": ("w", "d")}


@dataclass(frozen=True)
class SpeculativeConfig:
    """A draft tree shape and its verifier. Build one with `parse` or the class methods below."""

    method: str
    depth: int = 0  # L: draft tokens on the longest path = sequential draft forward passes per step
    num_sequences: int = 1  # K (spectr)
    branching: tuple[int, ...] = ()  # b_1..b_L (rsd-c)
    beam_width: int = 1  # W (rsd-s)
    min_path_q: float = 0.0  # Q: grow only nodes whose path probability under q is at least this (0: static)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown speculative method {self.method!r}; expected one of {', '.join(METHODS)}")
        if self.method == "rsd-c":
            object.__setattr__(self, "branching", tuple(int(b) for b in self.branching))
            object.__setattr__(self, "depth", len(self.branching))
            if not self.branching or min(self.branching) < 1:
                raise ValueError(f"rsd-c needs branching factors >= 1, got {self.branching!r}")
        elif self.method in ("sd", "spectr", "rsd-s") and self.depth < 1:
            raise ValueError(f"{self.method} needs a depth >= 1, got {self.depth}")
        if self.method == "spectr" and self.num_sequences < 1:
            raise ValueError(f"spectr needs k >= 1 sequences, got {self.num_sequences}")
        if self.method == "rsd-s" and self.beam_width < 1:
            raise ValueError(f"rsd-s needs a beam width >= 1, got {self.beam_width}")
        if not 0.0 <= self.min_path_q < 1.0 or (self.min_path_q and not self.is_speculative):
            raise ValueError(f"q (the minimum path probability of a dynamic tree) must be in [0, 1) and apply to a "
                             f"tree, got q={self.min_path_q} for {self.method}")

    # ---------------------------------------------------------------- constructors
    @classmethod
    def ar(cls) -> "SpeculativeConfig":
        return cls("ar")

    @classmethod
    def sd(cls, length: int) -> "SpeculativeConfig":
        return cls("sd", depth=length)

    @classmethod
    def spectr(cls, num_sequences: int, length: int) -> "SpeculativeConfig":
        return cls("spectr", depth=length, num_sequences=num_sequences)

    @classmethod
    def rsd_c(cls, branching) -> "SpeculativeConfig":
        return cls("rsd-c", branching=tuple(branching))

    @classmethod
    def rsd_s(cls, beam_width: int, depth: int) -> "SpeculativeConfig":
        return cls("rsd-s", depth=depth, beam_width=beam_width)

    @classmethod
    def parse(cls, text: "str | SpeculativeConfig") -> "SpeculativeConfig":
        if isinstance(text, SpeculativeConfig):
            return text
        if not isinstance(text, str):
            raise TypeError(f"speculative_config must be a string or SpeculativeConfig, got {type(text).__name__}")
        spec = text.strip().lower()
        method, _, args = spec.partition(":")
        if method not in _KEYS:
            raise ValueError(f"cannot parse speculative_config {text!r}: unknown method {method!r}; grammar: {GRAMMAR}")
        values = {}
        allowed = _KEYS[method] + (("q",) if _KEYS[method] else ())  # every tree may be dynamic
        for item in filter(None, args.split(",")):
            key, eq, value = item.partition("=")
            if not eq or key not in allowed or key in values:
                raise ValueError(f"cannot parse speculative_config {text!r}: bad field {item!r}; grammar: {GRAMMAR}")
            values[key] = value
        if not set(_KEYS[method]) <= set(values):
            missing = ", ".join(k for k in _KEYS[method] if k not in values)
            raise ValueError(f"cannot parse speculative_config {text!r}: missing {missing}; grammar: {GRAMMAR}")
        try:
            min_path_q = float(values.pop("q", 0.0))
            if method == "rsd-c":
                if not re.fullmatch(r"\d+(-\d+)*", values["b"]):
                    raise ValueError
                return cls("rsd-c", branching=tuple(int(b) for b in values["b"].split("-")), min_path_q=min_path_q)
            ints = {k: int(v) for k, v in values.items()}
        except ValueError:
            raise ValueError(f"cannot parse speculative_config {text!r}: values must be integers (q a number); "
                             f"grammar: {GRAMMAR}")
        if method == "sd":
            return cls("sd", depth=ints["l"], min_path_q=min_path_q)
        if method == "spectr":
            return cls("spectr", depth=ints["l"], num_sequences=ints["k"], min_path_q=min_path_q)
        if method == "rsd-s":
            return cls("rsd-s", depth=ints["d"], beam_width=ints["w"], min_path_q=min_path_q)
        return cls(method)

    def __str__(self) -> str:
        dynamic = f",q={self.min_path_q:g}" if self.min_path_q else ""
        if self.method == "sd":
            return f"sd:l={self.depth}{dynamic}"
        if self.method == "spectr":
            return f"spectr:k={self.num_sequences},l={self.depth}{dynamic}"
        if self.method == "rsd-c":
            return "rsd-c:b=" + "-".join(map(str, self.branching)) + dynamic
        if self.method == "rsd-s":
            return f"rsd-s:w={self.beam_width},d={self.depth}{dynamic}"
        return self.method

    # ---------------------------------------------------------------- shape
    def level_widths(self) -> tuple[int, ...]:
        """Maximum number of draft nodes at depths 1..L."""
        if self.method == "sd":
            return (1,) * self.depth
        if self.method == "spectr":
            return (self.num_sequences,) * self.depth
        if self.method == "rsd-c":
            return tuple(math.prod(self.branching[: l + 1]) for l in range(self.depth))
        if self.method == "rsd-s":
            return (self.beam_width,) * self.depth
        return ()

    def largest_shape(self) -> "SpeculativeConfig":
        """The same tree without dynamic growth (its largest shape)."""
        return SpeculativeConfig(self.method, self.depth, self.num_sequences, self.branching, self.beam_width)

    def truncated(self, depth: int) -> "SpeculativeConfig":
        """The largest shape cut to its first `depth` levels, as the loop drafts it with fewer tokens left to generate
        (plain decoding at depth 0)."""
        if depth >= self.depth:
            return self.largest_shape()
        if depth <= 0:
            return SpeculativeConfig.ar()
        branching = self.branching[:depth] if self.branching else self.branching
        return SpeculativeConfig(self.method, depth, self.num_sequences, branching, self.beam_width)

    @property
    def tree_size(self) -> int:
        """Maximum number of draft tokens the target scores per step (the budget, excluding the root)."""
        return sum(self.level_widths())

    @property
    def is_speculative(self) -> bool:
        return self.method not in ("ar", "auto")

"""The loop's own cost per step, measured on this machine: what a step spends outside the models' forwards.

A speculative step is both models' forwards plus the loop's work around them: drafting bookkeeping per draft pass,
the draft's processors and sampling per node it expands, the target's processors and softmaxes per scored token,
verification (recursive rejection on a tree tests vocabulary-wide distributions once per candidate it walks, min(N,
L + P) of them, where a chain's walk is a few gathers per depth; SpecTr solves for rho by bisection at every depth;
greedy compares argmaxes at every depth) and the commit. On a CPU with a 49k vocabulary that is several milliseconds
per step and grows with the tree (deep trees spent as much on verification as on the target forward), so a step model
of forwards alone under-predicts exactly the shapes it should warn against.

`loop_cost` measures it once per device, vocabulary, draft kind, batch size and sampling settings (cached): the real
loop runs a few design shapes with near-free models of the pair's vocabulary (`overhead.py`: 1 layer, hidden 64; a
feature draft where the pair has one, with the draft's kept vocabulary), every forward timed and subtracted, and a
non-negative least-squares fit over the terms above predicts any shape. Each shape generates enough tokens that most
of its steps draft to full depth (the loop drafts no deeper than the tokens left to generate, so a short run would
measure shallower trees than the shape's). HF `generate` is measured the same way: its own overhead per token is what
plain decoding adds to the target's one-token forward.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hf_specdec.config import SpeculativeConfig
from hf_specdec.planner.storage import cache_dir, slug
from hf_specdec.planner.trees import draft_pass_tokens
from hf_specdec.verification import rule_for_method

TERMS = ("per step", "per draft pass", "per drafted node", "per scored token", "per verification walk step",
         "per SpecTr depth")
# shapes the fit is measured on: chains, wide and deep trees of every method (about 30 s at batch 1, a minute at
# batch 4, on 2 CPU cores with a 49k vocabulary)
DESIGN = ("sd:l=1", "sd:l=4", "sd:l=8", "rsd-c:b=4-1", "rsd-c:b=2-2-1-1", "rsd-s:w=2,d=4", "rsd-s:w=4,d=8",
          "spectr:k=2,l=4", "spectr:k=4,l=8")
FORMAT = 2
# the modules whose code a step runs besides the two models' forwards: a measurement cached by other code is stale
LOOP_MODULES = ("loop.py", "generation.py", "processors.py", "drafting.py", "trees.py", "verification.py",
                "verify_batched.py", "cache_layout.py", "backends/hf.py", "backends/cpu_kernels.py")


def loop_code_fingerprint() -> str:
    """A short hash of `LOOP_MODULES`' source: a cached loop cost measured another release's loop (a faster
    verifier, other processors) is measured again rather than charged to this one."""
    import hashlib

    import hf_specdec

    root = Path(hf_specdec.__file__).parent
    digest = hashlib.sha1()
    for name in LOOP_MODULES:
        digest.update((root / name).read_bytes())
    return digest.hexdigest()[:12]


@dataclass(frozen=True)
class Sampling:
    """The generation settings that change the loop's own work: the verification rule and the processors' supports
    (top-k 50, transformers' default, leaves a few dozen tokens per node; top-k 0 the whole vocabulary)."""

    do_sample: bool = True
    top_k: int = 50
    top_p: float = 1.0
    min_p: float | None = None

    @classmethod
    def of(cls, generation_config) -> "Sampling":
        if not generation_config.do_sample:
            return cls.greedy()
        return cls(True, int(generation_config.top_k or 0), float(generation_config.top_p or 1.0),
                   generation_config.min_p)

    @classmethod
    def greedy(cls) -> "Sampling":
        return cls(False, 0, 1.0, None)

    def generate_kwargs(self) -> dict:
        if not self.do_sample:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": 1.0, "top_k": self.top_k, "top_p": self.top_p, "min_p": self.min_p}

    def key(self) -> str:
        if not self.do_sample:
            return "greedy"
        return f"sample-k{self.top_k}-p{self.top_p:g}" + (f"-minp{self.min_p:g}" if self.min_p else "")


def terms(config: SpeculativeConfig, do_sample: bool) -> np.ndarray:
    """A shape's coefficients on TERMS. Walk steps: RRS on a tree min(N, L + P) candidate tests, greedy one per
    depth; none for an RRS chain (its walk is gathers, in the per-node terms) or SpecTr (its own per-depth term)."""
    passes = draft_pass_tokens(config)
    size, depth = config.tree_size, config.depth
    paths = config.level_widths()[-1]  # leaves: every path ends at the last level
    rule = rule_for_method(config.method, do_sample)
    walk = {"rrs": min(size, depth + paths) if paths > 1 else 0, "greedy": depth}.get(rule, 0)
    return np.array([1.0, len(passes), sum(passes), size + 1.0, walk, depth if rule == "spectr" else 0.0])


@dataclass(frozen=True)
class LoopCost:
    """Seconds per step outside the forwards: `coefficients` on TERMS; `plain_seconds`: HF generate's per token."""

    coefficients: tuple[float, ...]
    plain_seconds: float
    samples: tuple[tuple[str, float], ...] = ()  # (config, measured seconds) the fit came from
    do_sample: bool = True

    def seconds(self, config: SpeculativeConfig) -> float:
        if not config.is_speculative:
            return self.plain_seconds
        return float(terms(config, self.do_sample) @ np.array(self.coefficients))

    def to_json(self) -> dict:
        return {"format": FORMAT, "code": loop_code_fingerprint(), **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: dict) -> "LoopCost":
        return cls(tuple(data["coefficients"]), data["plain_seconds"], tuple(map(tuple, data["samples"])),
                   data["do_sample"])


def fit(samples: list[tuple[str, float]], plain_seconds: float, do_sample: bool) -> LoopCost:
    """The non-negative coefficients that best explain `samples` (relative errors, as the forward calibration)."""
    from hf_specdec.planner.calibration import nonnegative_least_squares

    measured = np.array([seconds for _, seconds in samples])
    a = np.array([terms(SpeculativeConfig.parse(config), do_sample) for config, _ in samples]) / measured[:, None]
    coefficients = nonnegative_least_squares(a, np.ones(len(samples)))
    return LoopCost(tuple(float(c) for c in coefficients), plain_seconds, tuple(samples), do_sample)


def near_free_pair(target_model, draft_model):
    """Near-free stand-ins for the pair on the target's device: the target's vocabulary, and a draft of the same kind
    (a feature draft keeps the real draft's output vocabulary)."""
    from hf_specdec.feature_draft import FeatureDraftConfig, FeatureDraftForCausalLM, reads_target_features
    from hf_specdec.overhead import near_free_model

    vocab, device = target_model.config.get_text_config().vocab_size, target_model.device
    target = near_free_model(vocab, device)
    if not reads_target_features(draft_model):
        return target, near_free_model(vocab, device, seed=1)
    draft_config = FeatureDraftConfig(
        vocab_size=vocab, hidden_size=target.config.hidden_size, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096, tie_word_embeddings=False,
        kept_token_ids=list(draft_model.config.kept_token_ids), oov_embedding_rank=4, pad_token_id=0)
    return target, FeatureDraftForCausalLM(draft_config).to(device).eval()


def design_new_tokens(config: SpeculativeConfig) -> int:
    """Tokens a design run generates: the stand-ins accept almost nothing, so a step commits about one token, and all
    but the last `depth` steps draft to full depth."""
    return 4 * config.depth + 8


def measure_loop_cost(target_model, draft_model, batch: int, sampling: Sampling, repeats: int = 2,
                      progress: bool = True) -> LoopCost:
    """Run the design shapes and HF generate with near-free stand-ins of the pair (see the module docstring), each
    the least of `repeats` runs (the noise of a shared machine only adds)."""
    from tqdm.auto import tqdm

    from hf_specdec.overhead import loop_overhead, plain_overhead

    target, draft = near_free_pair(target_model, draft_model)
    samples = []
    for config in tqdm(DESIGN, desc="timing the loop", disable=not progress, unit="shape"):
        new_tokens = design_new_tokens(SpeculativeConfig.parse(config))
        samples.append((config, loop_overhead(target, draft, config, batch, new_tokens, sampling.generate_kwargs(),
                                              repeats)))
    plain = plain_overhead(target, batch, 16, sampling.generate_kwargs(), repeats)
    return fit(samples, plain, sampling.do_sample)


def loop_cost_path(target_model, draft_model, batch: int, sampling: Sampling) -> Path:
    from hf_specdec.feature_draft import reads_target_features
    from hf_specdec.planner.calibration import device_name

    vocab = target_model.config.get_text_config().vocab_size
    kind = f"feature{len(draft_model.config.kept_token_ids)}" if reads_target_features(draft_model) else "standalone"
    name = f"v{vocab}-{kind}-b{batch}-{sampling.key()}.json"
    return cache_dir() / "loop_cost" / slug(device_name(target_model.device)) / name


_LOADED: dict[Path, LoopCost] = {}  # read (or measured) once per process


def loop_cost(target_model, draft_model, batch: int, sampling: Sampling, progress: bool = True) -> LoopCost:
    """The cached measurement for this pair's kind, device, batch size and sampling settings; measured on first use,
    and again when the loop's code has changed since (`loop_code_fingerprint`)."""
    path = loop_cost_path(target_model, draft_model, batch, sampling)
    if path not in _LOADED:
        data = json.loads(path.read_text()) if path.is_file() else {}
        if data.get("format") == FORMAT and data.get("code") == loop_code_fingerprint():
            _LOADED[path] = LoopCost.from_json(data)
        else:
            _LOADED[path] = measure_loop_cost(target_model, draft_model, batch, sampling, progress=progress)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(_LOADED[path].to_json(), indent=1))
    return _LOADED[path]

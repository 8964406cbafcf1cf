"""Prepacked linear weights for CPU forwards of a few tokens: what makes a draft tree nearly free to verify on a CPU.

A speculative step runs the target on a handful of tokens (the tree) instead of one. On CPUs, `F.linear` with 2 to ~64
input rows is a GEMM that repacks the whole weight matrix on every call, so a 9-token forward of SmolLM2-135M costs
about 2x a 1-token one, although both stream the same weights from memory. oneDNN can pack each weight once into its
blocked layout (`torch.ops.mkldnn._reorder_linear_weight`) and multiply from there (`_linear_pointwise`): measured on
this project's 2-core AMD EPYC, the 576 x 49152 LM head takes 24.7 ms for 9 rows with `F.linear` and 9.4 ms packed,
and a whole 5-token forward costs about what a 1-token forward does. Results are float32 GEMMs with another summation
order (differences of the order of 1e-6 relative, like those between a tree forward and a one-token forward).

The packed copies cost one extra copy of the linear weights. They are used only inside `packed_linears(model)` (a
generate call), and kept from one call to the next (packing a 135M model takes ~0.4 s, a tenth of a 96-token reply on
a CPU): on first use in a call each is checked against its weight, whose identity (storage, version counter, layout)
and values (a product with a fixed random vector, one read of the weight) must be those it was packed from, so a weight
changed between calls in any way (`.data` writes, which bump no version counter, rebinding, `load_state_dict`, swapped
modules) is packed anew. `forget_packed_weights(model)` frees them; they go with their modules too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import weakref
from dataclasses import dataclass

import torch

# the batch-size hint oneDNN packs for; the packed layout serves any number of rows
ROWS_HINT = 16


def prepacking_enabled() -> bool:
    """oneDNN is there and HF_SPECDEC_PREPACK is not 0."""
    if os.environ.get("HF_SPECDEC_PREPACK", "1") == "0":
        return False
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def prepacking_available(model) -> bool:
    """Prepacking applies to float32 models on the CPU (HF_SPECDEC_PREPACK=0 turns it off), not to sharded ones (their
    weights are DTensors, and a per-rank timing could choose differently on each rank)."""
    from hf_specdec.distributed import tensor_parallel

    return (prepacking_enabled() and model.device.type == "cpu" and model.dtype == torch.float32
            and tensor_parallel(model) is None)


# below this gain a forward with packed weights is not worth their packing at every call
PACKING_GAIN = 1.05
_PAYS: dict[tuple[int, str], bool] = {}  # (threads, `_choice_key`): this process's choices


def prepacking_pays(model, tokens: int) -> bool:
    """Whether a forward of `tokens` new tokens (a step's tree and its root) runs faster with packed weights on this
    machine: measured, not assumed (it depends on the CPU: on one AMD EPYC packed GEMMs made a 5-token forward cost
    what a 1-token one does; on an Intel Xeon with AMX they were slower at 4 tokens and faster from 8). Timed once per
    CPU, thread count, model shape and token count (stock and packed forwards, alternately) and kept on disk with the
    planner's calibrations: every later process runs the kernels the calibration timed (chosen anew in each process,
    one whose choice came out otherwise under a moment's load found 8-token trees at twice their calibrated cost).
    Between two token counts timed alike (the calibration times 1, 2, 3, 8 and 32), the choice is theirs: a tree
    size `auto` has not run before is not timed inside a user's call."""
    if not prepacking_available(model):
        return False
    key = _choice_key(model, tokens)
    memo = (torch.get_num_threads(), key)
    if memo not in _PAYS:
        choices = _stored_choices()
        bracketing = _bracketing_choice(choices, model, tokens)
        if bracketing is not None:
            _PAYS[memo] = bracketing
            return bracketing
        if key not in choices:
            stock, packed = _time_stock_and_packed(model, tokens)
            choices = _stored_choices()  # another process may have written meanwhile
            choices[key] = {"packed": stock > PACKING_GAIN * packed, "stock_seconds": stock, "packed_seconds": packed}
            _store_choices(choices)
        _PAYS[memo] = bool(choices[key]["packed"])
    return _PAYS[memo]


def _bracketing_choice(choices: dict, model, tokens: int) -> bool | None:
    """The stored choice of the nearest timed token counts below and above `tokens` where they agree (it is not
    timed itself), else None."""
    prefix = f"{_config_hash(model)}-"
    timed = {int(key[len(prefix):]): bool(value["packed"]) for key, value in choices.items() if key.startswith(prefix)}
    if tokens in timed:
        return None
    below = [n for n in timed if n < tokens]
    above = [n for n in timed if n > tokens]
    if not below or not above or timed[max(below)] != timed[min(above)]:
        return None
    return timed[max(below)]


def forget_prepacking_choices(model) -> None:
    """Drop this model's stored kernel choices (on this CPU and thread count): a new calibration times them anew."""
    prefix = f"{_config_hash(model)}-"
    choices = _stored_choices()
    _store_choices({key: value for key, value in choices.items() if not key.startswith(prefix)})
    for memo in [memo for memo in _PAYS if memo[1].startswith(prefix)]:
        del _PAYS[memo]


def _choice_key(model, tokens: int) -> str:
    """"<config hash>-<tokens>": the file is per CPU model and thread count already."""
    return f"{_config_hash(model)}-{tokens}"


def _config_hash(model) -> str:
    config = f"{type(model).__name__} {model.config.to_json_string(use_diff=False)}"
    return hashlib.sha1(config.encode()).hexdigest()[:12]


def _choices_path():
    from hf_specdec.planner.calibration import cpu_name
    from hf_specdec.planner.storage import cache_dir, slug

    return cache_dir() / "kernels" / f"{slug(cpu_name())}-x{torch.get_num_threads()}.json"


def _stored_choices() -> dict:
    path = _choices_path()
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or a torn write: measured again
        return {}


def _store_choices(choices: dict) -> None:
    path = _choices_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(json.dumps(choices, indent=1, sort_keys=True))
    partial.replace(path)  # atomic: a reader sees the old file or the new one


def _time_stock_and_packed(model, tokens: int, rounds: int = 2) -> tuple[float, float]:
    """The least seconds of a `tokens`-token forward with stock and with packed weights, timed in alternating rounds
    (a burst of load then slows one round of each, not all the timings of one)."""
    stock = packed = float("inf")
    for _ in range(rounds):
        stock = min(stock, _time_forward(model, tokens, packed=False))
        packed = min(packed, _time_forward(model, tokens, packed=True))
    return stock, packed


def _time_forward(model, tokens: int, packed: bool, context: int = 64, repeats: int = 3) -> float:
    import time

    from transformers import DynamicCache

    from hf_specdec.compat import cache_argument
    from hf_specdec.feature_draft import timing_inputs
    from hf_specdec.rope import state_preserved

    # its own generator: a choice timed inside generate() must not move the random state sampling draws from
    ids = torch.randint(0, model.config.get_text_config().vocab_size, (1, context + tokens), device=model.device,
                        generator=torch.Generator(model.device).manual_seed(tokens))
    best = float("inf")
    with torch.no_grad(), packed_linears(model, packed), state_preserved(model):
        for _ in range(repeats + 1):  # the first run packs (or warms up)
            cache = DynamicCache()
            model(ids[:, :context], use_cache=True, **cache_argument(model, cache), **timing_inputs(model, ids[:, :context]))
            start = time.perf_counter()
            model(ids[:, context:], use_cache=True, **cache_argument(model, cache), **timing_inputs(model, ids[:, context:]))
            best = min(best, time.perf_counter() - start)
    return best


def packed_weight(weight: torch.Tensor) -> torch.Tensor:
    """oneDNN's packed copy of a [out, in] weight."""
    with torch.no_grad():
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), ROWS_HINT)


@dataclass
class _Packed:
    """A packed copy and what identifies the weight it was packed from."""

    packed: torch.Tensor
    identity: tuple
    sketch: torch.Tensor


_KEPT: "weakref.WeakKeyDictionary[torch.nn.Module, _Packed]" = weakref.WeakKeyDictionary()
_PROBES: dict[int, torch.Tensor] = {}


def _identity(weight: torch.Tensor) -> tuple:
    return weight.data_ptr(), weight._version, tuple(weight.shape), weight.stride(), weight.dtype, weight.device


def _sketch(weight: torch.Tensor) -> torch.Tensor:
    """weight @ a fixed random vector: any change of a row's values beyond the rounding of its product changes it
    (its version counter misses writes through `.data`, and a permutation keeps a plain sum)."""
    columns = weight.shape[1]
    if columns not in _PROBES:  # its own generator: the global random state that sampling draws from is not touched
        _PROBES[columns] = torch.randn(columns, generator=torch.Generator().manual_seed(columns))
    with torch.no_grad():
        return torch.mv(weight.detach(), _PROBES[columns].to(weight.device, weight.dtype))


def kept_packed_weight(module: torch.nn.Module) -> torch.Tensor:
    """The packed copy of `module.weight`: the one kept from an earlier call if the weight is still the one it was
    packed from (a NaN anywhere in it never compares equal: packed anew), else packed now and kept."""
    weight = module.weight
    identity, sketch = _identity(weight), _sketch(weight)
    kept = _KEPT.get(module)
    if kept is not None and kept.identity == identity and torch.equal(kept.sketch, sketch):
        return kept.packed
    packed = packed_weight(weight)
    _KEPT[module] = _Packed(packed, identity, sketch)
    return packed


def forget_packed_weights(model: torch.nn.Module) -> None:
    """Free the packed copies kept for `model`'s linear layers."""
    for module in model.modules():
        _KEPT.pop(module, None)


def _packed_forward(module: torch.nn.Linear):
    packed = None  # checked (or packed) on the first call, used for the rest of the context

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        nonlocal packed
        if packed is None:
            packed = kept_packed_weight(module)
        return torch.ops.mkldnn._linear_pointwise(hidden_states, packed, module.bias, "none", [], "")

    return forward


@contextlib.contextmanager
def packed_linears(model, enabled: bool = True):
    """Inside the context, every `nn.Linear` of `model` multiplies with prepacked weights (see the module docstring)."""
    linears = [(m, _linear_method(m)) for m in model.modules()] if enabled else []
    # not those whose method is already wrapped on the instance (e.g. by accelerate hooks)
    linears = [(m, name) for m, name in linears if name is not None and name not in vars(m)]
    for module, name in linears:
        setattr(module, name, _packed_forward(module))
    try:
        yield
    finally:
        for module, name in linears:
            delattr(module, name)  # back to the class's method


def _linear_method(module: torch.nn.Module) -> str | None:
    """The method of `module` that computes `F.linear(x, weight, bias)`: `forward` of a plain `nn.Linear`; an
    `nn.Linear` subclass that post-processes the product names its method in `LINEAR_METHOD` (e.g. a draft's
    reduced-vocabulary head); other subclasses are left alone."""
    if type(module) is torch.nn.Linear:
        return "forward"
    if isinstance(module, torch.nn.Linear):
        return getattr(type(module), "LINEAR_METHOD", None)
    return None

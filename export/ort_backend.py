"""The ONNX Runtime backend: an exported model (see `hf_specdec.export.graph`) behind the `ModelBackend` protocol, so
the one speculative loop (`hf_specdec.loop`) drives it exactly as it drives the PyTorch backend.

KV cache: one preallocated, zero-filled tensor per model, [layers, 2 (key, value), batch, kv_heads, capacity,
head_dim]. Every forward binds each layer's [batch, kv_heads, capacity, head_dim] block as the graph's `past_*`
input through I/O binding (a pointer, no copy); slots past the cache length are masked out. The graph returns only
the new tokens' K/V, bound to a small staging tensor, which is written into slots length .. length+new: a step
moves O(new) slots, never the whole cache. `keep` gathers the accepted slots within the same tensor. The only
whole-cache copies are growth (capacity doubles, so O(log length) times per generate call) and `select_rows` (once per
finished row). Zero-filling matters: masked slots are multiplied by probability 0, and 0 * NaN would be NaN.

Masks: the graph takes one bool mask per attention layer type (`ModelEntry.mask_windows`): the loop's mask as it is
for full-attention layers (`attention_mask`), and for sliding-window layers (`sliding_attention_mask`) that mask
restricted to keys less than the window behind each query, by the position ids the loop passes for every slot
(`key_positions`), with the PyTorch backend's `sliding_window_mask`.

Features (feature-conditioned drafts): a graph with a `hidden_states` output (the target of a feature pair, and the
feature draft) has it bound to a [batch, new, hidden] tensor at every run, which `forward` returns (and `prefill`, when
asked: one per prefill chunk, concatenated); a graph with a `features` input (the feature draft) has the loop's
features bound to it, in the graph's dtype. A graph exported without them (a standalone pair) refuses to be asked
for them with the re-export hint: the loop only asks when the draft reads features, and such a draft comes with a
target that returns them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from hf_specdec.backends.base import Forward
from hf_specdec.cache_layout import sliding_window_mask
from hf_specdec.export.manifest import (
    FEATURES_INPUT,
    GENERATION_CONFIG_FILE,
    HIDDEN_STATES_OUTPUT,
    Manifest,
    ManifestError,
    reexport_hint,
)

ELEMENT_TYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.bool: np.bool_}
CAPACITY_BLOCK = 64  # cache capacity grows in multiples of this many slots
# a request beyond an exported bound: the export option that raises the bound, and the other way out
LIMIT_FIXES = {
    "batch": ("--max-batch", " or split the batch"),
    "new": ("--max-new-tokens", " or use a smaller speculative config"),
    "past": ("--max-past", " or generate fewer tokens"),
}


class OrtBackend:
    def __init__(self, model_dir: "str | Path", role: str, manifest: Manifest, device="cpu", threads: int | None = None):
        self.model_dir, self.role = Path(model_dir), role
        self.entry = manifest.entry(role)
        self.max_dims = manifest.max_dims
        self.device = torch.device(device)
        self.vocab_size = self.entry.vocab_size
        self.hidden_size = self.entry.hidden_size  # None for a graph without feature I/O
        self.reads_features = self.entry.reads_features  # a feature draft: every run takes `features`
        self.emits_features = self.entry.emits_features  # every run returns `hidden_states`
        # a reduced-vocabulary head's tokens (logits -inf elsewhere): drafting works on them only, as on PyTorch
        support = self.entry.logit_support
        self.logit_support = None if support is None else torch.tensor(support, device=self.device)
        self.dtype = getattr(torch, self.entry.dtype)
        self.mask_windows = self.entry.mask_windows()  # mask input name -> window (None: full attention)
        self._check_known_inputs()
        self._open(threads)
        # The loop's tensor work between runs goes on one PyTorch thread (`loop.host_threads`): PyTorch's OpenMP
        # threads spin for a while after each of its parallel ops and took the cores this session's threads needed
        # at the start of the next run. Measured in one process (int4 SmolLM2 pair, 4 held-out prompts x 64 tokens,
        # 2 rounds interleaved, 2 cores, AMD EPYC): `ar` 1.19-1.20x, rsd-c:b=2-2 1.11-1.13x, rsd-s:w=2,d=3
        # 1.08-1.12x, greedy and T=1, the same tokens; the target's one-token run inside the loop 18.2 -> 14.6 ms.
        self.host_threads = 1 if self.device.type == "cpu" else None
        self.cache: torch.Tensor | None = None
        self.length = 0  # cache slots in use

    def _open(self, threads: int | None) -> None:
        """Load the model into the runtime and check its I/O against the manifest."""
        options = ort.SessionOptions()
        # as many threads as PyTorch uses, so that the two backends compare on equal terms
        options.intra_op_num_threads = threads or torch.get_num_threads()
        # Threads that spin hand each of the graph's ~2000 operators to the next without a wake-up, but ONNX Runtime
        # keeps them spinning after a run by default, taking the cores from the loop's PyTorch work between runs
        # (drafting, verification: a 3 ms draft pass took 20 ms); `force_spinning_stop` parks them as a run returns.
        # Measured (int4 SmolLM2 target, 2 cores): one-token forward 18.1 ms against 21.2 ms never spinning, 29.2
        # against 30.1 ms with PyTorch work between runs (spinning on after runs: 39.4 ms).
        options.add_session_config_entry("session.intra_op.allow_spinning", "1")
        options.add_session_config_entry("session.force_spinning_stop", "1")
        self.session = ort.InferenceSession(str(self.model_dir / self.entry.file), options, providers=[self._provider()])
        self._check_graph_io()

    def _provider(self) -> str:
        if self.device.type == "cpu":
            return "CPUExecutionProvider"
        if self.device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            return "CUDAExecutionProvider"
        raise ValueError(
            f"the onnxruntime backend on {self.device} needs ONNX Runtime's CUDA provider "
            f"(available: {ort.get_available_providers()}): pip install onnxruntime-gpu, or use device='cpu'"
        )

    def _check_known_inputs(self) -> None:
        e = self.entry
        known = {"input_ids", "position_ids", "logits_index", FEATURES_INPUT, *self.mask_windows,
                 *(f"past_{kind}_{layer}" for layer in range(e.num_layers) for kind in ("key", "value"))}
        unknown = [spec.name for spec in e.inputs if spec.name not in known]
        if unknown:
            raise ManifestError(
                f"the {self.role} graph in {self.model_dir} takes inputs {unknown} that this hf-specdec does not know "
                f"how to feed: it comes from a newer export format; upgrade hf-specdec or {reexport_hint(self.model_dir)}"
            )

    def _check_graph_io(self) -> None:
        found = [(v.name, list(v.shape)) for v in (*self.session.get_inputs(), *self.session.get_outputs())]
        expected = [(s.name, list(s.shape)) for s in (*self.entry.inputs, *self.entry.outputs)]
        if found != expected:
            in_graph, in_manifest = next((f, e) for f, e in zip_longest(found, expected) if f != e)
            raise ManifestError(
                f"{self.model_dir / self.entry.file} does not match the {self.role} I/O in its manifest.json "
                f"(graph: {in_graph}, manifest: {in_manifest}): the files come from different exports; "
                f"{reexport_hint(self.model_dir)}"
            )

    # ------------------------------------------------------------------ ModelBackend
    def reset(self, batch_size: int, prompt_lengths: torch.Tensor | None = None) -> None:
        self._check_limit("batch", batch_size, f"this generate call has {batch_size} rows")
        e = self.entry
        self.cache = torch.zeros(e.num_layers, 2, batch_size, e.kv_heads, CAPACITY_BLOCK, e.head_dim, dtype=self.dtype, device=self.device)
        self.length = 0

    def prefill(self, input_ids, position_ids, attention_mask, key_positions, features=None,
                return_features=False) -> torch.Tensor | None:
        self._check_features(features, return_features)
        # in chunks of at most the exported tokens per forward; only K/V are needed, so one logit row per chunk
        chunk = self.max_dims["new"]
        hidden = []
        for start in range(0, input_ids.shape[1], chunk):
            end = min(start + chunk, input_ids.shape[1])
            last = torch.tensor([end - start - 1], device=self.device)
            visible = self.length + end - start
            _, chunk_hidden = self._run(
                input_ids[:, start:end], position_ids[:, start:end], attention_mask[:, start:end, :visible],
                key_positions[:, :visible], last, None if features is None else features[:, start:end])
            hidden.append(chunk_hidden)
        if not return_features:
            return None
        return hidden[0] if len(hidden) == 1 else torch.cat(hidden, 1)

    def forward(self, input_ids, position_ids, attention_mask, key_positions, features=None,
                return_features=False) -> Forward:
        self._check_features(features, return_features)
        new = input_ids.shape[1]
        self._check_limit("new", new, f"this step scores {new} tokens (a draft tree and its root)")
        logits, hidden = self._run(input_ids, position_ids, attention_mask, key_positions,
                                   torch.arange(new, device=self.device), features)
        return Forward(logits, hidden if return_features or self.reads_features else None)

    def _check_features(self, features, return_features) -> None:
        """What the loop asks of features must be what the graph was exported with."""
        if self.reads_features and features is None:
            raise ValueError(f"the {self.role} graph in {self.model_dir} is a feature draft: pass features= (the "
                             "target's feature before each token) with every prefill and forward")
        if (features is not None and not self.reads_features) or (return_features and not self.emits_features):
            what = ("takes no features input" if features is not None and not self.reads_features
                    else "has no hidden_states output")
            raise ManifestError(f"the {self.role} graph in {self.model_dir} {what} (it was not exported for a feature "
                                f"draft): export the pair with its feature draft; {reexport_hint(self.model_dir)}")

    def keep(self, start: int, source_slots: torch.Tensor) -> None:
        cache = self.cache
        end = start + source_slots.shape[1]
        layers, _, _, heads, _, head_dim = cache.shape
        index = source_slots[None, None, :, None, :, None].expand(layers, 2, -1, heads, -1, head_dim)
        cache[:, :, :, :, start:end] = cache.gather(4, index)  # gather copies the kept slots first
        self.length = end

    def select_rows(self, rows: torch.Tensor) -> None:
        self.cache = self.cache[:, :, rows]

    def finish(self, generated_tokens: int) -> None:
        """Nothing to settle: the exported graph's rotary frequencies do not depend on the sequence length."""

    # ------------------------------------------------------------------ internals
    def _check_limit(self, dim: str, size: int, what: str) -> None:
        limit = self.max_dims[dim]
        if size > limit:
            option, alternative = LIMIT_FIXES[dim]
            raise ManifestError(
                f"{self.model_dir} was exported for at most {limit} ({dim}) but {what}: re-export with "
                f"`hf-specdec export {option} {size} --out {self.model_dir}`{alternative}"
            )

    def _reserve(self, slots: int) -> None:
        """Grow the cache to hold `slots` slots per row (doubling, so growth copies stay rare)."""
        self._check_limit("past", slots, f"a row needs {slots} cache slots")  # also below the starting capacity
        capacity = self.cache.shape[4]
        if slots <= capacity:
            return
        capacity = max(slots, 2 * capacity)
        capacity = min(-(-capacity // CAPACITY_BLOCK) * CAPACITY_BLOCK, self.max_dims["past"])
        grown = self.cache.new_zeros(*self.cache.shape[:4], capacity, self.cache.shape[5])
        grown[:, :, :, :, : self.length] = self.cache[:, :, :, :, : self.length]
        self.cache = grown

    def _graph_mask(self, mask: torch.Tensor, capacity: int) -> torch.Tensor:
        """The graph's mask columns: every capacity slot (unused ones masked), then the new tokens."""
        batch, new, columns = mask.shape
        past = columns - new
        graph_mask = mask.new_zeros(batch, new, capacity + new)
        graph_mask[:, :, :past] = mask[:, :, :past]
        graph_mask[:, :, capacity:] = mask[:, :, past:]
        return graph_mask

    def _run(self, input_ids, position_ids, attention_mask, key_positions, logits_index,
             features=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One run of the graph over `new` tokens: (float32 logits [B, kept, V], hidden states [B, new, H] or None
        for a graph without them); the new K/V go into the cache."""
        batch, new = input_ids.shape
        past = self.length
        if attention_mask.shape[-1] != past + new:
            raise RuntimeError(f"mask covers {attention_mask.shape[-1]} slots, the cache holds {past} + {new} new")
        self._reserve(past + new)
        capacity = self.cache.shape[4]
        masks = {}
        for name, window in self.mask_windows.items():
            mask = attention_mask if window is None else sliding_window_mask(attention_mask, position_ids, key_positions, window)
            masks[name] = self._graph_mask(mask, capacity)
        e = self.entry
        new_kv = torch.empty(e.num_layers, 2, batch, e.kv_heads, new, e.head_dim, dtype=self.dtype, device=self.device)
        logits = torch.empty(batch, len(logits_index), self.vocab_size, dtype=torch.float32, device=self.device)
        inputs = {
            "input_ids": input_ids.contiguous(),
            "position_ids": position_ids.contiguous(),
            **masks,
            "logits_index": logits_index,
        }
        outputs = {"logits": logits}
        for layer in range(e.num_layers):
            for kind, index in (("key", 0), ("value", 1)):
                inputs[f"past_{kind}_{layer}"] = self.cache[layer, index]
                outputs[f"new_{kind}_{layer}"] = new_kv[layer, index]
        if self.reads_features:
            # in the graph's dtype (the loop's zero features of a one-token prompt are float32): a no-op when it is
            inputs[FEATURES_INPUT] = features.to(self.device, self.dtype).contiguous()
        hidden = None
        if self.emits_features:
            # bound at every run (a TensorRT engine needs an address for every output), returned where asked for
            hidden = torch.empty(batch, new, e.hidden_size, dtype=self.dtype, device=self.device)
            outputs[HIDDEN_STATES_OUTPUT] = hidden
        self._execute(inputs, outputs)
        self.cache[:, :, :, :, past : past + new] = new_kv
        self.length = past + new
        return logits, hidden

    def _execute(self, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        """Run the graph on contiguous tensors, writing the outputs in place."""
        binding = self.session.io_binding()
        for name, tensor in inputs.items():
            binding.bind_input(name, *self._buffer(tensor))
        for name, tensor in outputs.items():
            binding.bind_output(name, *self._buffer(tensor))
        self.session.run_with_iobinding(binding)

    def _buffer(self, tensor: torch.Tensor) -> tuple:
        """I/O binding arguments for a contiguous tensor: ONNX Runtime reads or writes its memory in place."""
        return self.device.type, self.device.index or 0, ELEMENT_TYPES[tensor.dtype], tuple(tensor.shape), tensor.data_ptr()


@dataclass
class ExportedPair:
    target: OrtBackend
    draft: OrtBackend
    tokenizer: object
    generation_config: object  # transformers.GenerationConfig: the target's defaults saved at export
    manifest: Manifest
    model_dir: Path
    verifier: Callable | None = None  # an implementation of the verifier interface; None: the device's default


def default_device() -> str:
    """CUDA where both ONNX Runtime's CUDA provider and a GPU are there, else CPU."""
    cuda = "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()
    return "cuda" if cuda else "cpu"


def load_exported_pair(model_dir: "str | Path", open_backend: Callable[[Path, str, Manifest], OrtBackend],
                       verifier: Callable | None = None) -> ExportedPair:
    """Both models of an export (`hf-specdec export --out DIR`), each opened by `open_backend(model_dir, role,
    manifest)`, with its tokenizer; checked against the manifest."""
    from transformers import AutoTokenizer, GenerationConfig

    model_dir = Path(model_dir)
    manifest = Manifest.load(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    manifest.check_tokenizer(tokenizer, model_dir)
    generation_config = GenerationConfig.from_pretrained(model_dir, GENERATION_CONFIG_FILE)
    target, draft = (open_backend(model_dir, role, manifest) for role in ("target", "draft"))
    return ExportedPair(target, draft, tokenizer, generation_config, manifest, model_dir, verifier)


def load_onnxruntime_pair(model_dir: "str | Path", device=None, threads: int | None = None) -> ExportedPair:
    """Both models of an export on ONNX Runtime (on `default_device()` unless `device` is given; see
    `load_exported_pair`)."""
    device = device or default_device()
    return load_exported_pair(model_dir, lambda path, role, manifest: OrtBackend(path, role, manifest, device, threads))

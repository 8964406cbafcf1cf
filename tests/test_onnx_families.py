"""The ONNX export across model families: every family that exports runs greedy speculative decoding on ONNX Runtime
token-identical to plain PyTorch `generate(do_sample=False)`; every family that cannot is refused by name before
anything is traced.

Exported here, one per structural variant (tiny models of `tiny_models`, each exported once per module):
Mistral (every layer sliding-window: only `sliding_attention_mask`), Gemma 2 (sliding and full layers mixed, so both
masks, plus attention and final logit soft-capping), Mixtral (mixture of experts, traced densely, and a sliding
window), Phi-3 (fused QKV, sliding window), GPT-NeoX (partial rotary, parallel residual, full attention: the graph
I/O of earlier exports) and StableLM (its decoder layers do not pass keyword arguments on to attention). Llama, Qwen2
and GPT-2 are covered by test_onnx_generate.py / test_onnx_export.py; the other families (OPT, Gemma 3, Qwen3,
Qwen3-MoE, Olmo2, Cohere, Granite) were checked the same way by hand (export/README.md has the table).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from tiny_models import FAMILIES, left_padded_prompts, perturbed_copy, tiny_family_model, tiny_model, word_tokenizer
from transformers import GenerationConfig

from hf_specdec.export.manifest import Manifest, ManifestError
from hf_specdec.export.onnx_export import check_exportable, check_split_kv_matches, export_pair
from hf_specdec.export.ort_backend import load_onnxruntime_pair
from hf_specdec.generation import decode

VOCAB = 96
NEW_TOKENS = 40  # with 9-token prompts, well past the tiny models' sliding window of 12
METHODS = ["sd:l=3", "rsd-s:w=2,d=3"]
BATCHES = {1: [0], 2: [0, 3]}  # left padding per row
# family -> the graph's mask inputs, in order
EXPORTED = {
    "mistral": ["sliding_attention_mask"],
    "gemma2": ["attention_mask", "sliding_attention_mask"],
    "mixtral": ["sliding_attention_mask"],
    "phi3": ["sliding_attention_mask"],
    "gpt-neox": ["attention_mask"],
    "stablelm": ["attention_mask"],
}
WINDOW = 12  # the tiny models' sliding window


def build(family: str):
    if family in FAMILIES:
        target = tiny_model(family, vocab_size=VOCAB, scale=0.3)
    else:
        # Gemma 2 has no sdpa attention in transformers (sdpa cannot soft-cap scores)
        target = tiny_family_model(family, vocab_size=VOCAB, attn_implementation="eager" if family == "gemma2" else "sdpa")
    target.generation_config.eos_token_id = None
    return target


def prompts(batch: int) -> dict[str, torch.Tensor]:
    return left_padded_prompts(BATCHES[batch], 9, VOCAB, seed=7)


def decode_onnxruntime(pair, batch: int, method: str):
    inputs = prompts(batch)
    config = GenerationConfig(do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=0)
    return decode(pair.target, pair.draft, inputs["input_ids"], config, method, inputs["attention_mask"])


@pytest.fixture(scope="module", params=list(EXPORTED))
def exported(request, tmp_path_factory):
    """(family, model dir, the pair on ONNX Runtime, plain generate's output per batch size)."""
    family = request.param
    target = build(family)
    draft = perturbed_copy(target, noise=0.05)
    model_dir = tmp_path_factory.mktemp(f"onnx-{family}")
    export_pair(target, draft, word_tokenizer(VOCAB), model_dir, {"target": f"tiny {family}", "draft": f"tiny {family} draft"},
                max_new_tokens=32)
    with torch.no_grad():
        references = {batch: target.generate(**prompts(batch), do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=0)
                      for batch in BATCHES}
    return family, model_dir, load_onnxruntime_pair(model_dir, device="cpu"), references


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("method", METHODS)
def test_greedy_is_token_identical_to_pytorch(exported, method, batch):
    family, _, pair, references = exported
    result = decode_onnxruntime(pair, batch, method)
    reference = references[batch]
    assert result.sequences.shape == reference.shape
    differs = (result.sequences != reference).nonzero()
    assert len(differs) == 0, f"{family} {method} batch {batch}: first (row, index) that differs {differs[0].tolist()}"
    assert result.stats.block_efficiency > 1.2, "the draft should be accepted often enough to exercise the tree"


def test_mask_inputs_follow_the_layer_types(exported):
    family, model_dir, _, _ = exported
    manifest = Manifest.load(model_dir)
    data = json.loads((model_dir / "manifest.json").read_text())
    sliding = "sliding_attention_mask" in EXPORTED[family]
    for role in ("target", "draft"):
        entry = manifest.entry(role)
        names = [spec.name for spec in entry.inputs]
        assert names[:2] == ["input_ids", "position_ids"] and names[2:2 + len(EXPORTED[family])] == EXPORTED[family]
        assert names[2 + len(EXPORTED[family])] == "logits_index"
        for name in EXPORTED[family]:
            assert next(s for s in entry.inputs if s.name == name).shape == ["batch", "new", "past_plus_new"]
        if sliding:
            assert entry.sliding_window == WINDOW and data[role]["sliding_window"] == WINDOW
        else:
            # full attention: the manifest entry is exactly what earlier versions wrote and read
            assert entry.sliding_window is None and "sliding_window" not in data[role]


def test_the_window_binds(exported):
    """Fed the unwindowed mask for its sliding layers, the same graph generates something else: the tokens cross the
    window, and the runtime's windowed mask is what makes the output match."""
    family, _, pair, references = exported
    if "sliding_attention_mask" not in EXPORTED[family]:
        pytest.skip(f"{family} has no sliding-window layers")
    saved = pair.target.mask_windows, pair.draft.mask_windows
    try:
        for backend in (pair.target, pair.draft):
            backend.mask_windows = {name: None for name in backend.mask_windows}
        result = decode_onnxruntime(pair, 2, "sd:l=3")
    finally:
        pair.target.mask_windows, pair.draft.mask_windows = saved
    assert not torch.equal(result.sequences, references[2])


# ------------------------------------------------------------------ refused


def tiny_gpt_oss():
    """A tiny GPT-OSS: attention sinks (a learned logit per head in the softmax denominator), MoE, sliding + full."""
    torch.manual_seed(0)
    config = transformers.GptOssConfig(
        vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=32,
        num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW,
        max_position_embeddings=256, initializer_range=0.3, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        attn_implementation="eager", rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    return transformers.GptOssForCausalLM(config).eval()


REFUSED = {
    "falcon": ("'falcon'", "attention interface"),
    "falcon-new": ("'falcon'", "attention interface"),
    "gpt-oss": ("'gpt_oss'", "sinks"),
}


@pytest.mark.parametrize("family", list(REFUSED))
def test_refused_by_name_before_any_export_work(family, tmp_path):
    model = tiny_gpt_oss() if family == "gpt-oss" else build(family)
    name, cause = REFUSED[family]
    with pytest.raises(ValueError, match=f"{type(model).__name__}, model type {name}.*{cause}.*use the pytorch backend"):
        check_exportable(model, "target")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=f"the draft .*model type {name}"):
        export_pair(build("mistral"), model, word_tokenizer(VOCAB), out, {"target": "", "draft": ""})
    assert not out.exists(), "nothing is written for a pair that cannot be exported"


def test_a_family_the_export_does_not_know_is_caught_by_the_probe():
    """Without its name in the refusal list, GPT-OSS's attention sinks still show: its logits through the export's
    attention differ from its own forward, and it is refused rather than exported with other outputs."""
    with pytest.raises(ValueError, match="GptOssForCausalLM.*differ from its own forward.*use the pytorch backend"):
        check_split_kv_matches(tiny_gpt_oss(), "target")


# ------------------------------------------------------------------ manifests


@pytest.fixture
def sliding_copy(tmp_path, exported):
    """A private copy of the Mistral export to break (the tests below take `exported` as "mistral" only)."""
    _, model_dir, _, _ = exported
    return shutil.copytree(model_dir, tmp_path / "copy")


def edit_entry(model_dir, role: str, edit) -> None:
    path = model_dir / "manifest.json"
    data = json.loads(path.read_text())
    edit(data[role])
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("exported", ["mistral"], indirect=True)
def test_sliding_export_without_its_window(sliding_copy):
    edit_entry(sliding_copy, "target", lambda entry: entry.pop("sliding_window"))
    with pytest.raises(ManifestError, match="sliding_window None.*needs both its window.*re-export"):
        load_onnxruntime_pair(sliding_copy, device="cpu")


@pytest.mark.parametrize("exported", ["mistral"], indirect=True)
def test_graph_input_this_version_does_not_know(sliding_copy):
    def add_input(entry):
        entry["inputs"].append({"name": "chunked_attention_mask", "shape": ["batch", "new", "past_plus_new"], "dtype": "bool"})

    edit_entry(sliding_copy, "draft", add_input)
    with pytest.raises(ManifestError, match="chunked_attention_mask.*newer export format"):
        load_onnxruntime_pair(sliding_copy, device="cpu")

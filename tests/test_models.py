"""The reduced-vocabulary draft as an HF causal LM, the shipped draft, and the embedded default pair."""

import pytest
import torch
from draft_fixtures import TINY_LLAMA_SHAPE, VOCAB_SIZE, tiny_target
from transformers import AutoConfig, DynamicCache

from hf_specdec import distill, models
from hf_specdec.compat import cache_argument
from hf_specdec.draft_model import ReducedVocabLlamaConfig, ReducedVocabLlamaForCausalLM
from hf_specdec.feature_draft import FeatureDraftConfig, FeatureDraftForCausalLM

KEPT = list(range(0, VOCAB_SIZE, 3))


def tiny_draft(attn_implementation="sdpa"):
    torch.manual_seed(0)
    config = ReducedVocabLlamaConfig(num_hidden_layers=2, kept_token_ids=KEPT, oov_embedding_rank=4, **TINY_LLAMA_SHAPE)
    config._attn_implementation = attn_implementation
    return ReducedVocabLlamaForCausalLM(config).eval()


def test_logits_are_full_vocabulary_and_minus_infinity_outside_the_subset():
    logits = tiny_draft()(torch.randint(VOCAB_SIZE, (2, 5))).logits
    outside = torch.ones(VOCAB_SIZE, dtype=torch.bool)
    outside[KEPT] = False
    assert logits.shape == (2, 5, VOCAB_SIZE)
    assert torch.isneginf(logits[..., outside]).all() and torch.isfinite(logits[..., KEPT]).all()


def test_tokens_outside_the_subset_have_their_own_embeddings():
    embed = tiny_draft().model.embed_tokens
    outside = torch.tensor([1, 2, 4, 5])
    vectors = embed(outside)
    assert torch.cdist(vectors, vectors).fill_diagonal_(1).min() > 0
    torch.testing.assert_close(embed(torch.tensor(KEPT)), embed.kept.weight)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_tree_forward_with_4d_mask_position_ids_and_cache_matches_each_path(attn_implementation):
    draft = tiny_draft(attn_implementation)
    prefix = torch.randint(VOCAB_SIZE, (1, 6))
    # tree under the last prefix token: nodes 0, 1 at depth 1; 2, 3 under node 0; 4 under node 1
    parents = [-1, -1, 0, 0, 1]
    tokens = torch.randint(VOCAB_SIZE, (1, len(parents)))
    paths = [_path(node, parents) for node in range(len(parents))]
    past = prefix.shape[1]
    attend = torch.zeros(len(parents), past + len(parents), dtype=torch.bool)
    attend[:, :past] = True
    for node, path in enumerate(paths):
        attend[node, [past + ancestor for ancestor in path]] = True
    mask = torch.zeros(attend.shape).masked_fill(~attend, torch.finfo(torch.float32).min)[None, None]
    position_ids = torch.tensor([[past + len(path) - 1 for path in paths]])
    with torch.no_grad():
        cache = DynamicCache(config=draft.config)
        draft(prefix, use_cache=True, **cache_argument(draft, cache))
        tree_logits = draft(tokens, attention_mask=mask, position_ids=position_ids, **cache_argument(draft, cache)).logits[0]
        for node, path in enumerate(paths):
            chain = torch.cat([prefix, tokens[:, path]], dim=1)
            torch.testing.assert_close(tree_logits[node], draft(chain).logits[0, -1], atol=1e-5, rtol=1e-5)


def _path(node: int, parents: list[int]) -> list[int]:
    path = []
    while node >= 0:
        path.insert(0, node)
        node = parents[node]
    return path


def test_hf_assisted_generation_uses_the_draft_and_keeps_greedy_output():
    target = tiny_target()
    draft = distill.init_standalone_draft(target, KEPT, [0], oov_rank=4).eval()
    prompt = torch.randint(3, VOCAB_SIZE, (1, 5))
    plain = target.generate(prompt, do_sample=False, max_new_tokens=12, min_new_tokens=12)
    assisted = target.generate(prompt, assistant_model=draft, do_sample=False, max_new_tokens=12, min_new_tokens=12)
    assert torch.equal(assisted, plain)


def test_shipped_draft_loads_through_the_auto_classes():
    config = AutoConfig.from_pretrained(models.DRAFT_DIRS["standalone"])
    assert isinstance(config, ReducedVocabLlamaConfig) and config.vocab_size == 49152
    draft = models.load_draft(kind="standalone")
    assert isinstance(draft, ReducedVocabLlamaForCausalLM) and not draft.training
    assert draft.dtype == torch.float32
    logits = draft(torch.tensor([[1, 9690, 198]])).logits
    assert logits.shape == (1, 3, 49152)
    assert torch.isfinite(logits[..., config.kept_token_ids]).all()
    assert torch.isneginf(logits).sum() == 3 * (49152 - len(config.kept_token_ids))


def test_shipped_feature_draft_loads_through_the_auto_classes():
    config = AutoConfig.from_pretrained(models.DRAFT_DIRS["feature"])
    assert isinstance(config, FeatureDraftConfig) and config.vocab_size == 49152 and config.hidden_size == 576
    draft = models.load_draft(kind="feature")
    assert isinstance(draft, FeatureDraftForCausalLM) and not draft.training and draft.dtype == torch.float32
    out = draft(torch.tensor([[1, 9690, 198]]), torch.zeros(1, 3, 576))
    assert out.logits.shape == (1, 3, 49152) and out.features.shape == (1, 3, 576)
    assert torch.isneginf(out.logits).sum() == 3 * (49152 - len(config.kept_token_ids))


@pytest.mark.slow
def test_default_pair_is_ready_for_speculative_generate():
    from hf_specdec import speculative_generate

    target, draft, tokenizer = models.load_default_pair()
    assert isinstance(draft, FeatureDraftForCausalLM) and not target.training and not draft.training
    assert target.config.vocab_size == draft.config.vocab_size == len(tokenizer)
    assert target.device.type == draft.device.type == "cpu"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    plain = target.generate(**prompt, do_sample=False, max_new_tokens=16)
    out = target.generate(**prompt, custom_generate=speculative_generate, draft_model=draft,
                          speculative_config="rsd-s:w=2,d=4", do_sample=False, max_new_tokens=16)
    assert torch.equal(out, plain)
    standalone = models.load_draft(kind="standalone")
    assisted = target.generate(**prompt, assistant_model=standalone, do_sample=False, max_new_tokens=16)
    assert torch.equal(assisted, plain)

"""Bad input gets a clear error that names the fix, never a silently wrong output."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model
from transformers import DynamicCache

from hf_specdec import SpeculativeConfig, speculative_generate
from hf_specdec.compat import cache_argument


class RecordingStreamer:
    def __init__(self):
        self.chunks = []

    def put(self, value):
        self.chunks.append(value)

    def end(self):
        self.chunks.append(None)


@pytest.fixture(scope="module")
def models():
    return tiny_model("llama"), tiny_model("llama", seed=1)


def run(target, draft, input_ids=None, **kwargs):
    arguments = dict(custom_generate=speculative_generate, draft_model=draft, speculative_config="sd:l=2",
                     max_new_tokens=4, pad_token_id=0)
    arguments.update(kwargs)
    return target.generate(torch.tensor([[1, 5, 6]]) if input_ids is None else input_ids, **arguments)


def test_vocabulary_mismatch(models):
    target, _ = models
    with pytest.raises(ValueError, match="resize_token_embeddings"):
        run(target, tiny_model("llama", vocab_size=80))


def test_assistant_model_instead_of_draft_model(models):
    target, draft = models
    with pytest.raises(ValueError, match="draft_model=.*not assistant_model"):
        run(target, None, assistant_model=draft)


def test_streamer_goes_through_its_own_keyword(models):
    target, draft = models
    with pytest.raises(ValueError, match="speculative_streamer"):
        run(target, draft, streamer=RecordingStreamer())


def test_beam_search(models):
    target, draft = models
    with pytest.raises(ValueError, match="num_beams=1"):
        run(target, draft, num_beams=2)


def test_several_greedy_sequences(models):
    target, draft = models
    with pytest.raises(ValueError, match="num_return_sequences"):
        run(target, draft, num_return_sequences=2, do_sample=False)


def test_attention_that_ignores_tree_masks(models):
    _, draft = models
    flash = tiny_model("llama")
    flash.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="set_attn_implementation\\('sdpa'\\)"):
        run(flash, draft)


def test_draft_on_another_device(models):
    target, _ = models
    draft = tiny_model("llama", seed=1)
    draft.__class__ = type("Elsewhere", (type(draft),), {"device": property(lambda self: torch.device("cuda", 0))})
    with pytest.raises(ValueError, match="draft_model.to\\('cpu'\\)"):
        run(target, draft)


def test_draft_without_weights(models):
    target, _ = models
    with pytest.raises(ValueError, match="meta device.*device_map='cpu'"):
        run(target, tiny_model("llama", seed=1).to("meta"))


def test_empty_prompt(models):
    target, draft = models
    with pytest.raises(ValueError, match="prompt is empty.*bos_token_id"):
        run(target, draft, torch.zeros(1, 0, dtype=torch.long))


def test_row_of_padding_only(models):
    target, draft = models
    with pytest.raises(ValueError, match="row\\(s\\) \\[0\\] of the batch are all padding.*remove them"):
        run(target, draft, torch.tensor([[0, 0, 0], [1, 5, 6]]), attention_mask=torch.tensor([[0, 0, 0], [1, 1, 1]]))


def test_tree_too_large_for_memory(models, monkeypatch):
    """A tree whose step cannot fit is refused with the size that would (memory fixed at 1 GiB for the test)."""
    import hf_specdec.limits

    target, draft = models
    monkeypatch.setattr(hf_specdec.limits, "available_bytes", lambda device: 2**30)
    prompts = torch.tensor([[1, 5, 6]] * 8)
    with pytest.raises(ValueError, match="drafts 10000 nodes per row; at batch 8.*at most ~\\d+ nodes"):
        run(target, draft, speculative_config="spectr:k=100,l=100", input_ids=prompts)
    assert run(target, draft, speculative_config="rsd-s:w=3,d=4", input_ids=prompts).shape == (8, 7)


@pytest.mark.parametrize("family", ["bloom", "falcon-alibi", "mpt"])
def test_alibi_models_are_refused_by_name(models, family):
    from transformers import BloomConfig, BloomForCausalLM, FalconConfig, FalconForCausalLM, MptConfig, MptForCausalLM

    _, draft = models
    model = {
        "bloom": lambda: BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4)),
        "falcon-alibi": lambda: FalconForCausalLM(FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                               num_attention_heads=4, alibi=True)),
        "mpt": lambda: MptForCausalLM(MptConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4)),
    }[family]().eval()
    with pytest.raises(ValueError, match=f"{type(model).__name__}\\) uses ALiBi.*use plain generate"):
        run(model, draft)
    with pytest.raises(ValueError, match=f"draft model \\({type(model).__name__}\\) uses ALiBi"):
        run(draft, model)


@pytest.mark.parametrize("family", ["roformer", "trocr", "gpt-neo-local"])
def test_models_that_number_positions_by_cache_slot_are_refused_by_name(models, family):
    """RoFormer and TrOCR take no position_ids, GPT-Neo's local layers window by slot: tree branches would get
    other positions than plain decoding gives them."""
    from transformers import (
        GPTNeoConfig, GPTNeoForCausalLM, RoFormerConfig, RoFormerForCausalLM, TrOCRConfig, TrOCRForCausalLM,
    )

    _, draft = models
    model, message = {
        "roformer": (lambda: RoFormerForCausalLM(RoFormerConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                                num_attention_heads=4, intermediate_size=64,
                                                                is_decoder=True)), "takes no position_ids"),
        "trocr": (lambda: TrOCRForCausalLM(TrOCRConfig(vocab_size=64, d_model=32, decoder_layers=2,
                                                       decoder_attention_heads=4, decoder_ffn_dim=64)),
                  "takes no position_ids"),
        "gpt-neo-local": (lambda: GPTNeoForCausalLM(GPTNeoConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                                                                 attention_types=[[["global", "local"], 1]],
                                                                 window_size=4)), "has local attention layers"),
    }[family]
    model = model().eval()
    with pytest.raises(ValueError, match=rf"\({type(model).__name__}\) {message}.*use plain generate"):
        run(model, draft)


def test_missing_draft(models):
    target, _ = models
    with pytest.raises(ValueError, match="pass draft_model="):
        run(target, None)


@pytest.mark.parametrize("text", ["rsd-x:b=2", "sd:l=two", "sd", "spectr:k=2", "rsd-c:b=2--1", "sd:l=2,l=3", "rsd-s:w=0,d=2"])
def test_unparsable_config(models, text):
    target, draft = models
    with pytest.raises(ValueError, match="speculative_config|needs|must"):
        run(target, draft, speculative_config=text)


def test_config_type(models):
    target, draft = models
    with pytest.raises(TypeError, match="SpeculativeConfig"):
        run(target, draft, speculative_config=3)


def test_unsupported_processor(models):
    target, draft = models
    with pytest.raises(ValueError, match="PrefixConstrainedLogitsProcessor"):
        run(target, draft, prefix_allowed_tokens_fn=lambda batch, ids: [1, 2])


def test_attention_outputs(models):
    target, draft = models
    with pytest.raises(ValueError, match="output_attentions"):
        run(target, draft, output_attentions=True, return_dict_in_generate=True)


@pytest.mark.parametrize("keyword", ["cache", "past_key_values"])
def test_a_prefilled_cache_is_refused(models, keyword):
    target, draft = models
    cache = DynamicCache()
    target(torch.tensor([[1, 5]]), use_cache=True, **cache_argument(target, cache))
    with pytest.raises(ValueError, match="builds its own caches"):
        run(target, draft, **{keyword: cache})


def test_model_inputs_the_loop_would_drop_are_refused():
    """GPT-2 takes token_type_ids (generate passes them on); the tree forwards would run without them."""
    target, draft = tiny_model("gpt2"), tiny_model("gpt2", seed=1)
    with pytest.raises(ValueError, match="does not pass token_type_ids"):
        run(target, draft, token_type_ids=torch.tensor([[0, 1, 1]]))


def test_position_ids_other_than_generates_are_refused(models):
    target, draft = models
    prompt, mask = torch.tensor([[0, 5, 6], [4, 5, 6]]), torch.tensor([[0, 1, 1], [1, 1, 1]])
    default = mask.cumsum(-1) - 1
    run(target, draft, prompt, attention_mask=mask, position_ids=default.clamp(min=0))  # generate's own: accepted
    with pytest.raises(ValueError, match="pass no position_ids"):
        run(target, draft, prompt, attention_mask=mask, position_ids=default + 10)


def test_stop_criteria_without_eos_at_batch_above_one_are_refused(models):
    """generate keeps generating real tokens in a row a criterion stopped while there is no eos token; the loop ends
    rows where they stop, so it refuses rather than return other tokens."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class AtLength(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 5, dtype=torch.bool)

    target, draft = models
    prompt = torch.tensor([[1, 5, 6], [4, 5, 6]])
    with pytest.raises(ValueError, match="need an eos token: set eos_token_id"):
        run(target, draft, prompt, stopping_criteria=StoppingCriteriaList([AtLength()]), eos_token_id=None)
    run(target, draft, prompt[:1], stopping_criteria=StoppingCriteriaList([AtLength()]), eos_token_id=None)  # batch 1


def test_a_quantized_cache_is_refused(models, monkeypatch):
    """generate would build a quantized cache (optimum-quanto, not installed here: its construction is stubbed)."""
    import transformers.generation.utils as generation_utils

    target, draft = models
    monkeypatch.setattr(generation_utils.GenerationMixin, "_prepare_cache_for_generation", lambda *args, **kwargs: None)
    with pytest.raises(ValueError, match="cache_implementation='quantized'.*unset cache_implementation"):
        run(target, draft, cache_implementation="quantized")


def test_right_padding(models):
    target, draft = models
    with pytest.raises(ValueError, match="padding_side='left'"):
        run(target, draft, torch.tensor([[1, 5, 0], [1, 5, 6]]), attention_mask=torch.tensor([[1, 1, 0], [1, 1, 1]]))


def test_config_round_trip():
    for text in ["ar", "sd:l=4", "spectr:k=2,l=3", "rsd-c:b=3-2-2", "rsd-s:w=4,d=5", "auto"]:
        config = SpeculativeConfig.parse(text)
        assert str(config) == text and SpeculativeConfig.parse(str(config)) == config
    assert SpeculativeConfig.parse("rsd-c:b=3-2-2").tree_size == 3 + 6 + 12
    assert SpeculativeConfig.parse("rsd-s:w=4,d=5").tree_size == 20
    assert SpeculativeConfig.parse(" RSD-S:w=4,d=5 ") == SpeculativeConfig.rsd_s(4, 5)

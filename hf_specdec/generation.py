"""Speculative decoding on any pair of backends from a `transformers.GenerationConfig`, outside `model.generate`.

`model.generate(custom_generate=speculative_generate)` gets its logits processors and stopping criteria from
transformers. Backends without a PyTorch model (ONNX Runtime, TensorRT) come here instead: `decode` builds the same
processors and criteria, in the order `generate` applies them, from transformers' own classes, and runs the one
speculative loop. With the same models and seed, both paths produce the same tokens.
"""

from __future__ import annotations

import copy

import torch
from transformers import GenerationConfig
from transformers.generation import logits_process as lp
from transformers.generation import stopping_criteria as sc

from hf_specdec.backends.base import ModelBackend
from hf_specdec.backends.hf import HFBackend
from hf_specdec.config import SpeculativeConfig
from hf_specdec.loop import DecodeResult, SpeculativeDecoder
from hf_specdec.rope import check_supported as check_rope_supported
from hf_specdec.verification import Verifier
from hf_specdec.verify_batched import verify_tree_batched

# GenerationConfig fields that need something `decode` does not have (a model call, encoder inputs, beams, a tokenizer)
UNSUPPORTED_OPTIONS = {
    "num_beams": 1,
    "num_return_sequences": 1,
    "guidance_scale": None,
    "sequence_bias": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "exponential_decay_length_penalty": None,
    "begin_suppress_tokens": None,
    "stop_strings": None,
    "watermarking_config": None,
    "top_h": None,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
}


def with_defaults(generation_config: GenerationConfig) -> GenerationConfig:
    """A copy with transformers' global defaults where a field is unset (e.g. top_k=50 when sampling), as generate does."""
    config = copy.deepcopy(generation_config)
    config.update(**GenerationConfig._get_default_generation_params(), defaults_only=True)
    return config


def _check_supported(generation_config: GenerationConfig) -> None:
    for name, default in UNSUPPORTED_OPTIONS.items():
        if getattr(generation_config, name, default) not in (default, None):
            raise ValueError(
                f"generation option {name}={getattr(generation_config, name)!r} is not supported outside model.generate; "
                f"unset it, or use the pytorch backend (model.generate with custom_generate=speculative_generate)"
            )


def eos_tensor(generation_config: GenerationConfig) -> torch.Tensor | None:
    eos = generation_config.eos_token_id
    if eos is None:
        return None
    return torch.tensor(eos if isinstance(eos, (list, tuple)) else [eos])


def logits_processors(generation_config: GenerationConfig, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> lp.LogitsProcessorList:
    """The processors `generate` would use for this config (the supported subset), in its order."""
    config, eos = generation_config, eos_tensor(generation_config)
    processors = lp.LogitsProcessorList()
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        padding_lengths = (attention_mask != 0).int().argmax(dim=1)  # the left padding the penalty ignores
        processors.append(lp.RepetitionPenaltyLogitsProcessor(config.repetition_penalty, prompt_ignore_length=padding_lengths))
    if config.no_repeat_ngram_size:
        processors.append(lp.NoRepeatNGramLogitsProcessor(config.no_repeat_ngram_size))
    if config.bad_words_ids is not None:
        processors.append(lp.NoBadWordsLogitsProcessor(config.bad_words_ids, eos))
    if config.min_length and eos is not None:
        processors.append(lp.MinLengthLogitsProcessor(config.min_length, eos))
    if config.min_new_tokens and eos is not None:
        processors.append(lp.MinNewTokensLengthLogitsProcessor(input_ids.shape[1], config.min_new_tokens, eos))
    if config.remove_invalid_values:
        processors.append(lp.InfNanRemoveLogitsProcessor())
    if config.suppress_tokens is not None:
        processors.append(lp.SuppressTokensLogitsProcessor(config.suppress_tokens))
    if config.do_sample:
        if config.temperature is not None and config.temperature != 1.0:
            processors.append(lp.TemperatureLogitsWarper(config.temperature))
        if config.top_k:
            processors.append(lp.TopKLogitsWarper(config.top_k))
        if config.top_p is not None and config.top_p < 1.0:
            processors.append(lp.TopPLogitsWarper(config.top_p))
        if config.min_p is not None:
            processors.append(lp.MinPLogitsWarper(config.min_p))
        if config.typical_p is not None and config.typical_p < 1.0:
            processors.append(lp.TypicalLogitsWarper(config.typical_p))
    if config.renormalize_logits:  # last, as generate: it changes the returned scores only
        processors.append(lp.LogitNormalization())
    return processors


def max_length(generation_config: GenerationConfig, prompt_length: int) -> int:
    """The total length generate stops at: prompt + max_new_tokens, else max_length, else prompt + 20 new tokens
    (generate's default when neither is set: read it from the config as the user gave it, before `with_defaults`)."""
    if generation_config.max_new_tokens is not None:
        return prompt_length + generation_config.max_new_tokens
    if generation_config.max_length is None:
        return prompt_length + GenerationConfig._get_default_generation_params()["max_length"]
    return generation_config.max_length


def stopping_criteria(generation_config: GenerationConfig, length: int) -> sc.StoppingCriteriaList:
    criteria = sc.StoppingCriteriaList([sc.MaxLengthCriteria(length)])
    if generation_config.max_time is not None:
        criteria.append(sc.MaxTimeCriteria(generation_config.max_time))
    eos = eos_tensor(generation_config)
    if eos is not None:
        criteria.append(sc.EosTokenCriteria(eos))
    return criteria


def pad_token_id(generation_config: GenerationConfig) -> int | None:
    """The id finished rows are padded with: pad_token_id, else the first eos id (generate's own default)."""
    if generation_config.pad_token_id is not None:
        return int(generation_config.pad_token_id)
    eos = eos_tensor(generation_config)
    return None if eos is None else int(eos[0])


def default_verifier(device: torch.device) -> Verifier:
    """The Triton kernel on CUDA, the batched tensor path elsewhere (both equal to the reference)."""
    if device.type == "cuda":
        try:
            from hf_specdec.trt_plugins.triton_kernel import verify_tree_triton
        except ImportError:  # no triton: the batched path runs on CUDA too
            return verify_tree_batched
        return verify_tree_triton
    return verify_tree_batched


def make_decoder(target: ModelBackend, draft: ModelBackend | None, config: SpeculativeConfig,
                 generation_config: GenerationConfig, logits_processor, stopping_criteria, max_length: int,
                 verifier: Verifier | None = None, streamer=None, profile: bool = True) -> SpeculativeDecoder:
    """The one way from a GenerationConfig (and the processors and criteria generate() or `decode` built from it)
    to the speculative loop."""
    if draft is not None and draft.vocab_size != target.vocab_size:
        raise ValueError(f"draft vocabulary ({draft.vocab_size}) differs from the target's ({target.vocab_size})")
    if draft is not None and getattr(draft, "reads_features", False) and draft.hidden_size != target.hidden_size:
        raise ValueError(
            f"the feature draft reads hidden states of size {draft.hidden_size}, but the target's are of size "
            f"{target.hidden_size}: it was trained for another target; use the draft trained for this one"
        )
    returns_dict = generation_config.return_dict_in_generate
    return SpeculativeDecoder(
        target=target,
        draft=draft if config.is_speculative else None,
        config=config,
        logits_processor=logits_processor,
        stopping_criteria=stopping_criteria,
        do_sample=generation_config.do_sample,
        max_length=max_length,
        pad_token_id=pad_token_id(generation_config),
        verifier=verifier or default_verifier(target.device),
        streamer=streamer,
        output_scores=bool(generation_config.output_scores and returns_dict),
        output_logits=bool(generation_config.output_logits and returns_dict),
        profile=profile,
    )


def decode(
    target: ModelBackend,
    draft: ModelBackend | None,
    input_ids: torch.Tensor,
    generation_config: GenerationConfig,
    speculative_config: "str | SpeculativeConfig",
    attention_mask: torch.Tensor | None = None,
    streamer=None,
    verifier: Verifier | None = None,
) -> DecodeResult:
    """Generate with `target` (and `draft`, unless the config is `ar`) as `generate` would with this config.
    `input_ids` [B, P] left-padded where `attention_mask` is 0. Seed with `torch.manual_seed` for reproducible sampling.
    `verifier`: an implementation of the verifier interface (e.g. a TensorRT verify engine); default: the device's."""
    length = max_length(generation_config, input_ids.shape[1])
    generation_config = with_defaults(generation_config)
    _check_supported(generation_config)
    config = SpeculativeConfig.parse(speculative_config)
    if config.method == "auto":
        raise ValueError("speculative_config='auto' needs the planner and PyTorch models; pass an explicit config such as 'rsd-s:w=3,d=4'")
    input_ids = input_ids.to(target.device)
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(target.device)
    if isinstance(target, HFBackend):  # as speculative_generate: the one rotary schedule the loop cannot reproduce
        check_rope_supported(target.model, attention_mask, length)
    decoder = make_decoder(
        target, draft, config, generation_config,
        logits_processors(generation_config, input_ids, attention_mask),
        stopping_criteria(generation_config, length),
        length,
        verifier=verifier, streamer=streamer,
    )
    return decoder.generate(input_ids, attention_mask)

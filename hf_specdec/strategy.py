"""`speculative_generate`: the custom generation strategy for `model.generate(custom_generate=...)`.

    out = target.generate(**inputs, custom_generate=speculative_generate, draft_model=draft,
                          speculative_config="rsd-s:w=4,d=5", do_sample=True, max_new_tokens=128)

generate() prepares the GenerationConfig, logits processors and stopping criteria and then calls this function;
everything it prepared is honoured. Keywords of our own: `draft_model`, `speculative_config` (a string in the
`SpeculativeConfig` grammar or a `SpeculativeConfig`; default "auto") and `speculative_streamer` (generate() keeps
its own `streamer=` argument for itself and does not forward it to a custom strategy).
"""

from __future__ import annotations

import functools
import inspect
import sys
import time
from dataclasses import dataclass

import torch
from transformers.generation.utils import GenerateDecoderOnlyOutput, GenerationMixin

from hf_specdec.backends.cpu_kernels import packed_linears, prepacking_pays
from hf_specdec.backends.hf import HFBackend, check_runnable
from hf_specdec.compat import user_cache
from hf_specdec.config import SpeculativeConfig
from hf_specdec.distributed import (
    LockstepBackend, LockstepCheck, check_sharded_pair, share_random_state, tensor_parallel,
)
from hf_specdec.feature_draft import check_feature_draft, reads_target_features
from hf_specdec.generation import make_decoder
from hf_specdec.loop import SpeculativeStats
from hf_specdec.rope import check_supported as check_rope_supported


@dataclass
class SpeculativeDecoderOnlyOutput(GenerateDecoderOnlyOutput):
    """`GenerateDecoderOnlyOutput` plus what the speculative loop did (`return_dict_in_generate=True`)."""

    speculative_stats: SpeculativeStats | None = None


def _keep_tokenizer_for_custom_strategies() -> None:
    """generate() drops `tokenizer=` when the strategy is a callable, and then cannot build the criteria for
    `stop_strings` ("could not locate a tokenizer") although the user passed one. Keep it for callables that take a
    `tokenizer` parameter, so that stop strings work as in plain generate; other callables see no change."""
    original = GenerationMixin._extract_generation_mode_kwargs
    if getattr(original, "keeps_tokenizer", False):
        return

    @functools.wraps(original)
    def extract(self, custom_generate, kwargs, *args, **kw):
        tokenizer = kwargs.get("tokenizer")
        mode_kwargs = original(self, custom_generate, kwargs, *args, **kw)
        if callable(custom_generate) and tokenizer is not None and "tokenizer" in inspect.signature(custom_generate).parameters:
            mode_kwargs["tokenizer"] = tokenizer
        return mode_kwargs

    extract.keeps_tokenizer = True
    GenerationMixin._extract_generation_mode_kwargs = extract


_keep_tokenizer_for_custom_strategies()


def _arguments_generate_kept(stack_depth: int = 2) -> dict:
    """generate() keeps `assistant_model` and `streamer` to itself when the strategy is a callable; look them up in its
    frame so that passing them gives a clear error instead of being silently ignored."""
    frame = sys._getframe(stack_depth)
    while frame is not None and frame.f_code.co_name != "generate":
        frame = frame.f_back
    if frame is None:
        return {}
    return {name: frame.f_locals.get(name) for name in ("assistant_model", "streamer")}


def _validate(model, draft_model, config: SpeculativeConfig, generation_config, input_ids, model_kwargs, streamer) -> None:
    batch_size = input_ids.shape[0]
    kept = _arguments_generate_kept(stack_depth=3)
    if kept.get("assistant_model") is not None:
        raise ValueError(
            "speculative_generate takes its draft as draft_model=..., not assistant_model= "
            "(assistant_model selects HF's own assisted generation)"
        )
    if kept.get("streamer") is not None:
        raise ValueError(
            "generate() does not forward streamer= to a custom strategy; pass it as speculative_streamer=... instead"
        )
    if model.config.is_encoder_decoder:
        raise ValueError("speculative_generate supports decoder-only models only")
    check_runnable(model, "target")
    if generation_config.num_beams > 1:
        raise ValueError(
            f"num_beams={generation_config.num_beams} is not supported: speculative decoding reproduces greedy or "
            "sampled decoding; set num_beams=1"
        )
    if generation_config.num_return_sequences > 1 and not generation_config.do_sample:
        raise ValueError("num_return_sequences > 1 needs do_sample=True (greedy decoding returns one sequence)")
    for flag in ("output_attentions", "output_hidden_states"):
        if getattr(generation_config, flag):
            raise ValueError(f"{flag}=True is not supported by speculative_generate; set it to False")
    cache = user_cache(model_kwargs)
    if cache is not None and (getattr(cache, "_is_user_defined", False) or cache.get_seq_length() > 0):
        raise ValueError("speculative_generate builds its own caches; do not pass a KV cache (cache= / past_key_values=)")
    if generation_config.cache_implementation == "quantized":
        raise ValueError(
            "cache_implementation='quantized' changes the target's numbers, and speculative_generate keeps full-precision "
            "caches of its own; unset cache_implementation, or use plain generate() for a quantized cache"
        )
    if model_kwargs.get("inputs_embeds") is not None:
        raise ValueError("speculative_generate needs input_ids, not inputs_embeds")
    _check_model_inputs(input_ids, model_kwargs)
    if streamer is not None and batch_size > 1:
        raise ValueError("speculative_streamer supports batch size 1 (as HF streamers do)")
    if not config.is_speculative and config.method != "auto":
        return
    if draft_model is None:
        raise ValueError(f"speculative_config={str(config)!r} needs a draft model: pass draft_model=... to generate()")
    if draft_model.device.type == "meta":
        raise ValueError(
            "the draft model's weights are on the meta device (not loaded): load them, e.g. "
            "AutoModelForCausalLM.from_pretrained(path, device_map='cpu'), or draft_model.to_empty(device='cpu') "
            "followed by draft_model.load_state_dict(...)"
        )
    check_runnable(draft_model, "draft")
    if draft_model.device != model.device:
        raise ValueError(
            f"draft and target are on different devices ({draft_model.device} vs {model.device}); "
            f"move the draft with draft_model.to({str(model.device)!r})"
        )
    target_vocab = model.config.get_text_config().vocab_size
    draft_vocab = draft_model.config.get_text_config().vocab_size
    if target_vocab != draft_vocab:
        raise ValueError(
            f"draft vocabulary ({draft_vocab} tokens) differs from the target's ({target_vocab}): the draft must use the "
            "target's tokenizer; if only the embedding padding differs, call "
            f"draft_model.resize_token_embeddings({target_vocab})"
        )
    if reads_target_features(draft_model):
        check_feature_draft(draft_model, model)


# what generate() itself puts in the model keywords (plus the cache and inputs_embeds, checked above): the loop builds
# each of them for every tree forward
_GENERATE_MODEL_INPUTS = frozenset({"attention_mask", "position_ids", "cache_position", "logits_to_keep", "use_cache",
                                    "cache", "past_key_values", "inputs_embeds"})


def _check_model_inputs(input_ids, model_kwargs) -> None:
    """Model inputs the loop would not pass on (token_type_ids, pixel_values, ...) and position ids other than
    generate's own are refused: the tree forwards would run without them."""
    extra = sorted(k for k, v in model_kwargs.items() if v is not None and k not in _GENERATE_MODEL_INPUTS)
    if extra:
        raise ValueError(
            f"speculative_generate does not pass {', '.join(extra)} to the model (its tree forwards take token ids, "
            "the attention mask and positions only); generate without them, or use plain generate()"
        )
    position_ids = model_kwargs.get("position_ids")
    if position_ids is None:
        return
    mask = model_kwargs.get("attention_mask")
    real = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
    default = real.long().cumsum(-1) - 1  # generate's positions of the real tokens (padding's do not matter)
    if position_ids.shape != default.shape or not torch.equal(position_ids.to(default.device)[real], default[real]):
        raise ValueError(
            "speculative_generate numbers positions as generate does by default (from the attention mask); "
            "pass no position_ids"
        )


def _sampling_temperature(generation_config) -> float:
    """The temperature acceptance statistics are kept under (0 = greedy)."""
    return float(generation_config.temperature or 1.0) if generation_config.do_sample else 0.0


def _resolve_config(speculative_config, model, draft_model, batch_size: int, context_length: int,
                    generation_config) -> SpeculativeConfig:
    config = SpeculativeConfig.parse(speculative_config)
    if config.method != "auto":
        return config
    from hf_specdec.planner import choose_config
    from hf_specdec.planner.loop_cost import Sampling

    return choose_config(model, draft_model, batch_size=batch_size, context_length=context_length,
                         temperature=_sampling_temperature(generation_config), sampling=Sampling.of(generation_config))


def speculative_generate(
    model,
    input_ids: torch.LongTensor,
    logits_processor,
    stopping_criteria,
    generation_config,
    draft_model=None,
    speculative_config: "str | SpeculativeConfig" = "auto",
    speculative_streamer=None,
    tokenizer=None,
    **model_kwargs,
):
    """Tree speculative decoding as a `generate` strategy. Returns what `generate` returns: the token tensor, or with
    `return_dict_in_generate=True` a `SpeculativeDecoderOnlyOutput` that also carries `speculative_stats`."""
    batch_size = input_ids.shape[0]
    requested = SpeculativeConfig.parse(speculative_config)
    _validate(
        model,
        draft_model,
        requested,
        generation_config,
        input_ids,
        model_kwargs,
        speculative_streamer,
    )
    attention_mask = model_kwargs.get("attention_mask")
    check_rope_supported(model, torch.ones_like(input_ids) if attention_mask is None else attention_mask,
                         generation_config.max_length)
    temperature = _sampling_temperature(generation_config)
    sharding = check_sharded_pair(model, draft_model)
    if sharding is not None and requested.method == "auto":
        raise ValueError(
            "speculative_config='auto' is not available on a tensor-parallel target: it picks a tree from timings "
            "taken in this process, which differ between ranks; pass an explicit config (e.g. 'rsd-s:w=4,d=4', or "
            "what auto picks for the unsharded pair)"
        )
    config = _resolve_config(requested, model, draft_model, batch_size, input_ids.shape[1], generation_config)
    if config.method == "ar" and requested.method == "auto":
        # nothing is predicted to beat plain decoding: run it, in transformers' own loop, so that auto costs nothing
        # (with the one-token kernels measured fastest here, which the planner's baseline is)
        return _plain_generate(model, draft_model, input_ids, logits_processor, stopping_criteria, generation_config,
                               speculative_streamer, model_kwargs)
    target, draft = HFBackend(model, "target"), HFBackend(draft_model, "draft") if config.is_speculative else None
    if sharding is not None:
        # every rank runs this loop in lockstep: one random stream, and each collective call checked first
        share_random_state(sharding, model.device)
        lockstep = LockstepCheck(sharding, model.device)
        target = LockstepBackend(target, lockstep, "target")
        if draft is not None and tensor_parallel(draft_model) is not None:
            draft = LockstepBackend(draft, lockstep, "draft")
    decoder = make_decoder(
        target,
        draft,
        config,
        generation_config,
        logits_processor,
        stopping_criteria,
        generation_config.max_length,
        streamer=speculative_streamer,
        # phase timings synchronise CUDA: only when the statistics are returned
        profile=generation_config.return_dict_in_generate,
    )
    # kernels chosen by measuring them here: the target scores the whole tree, the draft one level at a time
    widths = config.level_widths()
    pack_target = prepacking_pays(model, config.tree_size + 1)
    pack_draft = config.is_speculative and prepacking_pays(draft_model, max(widths) if widths else 1)
    with packed_linears(model, pack_target), packed_linears(draft_model, pack_draft):
        result = decoder.generate(input_ids, model_kwargs.get("attention_mask"))
    if sharding is not None:
        lockstep("the generated sequences", [result.sequences])
    if config.is_speculative and (sharding is None or sharding.is_first):
        from hf_specdec.planner import record_acceptance
        from hf_specdec.planner.step_times import record_step_time

        # what "auto" learns from: this pair's acceptance, and what a step of this shape took here (under the tree's
        # largest shape: auto runs its shapes grown dynamically, so the statistics describe what it runs)
        stats, shape = result.stats, config.largest_shape()
        record_acceptance(model, draft_model, shape, stats.block_efficiency, stats.row_steps, temperature)
        if stats.target_calls:
            record_step_time(model, draft_model, str(shape), (stats.time_total - stats.time_prefill) / stats.target_calls,
                             batch_size)
    if not generation_config.return_dict_in_generate:
        return result.sequences
    return SpeculativeDecoderOnlyOutput(
        sequences=result.sequences, scores=result.scores, logits=result.logits, speculative_stats=result.stats
    )


def _plain_generate(model, draft_model, input_ids, logits_processor, stopping_criteria, generation_config, streamer,
                    model_kwargs):
    from hf_specdec.planner.step_times import PLAIN, record_step_time

    start = time.perf_counter()
    if streamer is not None:  # generate() puts the prompt before it calls a strategy; it has not for this one
        streamer.put(input_ids.cpu())
    with packed_linears(model, prepacking_pays(model, 1)):
        out = model._sample(input_ids, logits_processor=logits_processor, stopping_criteria=stopping_criteria,
                            generation_config=generation_config, synced_gpus=False, streamer=streamer, **model_kwargs)
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    batch, steps = sequences.shape[0], sequences.shape[1] - input_ids.shape[1]
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    if steps:  # what plain decoding costs per token here, as auto runs it: auto compares trees with it
        record_step_time(model, draft_model, PLAIN, (time.perf_counter() - start) / steps, batch)
    if not generation_config.return_dict_in_generate:
        return out
    stats = SpeculativeStats(config="ar (plain generate, chosen by auto)", batch_size=batch, target_calls=steps,
                             row_steps=batch * steps, generated_tokens=batch * steps,
                             accepted_lengths=[[0] * steps for _ in range(batch)],
                             time_total=time.perf_counter() - start)
    return SpeculativeDecoderOnlyOutput(**{**out, "speculative_stats": stats})

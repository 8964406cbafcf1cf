"""Tiny randomly initialised causal LMs of several families, for tests."""

from __future__ import annotations

import string

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    PreTrainedTokenizerFast,
    Qwen2ForCausalLM,
)

FAMILIES = ("llama", "qwen2", "mistral", "gpt2", "opt")


def left_padded_prompts(pad_lengths: list[int], length: int, vocab_size: int, seed: int) -> dict[str, torch.Tensor]:
    """Random prompts (token ids >= 3, clear of special ids) of `length` slots, row i left-padded with
    `pad_lengths[i]` zeros: {"input_ids", "attention_mask"} as a tokenizer returns them."""
    torch.manual_seed(seed)
    input_ids = torch.randint(3, vocab_size, (len(pad_lengths), length))
    attention_mask = torch.ones_like(input_ids)
    for row, pad in enumerate(pad_lengths):
        attention_mask[row, :pad] = 0
    input_ids[attention_mask == 0] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def tiny_model(family: str = "llama", vocab_size: int = 64, attn_implementation: str = "sdpa", seed: int = 0, scale: float = 0.02, **overrides):
    """A 2-layer model of `family`; `scale` is the init std (larger gives peakier distributions)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, attn_implementation=attn_implementation, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "llama":
        config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=256, initializer_range=scale, **common)
        cls = LlamaForCausalLM
    elif family == "qwen2":
        config = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=256, initializer_range=scale, **common)
        cls = Qwen2ForCausalLM
    elif family == "mistral":
        # a short sliding window so that 64 new tokens cross it
        config = MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, max_position_embeddings=256, sliding_window=12,
                               initializer_range=scale, **common)
        cls = MistralForCausalLM
    elif family == "gpt2":
        config = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, initializer_range=scale, **common)
        cls = GPT2LMHeadModel
    elif family == "opt":
        config = OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=256, word_embed_proj_dim=32, init_std=scale, **common)
        cls = OPTForCausalLM
    else:
        raise ValueError(family)
    for key, value in overrides.items():
        setattr(config, key, value)
    return cls(config).eval()


def perturbed_copy(model, noise: float, seed: int = 1):
    """The same model with Gaussian noise on every weight: a draft that agrees with it often but not always."""
    torch.manual_seed(seed)
    draft = type(model)(model.config).eval()
    draft.load_state_dict(model.state_dict())
    with torch.no_grad():
        for parameter in draft.parameters():
            parameter.add_(noise * parameter.std() * torch.randn_like(parameter))
    return draft


def character_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer for the tiny models' first 96 ids: <pad>=0, <bos>=1, <eos>=2, then characters."""
    characters = (string.ascii_letters + string.digits + " .,;:!?-+*/()[]{}<>=_#@$%&|~^'\"`")[:93]
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{c: i + 3 for i, c in enumerate(characters)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Whitespace-separated tokens t0 .. t<vocab-1> (t0 pad, t1 bos, t2 eos, as in the tiny models)."""
    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="t0", bos_token="t1", eos_token="t2")


# families beyond FAMILIES, for tests/test_families.py ("falcon" is the old Falcon-7B layout, "falcon-new" the
# new_decoder_architecture of Falcon-40B/180B)
MORE_FAMILIES = ("gemma2", "gemma3", "phi3", "qwen3", "qwen3-moe", "mixtral", "olmo2", "cohere", "granite",
                 "gpt-neox", "falcon", "falcon-new", "stablelm")


def tiny_family_model(family: str, vocab_size: int = 96, attn_implementation: str = "sdpa", seed: int = 0,
                      scale: float = 0.3, **overrides):
    """A 2-layer model of one of MORE_FAMILIES (hidden 32, 4 heads, max_position_embeddings 256, pad 0 / bos 1 /
    eos 2); gemma2, gemma3, phi3 and mixtral get a sliding window of 12 so that a few dozen new tokens cross it."""
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, attn_implementation=attn_implementation, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2, max_position_embeddings=256, initializer_range=scale, num_hidden_layers=2,
                  hidden_size=32, num_attention_heads=4)
    llama_like = dict(intermediate_size=64, num_key_value_heads=2)
    # untied: Gemma scales embeddings by sqrt(hidden), and with a tied head a random tiny model just repeats its input
    gemma_like = dict(intermediate_size=64, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, sliding_window=12,
                      tie_word_embeddings=False)
    moe = dict(intermediate_size=64, num_key_value_heads=2, num_experts_per_tok=2)
    specs = {
        # layer_types default to sliding, full; soft-caps small enough to bind on these logits and scores
        "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
                   dict(gemma_like, final_logit_softcapping=4.0, attn_logit_softcapping=2.0)),
        "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                   dict(gemma_like, layer_types=["sliding_attention", "full_attention"])),
        # default rope; released Phi-3 configs set a sliding_window (2047 for mini-4k), here a crossed one
        "phi3": ("Phi3Config", "Phi3ForCausalLM",
                 dict(llama_like, original_max_position_embeddings=256, sliding_window=12)),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(llama_like, head_dim=8)),
        "qwen3-moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                      dict(moe, num_experts=4, moe_intermediate_size=32, norm_topk_prob=True)),
        "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(moe, num_local_experts=4, sliding_window=12)),
        "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", llama_like),
        "cohere": ("CohereConfig", "CohereForCausalLM", dict(llama_like, logit_scale=0.5)),
        "granite": ("GraniteConfig", "GraniteForCausalLM",
                    dict(llama_like, embedding_multiplier=2.0, attention_multiplier=0.25, residual_multiplier=0.5,
                         logits_scaling=0.5)),
        "gpt-neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(intermediate_size=64)),
        "falcon": ("FalconConfig", "FalconForCausalLM",
                   dict(ffn_hidden_size=64, alibi=False, new_decoder_architecture=False, multi_query=True)),
        "falcon-new": ("FalconConfig", "FalconForCausalLM",
                       dict(ffn_hidden_size=64, alibi=False, new_decoder_architecture=True, num_kv_heads=2)),
        "stablelm": ("StableLmConfig", "StableLmForCausalLM", dict(llama_like, qk_layernorm=True)),
    }
    if family not in specs:
        raise ValueError(family)
    config_name, model_name, extra = specs[family]
    config = getattr(transformers, config_name)(**common, **extra)
    for key, value in overrides.items():
        setattr(config, key, value)
    return getattr(transformers, model_name)(config).eval()

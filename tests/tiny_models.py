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

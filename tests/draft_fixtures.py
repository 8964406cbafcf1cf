"""A tiny random Llama target with a word-level tokenizer, for the draft and distillation tests."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB_SIZE = 64
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Words `w3` .. `w63` are tokens 3 .. 63."""
    vocab = {"<pad>": PAD_ID, "<s>": BOS_ID, "</s>": EOS_ID} | {f"w{i}": i for i in range(3, VOCAB_SIZE)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


# a tied-embedding Llama like SmolLM2 at toy size, with peaky enough distributions to stop at EOS
TINY_LLAMA_SHAPE = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    initializer_range=0.2,
    tie_word_embeddings=True,
    pad_token_id=PAD_ID,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
)


def tiny_target(num_layers: int = 3, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=num_layers, **TINY_LLAMA_SHAPE)).eval()


def prompts(count: int, seed: int = 0) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 9, (count,), generator=generator)
    return [" ".join(f"w{int(t)}" for t in torch.randint(3, VOCAB_SIZE, (n,), generator=generator)) for n in lengths]

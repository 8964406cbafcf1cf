"""Teacher data by teacher forcing: the target reads whole ShareGPT conversations once, and every position's
LM-head input is stored. One forward per conversation instead of one per generated token.

What a position stores (per conversation of T tokens, in the target's chat template, cut at `max_tokens`):
- `tokens` [T]: the token ids;
- `assistant` [T]: whether the token belongs to an assistant turn (its text or the end-of-turn token): the positions
  a draft is trained to predict (user turns and the system prompt are context only);
- `features` [T, H] fp16: the target's last hidden state after its final norm, i.e. the input of its LM head. It is
  both what a feature-conditioned draft reads (the target's state at t) and what p is recomputed from on demand:
  p(x_{t+1} | x_{<=t}) = softmax(lm_head(features[t])), exactly up to fp16 rounding of the features.

Conversations come from the train split of `hf_specdec.data` (a conversation belongs to the split of its first user
turn, so no held-out prompt is ever read), in the split's fixed order. The data is written in shards of whole
conversations (safetensors, memory-mapped when read) with a `manifest.json` that records the recipe; a killed run
resumes at the first missing shard and produces the same files as an uninterrupted one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from hf_specdec.data import train_conversations
from hf_specdec.planner.storage import weights_fingerprint

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


# ------------------------------------------------------------------------------------------------ tokenization
def tokenize_conversation(tokenizer, messages: list[dict], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(token ids [T], assistant mask [T]) of a chat in the tokenizer's template, cut at `max_tokens`; None when no
    assistant token is left. An assistant token is one whose text starts inside an assistant turn's content or its
    end of turn (found from the template's rendering of each prefix of the chat, which chat templates render as a
    prefix of the whole)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
        end = len(tokenizer.apply_chat_template(messages[: i + 1], tokenize=False))
        if not text.startswith(tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)):
            raise ValueError("the chat template does not render a conversation's prefixes as prefixes of the whole")
        spans.append((start, end))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = torch.tensor(encoded.input_ids[:max_tokens], dtype=torch.int32)
    starts = torch.tensor([offset[0] for offset in encoded.offset_mapping[:max_tokens]])
    assistant = torch.zeros(len(ids), dtype=torch.bool)
    for start, end in spans:
        assistant |= (starts >= start) & (starts < end)
    # the first token is never predicted (nothing precedes it)
    if not assistant[1:].any():
        return None
    return ids, assistant


@dataclass
class Conversation:
    tokens: torch.Tensor  # int32 [T]
    assistant: torch.Tensor  # bool [T]


def plan_conversations(tokenizer, max_tokens: int, positions: int, chats: Iterable[list[dict]]) -> list[Conversation]:
    """`chats` (chat messages), tokenized, in order, until they hold `positions` positions."""
    chosen, total = [], 0
    for messages in chats:
        tokenized = tokenize_conversation(tokenizer, messages, max_tokens)
        if tokenized is None:
            continue
        chosen.append(Conversation(*tokenized))
        total += len(tokenized[0])
        if total >= positions:
            return chosen
    raise ValueError(
        f"the conversations hold only {total} positions at --max-tokens {max_tokens}, {positions} were asked for: "
        "ask for fewer positions or raise --max-tokens"
    )


def shard_plan(conversations: list[Conversation], shard_positions: int) -> list[list[int]]:
    """Consecutive conversations per shard, each shard holding at least `shard_positions` positions (the last
    fewer)."""
    shards, current, size = [], [], 0
    for index, conversation in enumerate(conversations):
        current.append(index)
        size += len(conversation.tokens)
        if size >= shard_positions:
            shards.append(current)
            current, size = [], 0
    if current:
        shards.append(current)
    return shards


# ------------------------------------------------------------------------------------------------ target forward
@torch.no_grad()
def lm_head_inputs(target, token_ids: torch.Tensor) -> torch.Tensor:
    """The target's LM-head input at every position of one sequence [T] -> [T, H] (the base model's last hidden
    state: after the final norm; the head itself is not run)."""
    base = target.get_decoder() if hasattr(target, "get_decoder") else target.model
    return base(input_ids=token_ids[None].long()).last_hidden_state[0]


def _recipe(target, tokenizer, max_tokens: int, positions: int, shard_positions: int) -> dict:
    config = target.config.get_text_config()
    return {
        "format": FORMAT_VERSION,
        "target_config": {k: getattr(config, k, None) for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")},
        # one config, other weights (a base model and its instruct tune): other teacher data
        "target_weights": weights_fingerprint(target, with_name=False),
        "tokenizer_vocab": len(tokenizer),
        "max_tokens": max_tokens,
        "positions": positions,
        "shard_positions": shard_positions,
        "split": "train",
        "feature": "lm_head_input",
        "feature_dtype": "float16",
    }


def build_teacher_data(target, tokenizer, out_dir: Path, positions: int, max_tokens: int = 1024,
                       shard_positions: int = 65536, chats: Iterable[list[dict]] | None = None,
                       log=print) -> "TeacherData":
    """Write (or complete) the teacher data for `positions` positions into `out_dir`; returns it opened. `chats`:
    the conversations to read (default: the ShareGPT train split, `hf_specdec.data.train_conversations`)."""
    recipe = _recipe(target, tokenizer, max_tokens, positions, shard_positions)
    _check_recipe(Path(out_dir), recipe)
    conversations = plan_conversations(tokenizer, max_tokens, positions,
                                       train_conversations() if chats is None else chats)
    return _teacher_force(target, Path(out_dir), recipe, conversations, shard_positions, log)


def build_generated_teacher_data(target, tokenizer, out_dir: Path, prompts: int, max_new_tokens: int = 192,
                                 max_prompt_tokens: int = 128, batch_size: int = 64, seed: int = 0,
                                 shard_positions: int = 65536, log=print) -> "TeacherData":
    """Teacher data on the target's own text: it continues the first `prompts` train-split prompts (plain
    temperature-1 sampling), and then reads each prompt + continuation once like a conversation, the continuation
    being the assistant turn. A small target writes text unlike ShareGPT's (simpler, more repetitive), and that is
    the text a draft meets when it drafts for it. Continuations are generated in batches saved under
    `out_dir/generated/` (resumable, as the shards)."""
    from hf_specdec.data import train_prompts

    recipe = {**_recipe(target, tokenizer, max_prompt_tokens + max_new_tokens, 0, shard_positions),
              "source": "target continuations", "prompts": prompts, "max_new_tokens": max_new_tokens,
              "max_prompt_tokens": max_prompt_tokens, "batch_size": batch_size, "seed": seed}
    _check_recipe(Path(out_dir), recipe)
    texts = train_prompts(prompts, tokenizer, max_prompt_tokens)
    samples = target_continuations(target, tokenizer, texts, Path(out_dir) / "generated", batch_size, max_new_tokens,
                                   seed, greedy=False)
    conversations = []
    for sample in samples:
        assistant = torch.zeros(len(sample.token_ids), dtype=torch.bool)
        assistant[sample.prompt_len:] = True
        conversations.append(Conversation(sample.token_ids, assistant))
    return _teacher_force(target, Path(out_dir), recipe, conversations, shard_positions, log)


def _check_recipe(out_dir: Path, recipe: dict) -> None:
    manifest_path = out_dir / MANIFEST
    if manifest_path.exists():
        saved = json.loads(manifest_path.read_text())
        if "target_weights" not in saved["recipe"]:
            raise ValueError(
                f"{out_dir} holds teacher data that does not say which target's weights wrote it; if this target did, "
                f"add \"target_weights\": \"{recipe['target_weights']}\" to the recipe in {manifest_path}, else use "
                "another directory"
            )
        if saved["recipe"] != recipe:
            raise ValueError(
                f"{out_dir} holds teacher data made with another recipe ({saved['recipe']}): use another directory"
            )


def _teacher_force(target, out_dir: Path, recipe: dict, conversations: list[Conversation], shard_positions: int,
                   log) -> "TeacherData":
    """The target reads every conversation once; shards of whole conversations, those already there reused."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = shard_plan(conversations, shard_positions)
    manifest = {"recipe": recipe, "shards": [f"shard-{i:05d}.safetensors" for i in range(len(shards))],
                "conversations": len(conversations),
                "positions": sum(len(c.tokens) for c in conversations),
                "assistant_positions": int(sum(int(c.assistant.sum()) for c in conversations))}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    missing = [i for i, name in enumerate(manifest["shards"]) if not (out_dir / name).exists()]
    todo = sum(len(conversations[c].tokens) for i in missing for c in shards[i])
    hidden = target.config.get_text_config().hidden_size
    if todo:
        seconds_per_position = _time_per_position(target, conversations[shards[missing[0]][0]].tokens)
        log(f"teacher data: {manifest['positions']:,} positions in {len(conversations):,} conversations "
            f"({manifest['assistant_positions']:,} in assistant turns), {len(shards)} shards, "
            f"{manifest['positions'] * (2 * hidden + 5) / 2**30:.2f} GiB; {todo:,} positions to compute, "
            f"about {todo * seconds_per_position / 60:.0f} minutes here ({1 / seconds_per_position:.0f} positions/s)")
    progress = tqdm(total=todo, unit="pos", unit_scale=True, desc="teacher forcing", smoothing=0.05)
    started = time.perf_counter()
    for shard in missing:
        members = [conversations[c] for c in shards[shard]]
        features = []
        for conversation in members:
            features.append(lm_head_inputs(target, conversation.tokens).to(torch.float16))
            progress.update(len(conversation.tokens))
        _write_shard(out_dir / manifest["shards"][shard], members, features)
    progress.close()
    if todo:
        elapsed = time.perf_counter() - started
        log(f"teacher data: {todo:,} positions in {elapsed / 60:.1f} minutes ({todo / elapsed:.0f} positions/s)")
    return TeacherData(out_dir)


# ------------------------------------------------------------------------------------------------ continuations
@dataclass
class Continuation:
    """One target continuation: `token_ids` = prompt + generated tokens (EOS included when reached).

    Row t of `hidden` is the target's LM-head input for generated token t (position `prompt_len + t` given
    `token_ids[: prompt_len + t]`): p = softmax(lm_head(hidden[t])).
    """

    token_ids: torch.Tensor  # int32 [prompt_len + generated]
    prompt_len: int
    hidden: torch.Tensor  # float32 [generated, hidden_size]

    @property
    def generated_len(self) -> int:
        return len(self.token_ids) - self.prompt_len


@torch.no_grad()
def generate_continuations(target, tokenizer, prompts: list[str], max_new_tokens: int, greedy: bool) -> list[Continuation]:
    """Continue `prompts` with `target` (plain temperature-1 sampling, or greedy), recording the LM-head input at every
    generated position."""
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    recorded = []
    hook = target.get_output_embeddings().register_forward_hook(
        lambda module, inputs, output: recorded.append(inputs[0][:, -1].float()))
    try:
        # no top-k / top-p warper, so the sampled p is exactly the head's softmax
        sampling = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
        sequences = target.generate(**batch, **sampling, max_new_tokens=max_new_tokens,
                                    pad_token_id=tokenizer.pad_token_id)
    finally:
        hook.remove()
    padded_prompt_len = batch.input_ids.shape[1]
    hidden = torch.stack(recorded, dim=1)  # one head call per generated token
    eos = target.generation_config.eos_token_id
    stop_ids = torch.tensor([eos] if isinstance(eos, int) else list(eos or []))
    samples = []
    for row, prompt_mask in enumerate(batch.attention_mask.bool()):
        prompt = sequences[row, :padded_prompt_len][prompt_mask]
        generated = sequences[row, padded_prompt_len:]
        stops = torch.isin(generated, stop_ids).nonzero()
        length = int(stops[0]) + 1 if len(stops) else len(generated)
        samples.append(Continuation(torch.cat([prompt, generated[:length]]).to(torch.int32), len(prompt),
                                    hidden[row, :length].clone()))
    return samples


def target_continuations(target, tokenizer, prompts: list[str], out_dir: Path, batch_size: int, max_new_tokens: int,
                         seed: int, greedy: bool) -> list[Continuation]:
    """`generate_continuations` for all `prompts`, one file per batch in `out_dir`; batches already there are
    reused (a resumed run samples exactly what the first run would have)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ordered = sorted(prompts, key=len)  # similar lengths share a batch: less left padding
    samples = []
    batches = [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
    for index, batch in enumerate(tqdm(batches, desc="target continuations", unit="batch")):
        path = out_dir / f"batch-{index:05d}.pt"
        recipe = {"prompts": batch, "max_new_tokens": max_new_tokens, "greedy": greedy, "seed": seed + index}
        if path.exists():
            saved = torch.load(path)
            if saved["recipe"] != recipe:
                raise ValueError(f"{path} was generated with other prompts or settings: use another output directory")
            samples.extend(Continuation(**fields) for fields in saved["samples"])
            continue
        torch.manual_seed(recipe["seed"])
        generated = generate_continuations(target, tokenizer, batch, max_new_tokens, greedy)
        staging = path.with_suffix(".tmp")
        torch.save({"recipe": recipe, "samples": [vars(sample) for sample in generated]}, staging)
        staging.replace(path)  # a killed run never leaves half a batch behind
        samples.extend(generated)
    return samples


@torch.no_grad()
def _time_per_position(target, tokens: torch.Tensor) -> float:
    lm_head_inputs(target, tokens[:64])  # warm-up
    start = time.perf_counter()
    lm_head_inputs(target, tokens)
    return (time.perf_counter() - start) / len(tokens)


def _write_shard(path: Path, conversations: list[Conversation], features: list[torch.Tensor]) -> None:
    lengths = torch.tensor([len(c.tokens) for c in conversations])
    tensors = {
        "tokens": torch.cat([c.tokens for c in conversations]),
        "assistant": torch.cat([c.assistant for c in conversations]),
        "features": torch.cat(features),
        "starts": torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
    }
    staging = path.with_suffix(".tmp")
    save_file(tensors, str(staging))
    staging.replace(path)  # a killed run never leaves half a shard behind


# ------------------------------------------------------------------------------------------------ reading
@dataclass
class TeacherSequence:
    """One conversation of the teacher data."""

    tokens: torch.Tensor  # int32 [T]
    assistant: torch.Tensor  # bool [T]
    features: torch.Tensor  # fp16 [T, H]: LM-head input at every position


class TeacherData:
    """The teacher data in a directory, read lazily: `len(data)` conversations, `data[i]` a `TeacherSequence`."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        manifest_path = self.directory / MANIFEST
        if not manifest_path.exists():
            raise FileNotFoundError(f"no teacher data in {self.directory} (no {MANIFEST}): run `hf-specdec distill` "
                                    "with --teacher-dir pointing there to build it")
        self.manifest = json.loads(manifest_path.read_text())
        missing = [name for name in self.manifest["shards"] if not (self.directory / name).exists()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} teacher shards of {self.directory} are missing (e.g. {missing[0]}): "
                                    "run the same distill command again to complete them")
        self._shards = []
        self._index = []  # (shard, conversation in shard)
        for s, name in enumerate(self.manifest["shards"]):
            handle = safe_open(str(self.directory / name), framework="pt")
            starts = handle.get_tensor("starts")
            self._shards.append((handle, starts))
            self._index.extend((s, c) for c in range(len(starts) - 1))

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> TeacherSequence:
        shard, c = self._index[i]
        handle, starts = self._shards[shard]
        begin, end = int(starts[c]), int(starts[c + 1])
        return TeacherSequence(*(handle.get_slice(name)[begin:end] for name in ("tokens", "assistant", "features")))

    def lengths(self) -> list[int]:
        return [int(starts[c + 1] - starts[c]) for shard, c in self._index for starts in (self._shards[shard][1],)]

    @property
    def hidden_size(self) -> int:
        return int(self.manifest["recipe"]["target_config"]["hidden_size"])

    def __add__(self, other: "TeacherData") -> "TeacherData":
        if other.hidden_size != self.hidden_size:
            raise ValueError(f"teacher data of hidden sizes {self.hidden_size} and {other.hidden_size} do not mix")
        both = object.__new__(TeacherData)
        both.directory, both.manifest = self.directory, {**self.manifest, "positions": self.positions + other.positions}
        both._shards = self._shards + other._shards
        both._index = self._index + [(shard + len(self._shards), c) for shard, c in other._index]
        return both

    @property
    def positions(self) -> int:
        return int(self.manifest["positions"])

"""Distil a reduced-vocabulary draft model from a target model.

1. Teacher data: the target continues training-split prompts, sampling at temperature 1 (batched), and
   records at every generated position its top-k next-token log-probabilities; the rest of the mass is
   1 - sum(top-k). Training then never runs the target again.
2. Draft vocabulary: the `vocab_size` tokens with the largest total target probability over the teacher
   data (plus the special tokens), i.e. the subset that keeps the most of p reachable by q.
3. Draft initialisation from the target: embedding rows of the kept tokens (tied with the head), a rank-r
   SVD of the full embedding for the other input tokens, a few of its layers, its final norm.
4. Training: minimise KL(p || q) at every generated position, on the coarse distribution "each top-k token
   of p that the draft can emit, plus one bucket for everything else" (exact for the top-k, and the bucket
   keeps q from ignoring p's tail). Target top-k tokens outside the draft vocabulary are dropped and p is
   renormalised: q cannot put mass there, and alpha = sum_x min(p, q) is what matters.
"""

from __future__ import annotations

import collections
import copy
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hf_specdec.draft_model import ReducedVocabLlamaConfig, ReducedVocabLlamaForCausalLM


# ------------------------------------------------------------------------------------------------ teacher data
@dataclass
class TeacherSample:
    """One target continuation: `token_ids` = prompt + generated tokens (EOS included when reached).

    Row t of `hidden` / `logsumexp` describes the target's distribution for generated token t (position
    `prompt_len + t` given `token_ids[: prompt_len + t]`): p = exp(head(hidden[t]) - logsumexp[t]).
    """

    token_ids: torch.Tensor  # int32 [prompt_len + generated]
    prompt_len: int
    hidden: torch.Tensor  # float32 [generated, hidden_size]: the target's LM-head input
    logsumexp: torch.Tensor  # float32 [generated]: log-normaliser of the full-vocabulary logits

    @property
    def generated_len(self) -> int:
        return len(self.token_ids) - self.prompt_len


class LMHeadRecorder:
    """Forward hook on the target's LM head: per forward pass, the last position's head input and logsumexp.

    Storing the head input instead of top-k probabilities keeps p exact on any token subset (top-64 holds
    only ~80% of SmolLM2-135M's mass at temperature 1) for one subset-sized matmul per position in training.
    """

    def __init__(self):
        self.hidden: list[torch.Tensor] = []
        self.logsumexp: list[torch.Tensor] = []

    def __call__(self, module, inputs, logits):
        self.hidden.append(inputs[0][:, -1].float())
        self.logsumexp.append(logits[:, -1].float().logsumexp(dim=-1))


@torch.no_grad()
def generate_teacher_batch(
    target, tokenizer, prompts: list[str], max_new_tokens: int, greedy: bool = False
) -> list[TeacherSample]:
    """Continue `prompts` with `target` (temperature-1 sampling, or greedy), recording p at every new position."""
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    recorder = LMHeadRecorder()
    hook = target.get_output_embeddings().register_forward_hook(recorder)
    try:
        # plain temperature-1 sampling: no top-k / top-p warper, so the sampled p is exactly the head's softmax
        sampling = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
        sequences = target.generate(
            **batch, **sampling, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id
        )
    finally:
        hook.remove()
    padded_prompt_len = batch.input_ids.shape[1]
    # one head call per sampled token (the last sampled token is never fed back)
    hidden = torch.stack(recorder.hidden, dim=1)
    logsumexp = torch.stack(recorder.logsumexp, dim=1)
    stop_ids = torch.tensor(_eos_token_ids(target))
    samples = []
    for row, prompt_mask in enumerate(batch.attention_mask.bool()):
        prompt = sequences[row, :padded_prompt_len][prompt_mask]
        generated = sequences[row, padded_prompt_len:]
        length = _length_through_first_stop(generated, stop_ids)
        samples.append(
            TeacherSample(
                token_ids=torch.cat([prompt, generated[:length]]).to(torch.int32),
                prompt_len=len(prompt),
                hidden=hidden[row, :length].clone(),
                logsumexp=logsumexp[row, :length].clone(),
            )
        )
    return samples


def generate_teacher_data(
    target,
    tokenizer,
    prompts: list[str],
    out_dir: Path,
    batch_size: int,
    max_new_tokens: int,
    seed: int,
    greedy: bool = False,
) -> list[TeacherSample]:
    """Teacher samples for all `prompts`, one file per batch in `out_dir`; batches already there are reused."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # similar lengths share a batch: less left padding to compute
    ordered = sorted(prompts, key=len)
    batches = [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
    samples = []
    for index, batch in enumerate(tqdm(batches, desc="teacher continuations", unit="batch")):
        path = out_dir / f"batch-{index:05d}.pt"
        # a resumed run samples exactly what the first run would have
        recipe = {"prompts": batch, "max_new_tokens": max_new_tokens, "greedy": greedy, "seed": seed + index}
        if path.exists():
            samples.extend(_load_batch(path, recipe))
            continue
        torch.manual_seed(recipe["seed"])
        generated = generate_teacher_batch(target, tokenizer, batch, max_new_tokens, greedy)
        _save_batch(path, recipe, generated)
        samples.extend(generated)
    return samples


def _save_batch(path: Path, recipe: dict, samples: list[TeacherSample]) -> None:
    staging = path.with_suffix(".tmp")
    torch.save({"recipe": recipe, "samples": [vars(sample) for sample in samples]}, staging)
    staging.replace(path)  # a killed run never leaves half a batch behind


def _load_batch(path: Path, recipe: dict) -> list[TeacherSample]:
    saved = torch.load(path)
    if saved["recipe"] != recipe:
        raise ValueError(
            f"{path} was generated with other prompts or settings (--prompts, --max-prompt-tokens, "
            "--max-new-tokens, batch size or seed differ): use another output directory"
        )
    return [TeacherSample(**fields) for fields in saved["samples"]]


def _eos_token_ids(model) -> list[int]:
    eos = model.generation_config.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos)


def _length_through_first_stop(generated: torch.Tensor, stop_ids: torch.Tensor) -> int:
    stops = torch.isin(generated, stop_ids).nonzero()
    return int(stops[0]) + 1 if len(stops) else len(generated)


# ------------------------------------------------------------------------------------------------ draft set-up
def head_rows(head: torch.nn.Linear, token_ids: list[int]) -> torch.nn.Linear:
    """A frozen copy of `head` that scores only `token_ids` (p renormalised over them)."""
    rows = torch.nn.Linear(head.in_features, len(token_ids), bias=head.bias is not None)
    rows.weight.data = head.weight.data[token_ids].float().clone()
    if head.bias is not None:
        rows.bias.data = head.bias.data[token_ids].float().clone()
    return rows.requires_grad_(False)


@torch.no_grad()
def choose_kept_tokens(samples: list[TeacherSample], head: torch.nn.Linear, size: int, always_keep) -> list[int]:
    """The `size` tokens with the most total target probability over all recorded positions, plus `always_keep`."""
    mass = torch.zeros(head.weight.shape[0])
    for chunk in _chunks(torch.cat([sample.hidden for sample in samples]), 4096):
        mass += torch.softmax(head(chunk), dim=-1).sum(dim=0)
    mass[list(always_keep)] = float("inf")
    return sorted(mass.topk(size).indices.tolist())


# what describes the target itself (its class, file, quantization) rather than the shape the draft inherits
TARGET_ONLY_CONFIG_KEYS = (
    "model_type",
    "architectures",
    "transformers_version",
    "quantization_config",
    "_name_or_path",
    "_model_name_or_path",
)


def draft_config_from_target(target_config, kept_token_ids: list[int], num_layers: int, oov_rank: int):
    if target_config.model_type != "llama":
        raise ValueError(
            f"the draft copies Llama layers from its target, but the target is {target_config.model_type!r}: "
            "use a Llama-architecture target (SmolLM2, Llama, ...)"
        )
    fields = target_config.to_dict()
    for key in TARGET_ONLY_CONFIG_KEYS:
        fields.pop(key, None)
    fields.update(
        num_hidden_layers=num_layers,
        kept_token_ids=kept_token_ids,
        oov_embedding_rank=oov_rank,
        tie_word_embeddings=True,
        architectures=["ReducedVocabLlamaForCausalLM"],
    )
    return ReducedVocabLlamaConfig(**fields)


@torch.no_grad()
def init_draft_from_target(target, kept_token_ids: list[int], layer_ids: list[int], oov_rank: int):
    """A draft whose layers are copies of the target's `layer_ids`, with embedding / head rows of the kept tokens."""
    config = draft_config_from_target(target.config, kept_token_ids, len(layer_ids), oov_rank)
    draft = ReducedVocabLlamaForCausalLM(config)
    draft.generation_config = target.generation_config
    kept = torch.tensor(kept_token_ids)
    draft.model.embed_tokens.kept.weight.copy_(target.get_output_embeddings().weight[kept])
    # the other input tokens: the best rank-r approximation of the target's input embedding
    u, s, vh = torch.linalg.svd(target.get_input_embeddings().weight.float(), full_matrices=False)
    draft.model.embed_tokens.oov.weight.copy_(u[:, :oov_rank] * s[:oov_rank])
    draft.model.embed_tokens.oov_up.weight.copy_(vh[:oov_rank].T)
    for draft_layer, target_layer in zip(draft.model.layers, layer_ids):
        draft_layer.load_state_dict(target.model.layers[target_layer].state_dict())
    draft.model.norm.load_state_dict(target.model.norm.state_dict())
    return draft


def _chunks(tensor: torch.Tensor, size: int):
    return (tensor[i : i + size] for i in range(0, len(tensor), size))


# ------------------------------------------------------------------------------------------------ training
@dataclass
class TrainingBatch:
    input_ids: torch.Tensor  # [B, T], right-padded
    attention_mask: torch.Tensor  # [B, T]
    loss_mask: torch.Tensor  # [B, T]: positions whose next token the target generated
    teacher_hidden: torch.Tensor  # [loss_mask.sum(), H], in loss_mask (row-major) order


def collate(samples: list[TeacherSample], pad_token_id: int) -> TrainingBatch:
    length = max(len(sample.token_ids) for sample in samples)
    input_ids = torch.full((len(samples), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
    loss_mask = torch.zeros((len(samples), length), dtype=torch.bool)
    for row, sample in enumerate(samples):
        input_ids[row, : len(sample.token_ids)] = sample.token_ids
        attention_mask[row, : len(sample.token_ids)] = 1
        loss_mask[row, sample.prompt_len - 1 : len(sample.token_ids) - 1] = True
    teacher_hidden = torch.cat([sample.hidden for sample in samples])
    return TrainingBatch(input_ids, attention_mask, loss_mask, teacher_hidden)


def distillation_loss(
    draft, teacher_head: torch.nn.Linear, batch: TrainingBatch, bf16_autocast: bool = False
) -> torch.Tensor:
    """Mean KL(p || q) over the batch's generated positions, p renormalised over the draft's vocabulary.

    `teacher_head` = `head_rows(target head, draft kept_token_ids)`: p comes from the recorded hidden states
    (always in fp32; `bf16_autocast` only speeds up the draft's own forward and backward).
    """
    with torch.autocast(batch.input_ids.device.type, dtype=torch.bfloat16, enabled=bf16_autocast):
        hidden = draft.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        kept_logits = draft.lm_head.kept_logits(hidden[batch.loss_mask])
    log_q = torch.log_softmax(kept_logits.float(), dim=-1)
    log_p = torch.log_softmax(teacher_head(batch.teacher_hidden), dim=-1)
    return torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="batchmean")


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Sample indices per batch for one epoch: shuffled, then similar lengths grouped to waste less padding."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 16
    batches = []
    for start in range(0, len(order), window):
        group = sorted(order[start : start + window], key=lambda index: lengths[index])
        batches.extend(group[i : i + batch_size] for i in range(0, len(group), batch_size))
    rng.shuffle(batches)
    return batches


def batch_stream(lengths: list[int], batch_size: int, seed: int, start_step: int):
    """Endless batches over repeated epochs, starting at `start_step` (the same stream after a resume)."""
    epoch, step = 0, 0
    while True:
        for batch in epoch_batches(lengths, batch_size, seed, epoch):
            if step >= start_step:
                yield batch
            step += 1
        epoch += 1


@dataclass
class TrainingOptions:
    steps: int = 1000
    batch_size: int = 16  # sequences per step
    lr: float = 1e-3
    warmup_steps: int = 30
    final_lr_fraction: float = 0.1  # cosine decay from lr to lr * this
    grad_clip: float = 1.0
    checkpoint_every: int = 50
    seed: int = 0
    bf16_autocast: bool = True  # ~2x faster training on CPUs with bf16 matmuls (AVX512-BF16 / AMX)


def train_draft(
    draft,
    teacher_head: torch.nn.Linear,
    samples: list[TeacherSample],
    options: TrainingOptions,
    checkpoint_path: Path,
    resume: bool,
    pad_token_id: int,
):
    """Train `draft` in place on `samples`; checkpoints to `checkpoint_path`, resuming from it if asked."""
    draft.train()
    optimizer = torch.optim.AdamW(draft.parameters(), lr=options.lr, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, options))
    start_step = 0
    if resume and checkpoint_path.exists():
        start_step = _load_checkpoint(checkpoint_path, draft, optimizer, schedule)
    batches = batch_stream([len(s.token_ids) for s in samples], options.batch_size, options.seed, start_step)
    progress = tqdm(range(start_step, options.steps), desc="distilling", unit="step", initial=start_step, total=options.steps)
    recent_kl = collections.deque(maxlen=20)
    for step in progress:
        batch = collate([samples[i] for i in next(batches)], pad_token_id)
        loss = distillation_loss(draft, teacher_head, batch, options.bf16_autocast)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), options.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        recent_kl.append(loss.item())
        progress.set_postfix(kl=f"{sum(recent_kl) / len(recent_kl):.3f}", lr=f"{schedule.get_last_lr()[0]:.2e}")
        if (step + 1) % options.checkpoint_every == 0 or step + 1 == options.steps:
            _save_checkpoint(checkpoint_path, step + 1, draft, optimizer, schedule)
    return draft.eval()


def _lr_factor(step: int, options: TrainingOptions) -> float:
    if step < options.warmup_steps:
        return (step + 1) / options.warmup_steps
    progress = (step - options.warmup_steps) / max(1, options.steps - options.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return options.final_lr_fraction + (1 - options.final_lr_fraction) * cosine


def _save_checkpoint(path: Path, step: int, draft, optimizer, schedule) -> None:
    state = {
        "step": step,
        "draft_config": draft.config.to_dict(),
        "draft": draft.state_dict(),
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
    }
    staging = path.with_suffix(".tmp")
    torch.save(state, staging)
    staging.replace(path)


def _load_checkpoint(path: Path, draft, optimizer, schedule) -> int:
    state = torch.load(path)
    draft.load_state_dict(state["draft"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    return state["step"]


def draft_from_checkpoint(path: Path) -> ReducedVocabLlamaForCausalLM:
    """The draft saved in a training checkpoint (to resume without re-choosing its vocabulary)."""
    state = torch.load(path)
    draft = ReducedVocabLlamaForCausalLM(ReducedVocabLlamaConfig(**state["draft_config"]))
    draft.load_state_dict(state["draft"])
    return draft


def save_draft(draft, out_dir: Path) -> None:
    """The shipped format: HF `save_pretrained` (config.json, generation_config.json, model.safetensors).

    Weights are stored in fp16 (half the size); the config asks for fp32, so a plain `from_pretrained`
    loads the draft in fp32, the dtype CPU kernels are fast in.
    """
    copy.deepcopy(draft).half().save_pretrained(out_dir)
    config = copy.deepcopy(draft.config)
    config.dtype = torch.float32
    config.save_pretrained(out_dir)  # replaces the fp16 model's config.json

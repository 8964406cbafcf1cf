"""Distil a draft for a target from teacher-forced data (`hf_specdec.teacher`): either kind, the same data.

1. Draft vocabulary: the `size` tokens with the largest total target probability over (a sample of) the teacher
   positions, plus the special tokens: the subset that keeps the most of p reachable by q (q = 0 elsewhere, which keeps
   sampling exact).
2. Initialisation from the target: head rows of the kept tokens (tied with their input embedding), a rank-r SVD of the
   full embedding for the other input tokens, the final norm; a standalone draft copies some of the target's layers,
   a feature draft starts its fusion and layer(s) fresh.
3. Training targets are the target's own distributions: p_t = softmax(lm_head(features[t])) over the kept tokens, at
   every position whose next token belongs to an assistant turn. The loss is KL(p || q).
   - standalone (`ReducedVocabLlamaForCausalLM`): q_t from the tokens up to t.
   - feature (`hf_specdec.feature_draft`): q_t from token t and the target's feature at t - 1, and then, as in a draft
     tree, from the draft's own predicted features: unrolled step k reads, at t, its step k - 1 prediction at t - 1 and
     attends to the true-feature keys up to t - k + 1 and to its own chain (the "training-time test" of EAGLE-3), so
     deeper tree levels are trained on the inputs they will see. Step k weighs `step_decay ** (k - 1)`; a smooth-L1
     term pulls each predicted feature towards the target's.
"""

from __future__ import annotations

import collections
import copy
import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import DynamicCache

from hf_specdec.draft_model import ReducedVocabLlamaConfig, ReducedVocabLlamaForCausalLM
from hf_specdec.feature_draft import (
    FeatureDraftConfig, FeatureDraftForCausalLM, check_feature_draft, reads_target_features,
)
from hf_specdec.teacher import TeacherData, TeacherSequence

DRAFT_TYPES = ("feature", "standalone")


# ------------------------------------------------------------------------------------------------ vocabulary
def head_rows(head: torch.nn.Linear, token_ids: list[int]) -> torch.nn.Linear:
    """A frozen float32 copy of `head` that scores only `token_ids` (p renormalised over them)."""
    rows = torch.nn.Linear(head.in_features, len(token_ids), bias=head.bias is not None)
    rows.weight.data = head.weight.data[token_ids].float().clone()
    if head.bias is not None:
        rows.bias.data = head.bias.data[token_ids].float().clone()
    return rows.requires_grad_(False)


@torch.no_grad()
def choose_kept_tokens(data: TeacherData, head: torch.nn.Linear, size: int, always_keep,
                       sample_positions: int = 131072) -> list[int]:
    """The `size` tokens with the most total target probability over about `sample_positions` teacher positions
    (every k-th assistant position), plus `always_keep`."""
    total = sum(int(data[i].assistant.sum()) for i in range(len(data)))
    stride = max(1, total // sample_positions)
    head = head.float()
    mass = torch.zeros(head.weight.shape[0])
    for i in range(len(data)):
        sequence = data[i]
        # the positions that predict an assistant token
        predicting = sequence.assistant[1:].nonzero().flatten()[::stride]
        for chunk in predicting.split(4096):
            mass += torch.softmax(head(sequence.features[chunk].float()), dim=-1).sum(dim=0)
    mass[list(always_keep)] = float("inf")
    return sorted(mass.topk(size).indices.tolist())


# ------------------------------------------------------------------------------------------------ initialisation
# what describes the target itself (its class, file, quantization) rather than the shape the draft inherits
TARGET_ONLY_CONFIG_KEYS = (
    "model_type",
    "architectures",
    "transformers_version",
    "quantization_config",
    "_name_or_path",
    "_model_name_or_path",
)


def _draft_fields(target_config, **overrides) -> dict:
    if target_config.model_type != "llama":
        raise ValueError(
            f"the draft copies Llama shapes and weights from its target, but the target is "
            f"{target_config.model_type!r}: use a Llama-architecture target (SmolLM2, Llama, ...)"
        )
    fields = target_config.to_dict()
    for key in TARGET_ONLY_CONFIG_KEYS:
        fields.pop(key, None)
    return {**fields, "tie_word_embeddings": True, **overrides}


@torch.no_grad()
def _copy_vocabulary(draft, target, kept_token_ids: list[int], oov_rank: int) -> None:
    """Head rows (tied with the kept input rows) from the target's head; the other input tokens from the best rank-r
    approximation of the target's input embedding; the target's final norm."""
    draft.generation_config = copy.deepcopy(target.generation_config)
    kept = torch.tensor(kept_token_ids)
    draft.model.embed_tokens.kept.weight.copy_(target.get_output_embeddings().weight[kept])
    u, s, vh = torch.linalg.svd(target.get_input_embeddings().weight.float(), full_matrices=False)
    draft.model.embed_tokens.oov.weight.copy_(u[:, :oov_rank] * s[:oov_rank])
    draft.model.embed_tokens.oov_up.weight.copy_(vh[:oov_rank].T)
    draft.model.norm.load_state_dict(target.model.norm.state_dict())


@torch.no_grad()
def init_standalone_draft(target, kept_token_ids: list[int], layer_ids: list[int], oov_rank: int):
    """A standalone draft whose layers are copies of the target's `layer_ids`."""
    config = ReducedVocabLlamaConfig(**_draft_fields(
        target.config, num_hidden_layers=len(layer_ids), kept_token_ids=kept_token_ids, oov_embedding_rank=oov_rank,
        architectures=["ReducedVocabLlamaForCausalLM"]))
    draft = ReducedVocabLlamaForCausalLM(config)
    _copy_vocabulary(draft, target, kept_token_ids, oov_rank)
    for draft_layer, target_layer in zip(draft.model.layers, layer_ids):
        draft_layer.load_state_dict(target.model.layers[target_layer].state_dict())
    return draft


@torch.no_grad()
def init_feature_draft(target, kept_token_ids: list[int], num_layers: int, oov_rank: int, seed: int = 0):
    """A feature draft of `num_layers` fresh decoder layers of the target's shape. The fusion starts as the sum of the
    token embedding and the feature (plus small noise), so that the first layer sees a sensible residual stream."""
    torch.manual_seed(seed)
    config = FeatureDraftConfig(**_draft_fields(
        target.config, num_hidden_layers=num_layers, kept_token_ids=kept_token_ids, oov_embedding_rank=oov_rank,
        architectures=["FeatureDraftForCausalLM"]))
    draft = FeatureDraftForCausalLM(config)
    _copy_vocabulary(draft, target, kept_token_ids, oov_rank)
    hidden = config.hidden_size
    fuse = draft.model.fuse
    fuse.weight.normal_(0.0, 0.02 / math.sqrt(hidden)).add_(torch.cat([torch.eye(hidden), torch.eye(hidden)], 1))
    fuse.bias.zero_()
    return draft


# ------------------------------------------------------------------------------------------------ batches
@dataclass
class TrainingBatch:
    tokens: torch.Tensor  # [B, T] long, right-padded
    features: torch.Tensor  # [B, T, H] float32: the target's LM-head input at every position
    loss_mask: torch.Tensor  # [B, T]: position t predicts an assistant token (t + 1 is one)


def collate(sequences: list[TeacherSequence], pad_token_id: int = 0) -> TrainingBatch:
    length = max(len(s.tokens) for s in sequences)
    hidden = sequences[0].features.shape[-1]
    tokens = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    features = torch.zeros(len(sequences), length, hidden)
    loss_mask = torch.zeros(len(sequences), length, dtype=torch.bool)
    for row, s in enumerate(sequences):
        n = len(s.tokens)
        tokens[row, :n] = s.tokens
        features[row, :n] = s.features.float()
        loss_mask[row, : n - 1] = s.assistant[1:]
    return TrainingBatch(tokens, features, loss_mask)


# ------------------------------------------------------------------------------------------------ losses
def kl_to_teacher(draft_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(p || q), both given as logits over the same tokens."""
    log_q = torch.log_softmax(draft_logits.float(), dim=-1)
    log_p = torch.log_softmax(teacher_logits.float(), dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")


def standalone_loss(draft, teacher_head: torch.nn.Linear, batch: TrainingBatch, bf16_autocast: bool = False) -> torch.Tensor:
    """KL(p || q) at the batch's loss positions, q from the tokens up to each position."""
    with torch.autocast(batch.tokens.device.type, dtype=torch.bfloat16, enabled=bf16_autocast):
        hidden = draft.model(input_ids=batch.tokens).last_hidden_state
        kept_logits = draft.lm_head.kept_logits(hidden[batch.loss_mask])
    return kl_to_teacher(kept_logits, teacher_head(batch.features[batch.loss_mask]))


def unrolled_mask(length: int, step: int, device) -> torch.Tensor:
    """Bool mask [T, step T] of unrolled step `step` (1-based) over the keys of steps 1..step: query t sees the
    true-feature keys (step 1) up to t - step + 1 and, of each later step j, the key at t - step + j (its chain)."""
    t = torch.arange(length, device=device)
    blocks = [t[None, :] <= (t[:, None] - step + 1)]
    blocks += [t[None, :] == (t[:, None] - step + j) for j in range(2, step + 1)]
    return torch.cat(blocks, 1)


def feature_unrolled(draft, tokens: torch.Tensor, features: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """The feature draft's predicted features [B, T, H] at every position, for unrolled steps 1..`steps`: step 1 reads
    the target's features (`features[t - 1]` with token t), step k its own step k - 1 prediction at t - 1. Step k at
    position t is what a draft tree gives a node at depth k - 1 under a root at t - k + 1."""
    batch, length = tokens.shape
    positions = torch.arange(length, device=tokens.device).expand(batch, length)
    cache = DynamicCache()
    inputs = F.pad(features, (0, 0, 1, 0))[:, :-1]  # the feature before each token (zeros before the first)
    predictions = []
    for step in range(1, steps + 1):
        mask = None if step == 1 else unrolled_mask(length, step, tokens.device)[None, None].expand(batch, 1, -1, -1)
        hidden = draft.model(input_ids=tokens, features=inputs, attention_mask=mask, position_ids=positions,
                             cache=cache, use_cache=True).last_hidden_state
        predictions.append(hidden)
        inputs = F.pad(hidden, (0, 0, 1, 0))[:, :-1]
    return predictions


@dataclass(frozen=True)
class FeatureLossOptions:
    unroll: int = 3  # unrolled steps (tree depths trained for)
    step_decay: float = 0.8
    feature_weight: float = 0.1  # smooth-L1 of the predicted features against the target's


def feature_loss(draft, teacher_head: torch.nn.Linear, batch: TrainingBatch, bf16_autocast: bool = False,
                 options: FeatureLossOptions = FeatureLossOptions(), per_step: list | None = None) -> torch.Tensor:
    """Sum over unrolled steps k of step_decay^(k-1) (KL(p || q_k) + feature_weight * smooth-L1), at the batch's loss
    positions that have a chain of k - 1 real predecessors. `per_step` (a list) receives each step's KL."""
    length = batch.tokens.shape[1]
    device_type = batch.tokens.device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16_autocast):
        predictions = feature_unrolled(draft, batch.tokens, batch.features, options.unroll)
    targets = batch.features[batch.loss_mask]
    with torch.no_grad():
        teacher_logits = teacher_head(targets)  # once: step k uses the positions with t >= k - 1
    offsets = torch.arange(length, device=batch.tokens.device).expand_as(batch.loss_mask)[batch.loss_mask]
    total = 0.0
    for step, hidden in enumerate(predictions, start=1):
        chained = offsets >= step - 1
        predicted = hidden[batch.loss_mask][chained]
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16_autocast):
            kept_logits = draft.lm_head.kept_logits(predicted)
        kl = kl_to_teacher(kept_logits, teacher_logits[chained])
        regression = F.smooth_l1_loss(predicted.float(), targets[chained])
        total = total + options.step_decay ** (step - 1) * (kl + options.feature_weight * regression)
        if per_step is not None:
            per_step.append(kl.item())
    return total


def loss_for(draft) -> Callable:
    return feature_loss if reads_target_features(draft) else standalone_loss


# ------------------------------------------------------------------------------------------------ training
def epoch_batches(lengths: list[int], batch_tokens: int, seed: int, epoch: int) -> list[list[int]]:
    """Sequence indices per batch for one epoch: shuffled, similar lengths grouped, at most `batch_tokens` padded
    positions per batch (one sequence at least)."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = 256
    batches = []
    for start in range(0, len(order), window):
        group = sorted(order[start : start + window], key=lambda index: lengths[index])
        current: list[int] = []
        for index in group:
            if current and (len(current) + 1) * max(lengths[index], lengths[current[-1]]) > batch_tokens:
                batches.append(current)
                current = []
            current.append(index)
        if current:
            batches.append(current)
    rng.shuffle(batches)
    return batches


def batch_stream(lengths: list[int], batch_tokens: int, seed: int, start_step: int):
    """Endless batches over repeated epochs, starting at `start_step` (the same stream after a resume)."""
    epoch, step = 0, 0
    while True:
        for batch in epoch_batches(lengths, batch_tokens, seed, epoch):
            if step >= start_step:
                yield batch
            step += 1
        epoch += 1


@dataclass
class TrainingOptions:
    steps: int = 1000
    batch_tokens: int = 8192  # padded positions per step
    lr: float = 1e-3
    warmup_steps: int = 30
    final_lr_fraction: float = 0.1  # cosine decay from lr to lr * this
    grad_clip: float = 1.0
    checkpoint_every: int = 50
    seed: int = 0
    bf16_autocast: bool = True  # ~2x faster training on CPUs with bf16 matmuls (AVX512-BF16 / AMX)
    feature: FeatureLossOptions = field(default_factory=FeatureLossOptions)


def train_draft(draft, teacher_head: torch.nn.Linear, data: TeacherData, options: TrainingOptions,
                checkpoint_path: Path, resume: bool, pad_token_id: int = 0):
    """Train `draft` (either kind) in place on `data`; checkpoints to `checkpoint_path`, resuming from it if asked."""
    draft.train()
    optimizer = torch.optim.AdamW(draft.parameters(), lr=options.lr, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, options))
    start_step = 0
    if resume:
        if not checkpoint_path.exists():
            raise ValueError(f"nothing to resume: no checkpoint at {checkpoint_path}; drop --resume to start a run")
        start_step = _load_checkpoint(checkpoint_path, draft, optimizer, schedule, options)
    batches = batch_stream(data.lengths(), options.batch_tokens, options.seed, start_step)
    is_feature = reads_target_features(draft)
    progress = tqdm(range(start_step, options.steps), desc="distilling", unit="step", initial=start_step,
                    total=options.steps)
    recent = collections.deque(maxlen=20)
    for step in progress:
        batch = collate([data[i] for i in next(batches)], pad_token_id)
        per_step: list[float] = []
        if is_feature:
            loss = feature_loss(draft, teacher_head, batch, options.bf16_autocast, options.feature, per_step)
        else:
            loss = standalone_loss(draft, teacher_head, batch, options.bf16_autocast)
            per_step.append(loss.item())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), options.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        recent.append(per_step)
        mean = [sum(r[k] for r in recent) / len(recent) for k in range(len(per_step))]
        progress.set_postfix(kl="/".join(f"{m:.3f}" for m in mean), lr=f"{schedule.get_last_lr()[0]:.2e}")
        if (step + 1) % options.checkpoint_every == 0 or step + 1 == options.steps:
            _save_checkpoint(checkpoint_path, step + 1, draft, optimizer, schedule, options)
    return draft.eval()


def _lr_factor(step: int, options: TrainingOptions) -> float:
    if step < options.warmup_steps:
        return (step + 1) / options.warmup_steps
    progress = (step - options.warmup_steps) / max(1, options.steps - options.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return options.final_lr_fraction + (1 - options.final_lr_fraction) * cosine


# what a resumed run must share with the one it continues (`steps` may grow: a warm restart)
def _recipe(options: TrainingOptions) -> dict:
    return {k: v for k, v in asdict(options).items() if k not in ("steps", "checkpoint_every")}


def _save_checkpoint(path: Path, step: int, draft, optimizer, schedule, options: TrainingOptions) -> None:
    state = {
        "step": step,
        "options": _recipe(options),
        "draft_config": draft.config.to_dict(),
        "draft": draft.state_dict(),
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
    }
    staging = path.with_suffix(".tmp")
    torch.save(state, staging)
    staging.replace(path)


def _load_checkpoint(path: Path, draft, optimizer, schedule, options: TrainingOptions) -> int:
    """Restore a run, refusing options that would silently not apply (the restored schedule keeps its learning rate;
    another batch size or seed replays another data order) and a total that ends before the checkpoint."""
    state = torch.load(path)
    # checkpoints before the recipe was saved: the learning rate is in the schedule
    saved, given = state.get("options", {"lr": state["schedule"]["base_lrs"][0]}), _recipe(options)
    changed = {k: (v, given[k]) for k, v in saved.items() if given[k] != v}
    if changed:
        listed = ", ".join(f"{k}={old!r} (now {new!r})" for k, (old, new) in changed.items())
        raise ValueError(f"{path} was trained with {listed}: resume with the same options, or start a run in "
                         "another --out")
    if options.steps < state["step"]:
        raise ValueError(f"{path} is at step {state['step']}: pass --steps {state['step']} or more to resume it")
    draft.load_state_dict(state["draft"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    return state["step"]


DRAFT_CLASSES = {
    FeatureDraftConfig.model_type: (FeatureDraftConfig, FeatureDraftForCausalLM),
    ReducedVocabLlamaConfig.model_type: (ReducedVocabLlamaConfig, ReducedVocabLlamaForCausalLM),
}


def draft_from_checkpoint(path: Path):
    """The draft saved in a training checkpoint (to resume without re-choosing its vocabulary)."""
    state = torch.load(path)
    fields = dict(state["draft_config"])
    config_class, model_class = DRAFT_CLASSES[fields.pop("model_type")]
    draft = model_class(config_class(**fields))
    draft.load_state_dict(state["draft"])
    return draft


def pretrained_draft(path: Path, target):
    """A draft saved by `save_draft` (a shipped one, say) to train further, e.g. on more of the target's own text:
    in fp32, with its logit scale back at 1 (training fits q = softmax(logits); the scale is fitted again after)."""
    from transformers import AutoModelForCausalLM

    import hf_specdec.models  # noqa: F401  (registers the draft model types)

    draft = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if type(draft) not in {model_class for _, model_class in DRAFT_CLASSES.values()}:
        raise ValueError(f"{path} holds a {type(draft).__name__}, not a draft `distill` trains (a feature draft or a "
                         "reduced-vocabulary standalone one)")
    target_vocab = target.config.get_text_config().vocab_size
    if draft.config.vocab_size != target_vocab:
        raise ValueError(f"{path} drafts for a vocabulary of {draft.config.vocab_size} tokens, the target has "
                         f"{target_vocab}: train a draft for this target")
    if reads_target_features(draft):
        check_feature_draft(draft, target)
    draft.config.logit_scale = draft.lm_head.logit_scale = 1.0
    return draft


def check_draft_options(draft, draft_type: str, layers: int, vocab_size: int, oov_rank: int,
                        source: str = "the checkpoint's draft",
                        fix: str = "resume with its options, or start a run in another --out") -> None:
    """A run that trains an existing draft (a checkpoint's, or a saved one's) trains that draft: options that describe
    another draft are refused, not ignored."""
    config = draft.config
    described = {
        "--draft-type": ("feature" if reads_target_features(draft) else "standalone", draft_type),
        "--layers (count)": (config.num_hidden_layers, layers),
        "--vocab-size": (len(config.kept_token_ids), vocab_size),
        "--oov-rank": (config.oov_embedding_rank, oov_rank),
    }
    changed = [f"{option} {saved} (given {given})" for option, (saved, given) in described.items() if saved != given]
    if changed:
        raise ValueError(f"{source} has {', '.join(changed)}: {fix}")


def save_draft(draft, out_dir: Path) -> None:
    """The shipped format: HF `save_pretrained` (config.json, generation_config.json, model.safetensors).

    Weights are stored in fp16 (half the size); the config asks for fp32, so a plain `from_pretrained`
    loads the draft in fp32, the dtype CPU kernels are fast in.
    """
    copy.deepcopy(draft).half().save_pretrained(out_dir)
    config = copy.deepcopy(draft.config)
    config.dtype = torch.float32
    config.save_pretrained(out_dir)  # replaces the fp16 model's config.json

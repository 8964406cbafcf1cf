"""Does a feature draft that reads several of the target's layers (EAGLE-3 style) accept more than one that reads the
target's last hidden state only? Both trained alike, on the same data, for the same steps, measured alike.

    A  the shipped recipe: the draft reads the target's LM-head input at t - 1 (`FeatureDraftForCausalLM`), 3 unrolled
       steps, KL plus 0.1 x smooth-L1 of its predicted feature;
    B  its input at t - 1 is proj([rms(h_low); rms(h_mid); feature]) (the outputs of two inner layers, normalised,
       and the LM-head input; the projection starts as the identity on the last), deeper unrolled steps read the
       draft's own hidden state (EAGLE-3's training-time test), KL only.

Same 8192-token vocabulary as the shipped draft, same initialisation, batches (`distill.batch_stream`, as training
draws them), learning rate and steps. Measured on
held-out ShareGPT conversations, teacher forced (the target reads the conversation; not its own continuations, as
the model card's figures are): alpha = E sum min(p, q) at T=1 and greedy top-1 agreement, unrolled depths 1-3. The
shipped draft is measured the same way, for scale. Progress and results go to stdout and to --log.

    python examples/feature_layers_probe.py [--positions 400000] [--steps 300] [--variants A,B] [--log FILE]

On 2 cores (AMD EPYC) the default run takes about 25 minutes per variant after 12 minutes of teacher forcing.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from hf_specdec import data
from hf_specdec.distill import (
    FeatureLossOptions, batch_stream, feature_unrolled, head_rows, init_feature_draft, kl_to_teacher,
)
from hf_specdec.models import load_draft, load_target, load_tokenizer
from hf_specdec.teacher import plan_conversations


class MultiLayerInput(nn.Module):
    """Variant B's input: the normalised outputs of two inner layers and the LM-head input, projected to H."""

    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.norm_low, self.norm_mid = nn.RMSNorm(hidden, eps=eps), nn.RMSNorm(hidden, eps=eps)
        self.proj = nn.Linear(3 * hidden, hidden, bias=False)
        with torch.no_grad():  # starts as the LM-head input plus small noise from the others
            self.proj.weight.normal_(0, 0.02 / math.sqrt(hidden))
            self.proj.weight[:, 2 * hidden:] += torch.eye(hidden)

    def forward(self, low, mid, feature):
        return self.proj(torch.cat([self.norm_low(low), self.norm_mid(mid), feature], -1))


class Probe:
    def __init__(self, args):
        self.args, self.start = args, time.time()
        self.target, self.tokenizer = load_target(), load_tokenizer()
        self.shipped = load_draft()
        self.kept = self.shipped.config.kept_token_ids
        self.full_head = self.target.get_output_embeddings()
        self.head = head_rows(self.full_head, self.kept)  # p renormalised over the kept tokens (training)

    def say(self, line: str) -> None:
        line = f"[{time.time() - self.start:6.0f} s] {line}"
        print(line, flush=True)
        if self.args.log:
            with open(self.args.log, "a") as log:
                log.write(line + "\n")

    @torch.no_grad()
    def featurize(self, conversations) -> list[dict]:
        """Per conversation: tokens, assistant mask, the LM-head input and the two inner layers' outputs (fp16)."""
        out = []
        for c in conversations:
            states = self.target.model(input_ids=c.tokens[None].long(), output_hidden_states=True)
            layers = states.hidden_states
            out.append(dict(tokens=c.tokens.long(), assistant=c.assistant, feature=states.last_hidden_state[0].half(),
                            low=layers[self.args.low_layer][0].half(), mid=layers[self.args.mid_layer][0].half()))
        return out

    def teacher_data(self) -> tuple[list[dict], list[dict]]:
        train = plan_conversations(self.tokenizer, 1024, self.args.positions, data.train_conversations())
        held = plan_conversations(self.tokenizer, 512, 20_000, data.conversations("heldout"))
        self.say(f"train: {len(train)} conversations, {sum(len(c.tokens) for c in train)} positions; "
                 f"held out: {len(held)} conversations")
        held_out, train_data, started = self.featurize(held), [], time.time()
        for i in range(0, len(train), 50):
            train_data += self.featurize(train[i:i + 50])
            done = sum(len(c["tokens"]) for c in train_data)
            self.say(f"teacher forcing: {done} positions, {done / (time.time() - started):.0f} positions/s")
        return train_data, held_out

    @staticmethod
    def collate(sequences: list[dict]):
        length, hidden = max(len(s["tokens"]) for s in sequences), sequences[0]["feature"].shape[-1]
        tokens = torch.zeros(len(sequences), length, dtype=torch.long)
        mask = torch.zeros(len(sequences), length, dtype=torch.bool)
        states = {k: torch.zeros(len(sequences), length, hidden) for k in ("feature", "low", "mid")}
        for row, s in enumerate(sequences):
            n = len(s["tokens"])
            tokens[row, :n], mask[row, :n - 1] = s["tokens"], s["assistant"][1:]
            for k in states:
                states[k][row, :n] = s[k].float()
        return tokens, mask, states

    @staticmethod
    def inputs(adapter, states: dict) -> torch.Tensor:
        """What the draft reads at step 1: the LM-head input (A), or B's projection of the three layers."""
        return states["feature"] if adapter is None else adapter(states["low"], states["mid"], states["feature"])

    def loss(self, variant, draft, adapter, tokens, mask, states, per_step: list) -> torch.Tensor:
        options = FeatureLossOptions()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            predictions = feature_unrolled(draft, tokens, self.inputs(adapter, states), options.unroll)
        targets = states["feature"][mask]
        with torch.no_grad():
            teacher_logits = self.head(targets)
        offsets = torch.arange(tokens.shape[1]).expand_as(mask)[mask]
        total = 0.0
        for step, hidden in enumerate(predictions, start=1):
            chained = offsets >= step - 1
            predicted = hidden[mask][chained]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                kl = kl_to_teacher(draft.lm_head.kept_logits(predicted), teacher_logits[chained])
            regression = F.smooth_l1_loss(predicted.float(), targets[chained]) if variant == "A" else 0.0
            total = total + options.step_decay ** (step - 1) * (kl + options.feature_weight * regression)
            per_step.append(kl.item())
        return total

    @torch.no_grad()
    def evaluate(self, draft, adapter, held_out: list[dict]) -> tuple[list[float], list[float]]:
        """alpha and greedy top-1 agreement at unrolled depths 1-3, over the held-out assistant positions."""
        draft.eval()
        alpha, top1, count = [0.0] * 3, [0.0] * 3, [0] * 3
        for sequence in held_out:
            tokens, mask, states = self.collate([sequence])
            predictions = feature_unrolled(draft, tokens, self.inputs(adapter, states), 3)
            p = torch.softmax(self.full_head(states["feature"][mask]), -1)
            offsets = torch.arange(tokens.shape[1])[None].expand_as(mask)[mask]
            for depth, hidden in enumerate(predictions):
                chained = offsets >= depth
                q = torch.softmax(draft.lm_head(hidden[mask][chained]).float(), -1)
                alpha[depth] += torch.minimum(p[chained], q).sum().item()
                top1[depth] += (p[chained].argmax(-1) == q.argmax(-1)).sum().item()
                count[depth] += int(chained.sum())
        draft.train()
        return [a / n for a, n in zip(alpha, count)], [t / n for t, n in zip(top1, count)]

    def train(self, variant: str, train: list[dict]):
        args = self.args
        draft = init_feature_draft(self.target, self.kept, 1, 32, seed=0)
        adapter = None
        if variant == "B":
            adapter = MultiLayerInput(self.target.config.hidden_size, self.target.config.rms_norm_eps)
        parameters = list(draft.parameters()) + (list(adapter.parameters()) if adapter else [])
        optimizer = torch.optim.AdamW(parameters, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
        warmup = 30  # then a cosine from lr to lr / 10

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        draft.train()
        stream = batch_stream([len(s["tokens"]) for s in train], args.batch_tokens, seed=0, start_step=0)
        recent = []
        for step in range(args.steps):
            tokens, mask, states = self.collate([train[i] for i in next(stream)])
            per_step: list[float] = []
            self.loss(variant, draft, adapter, tokens, mask, states, per_step).backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            recent = (recent + [per_step])[-20:]
            if (step + 1) % 25 == 0:
                mean = [sum(r[k] for r in recent) / len(recent) for k in range(3)]
                self.say(f"{variant} step {step + 1}: KL by unrolled step " + " / ".join(f"{m:.3f}" for m in mean))
        return draft, adapter

    def report(self, name: str, alpha: list[float], top1: list[float]) -> None:
        self.say(f"RESULT {name}: alpha " + " / ".join(f"{a:.3f}" for a in alpha)
                 + ", greedy top-1 " + " / ".join(f"{t:.3f}" for t in top1) + " (depths 1 / 2 / 3)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--positions", type=int, default=400_000, help="teacher-forced train positions")
    parser.add_argument("--steps", type=int, default=300, help="training steps per variant")
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--variants", default="A,B")
    parser.add_argument("--low-layer", type=int, default=4, help="hidden_states index of B's low layer (of 30)")
    parser.add_argument("--mid-layer", type=int, default=16)
    parser.add_argument("--log", help="also append progress and results to this file")
    args = parser.parse_args()
    probe = Probe(args)
    train, held_out = probe.teacher_data()
    probe.report("shipped draft", *probe.evaluate(probe.shipped, None, held_out))
    for variant in args.variants.split(","):
        torch.manual_seed(0)
        draft, adapter = probe.train(variant, train)
        probe.report(variant, *probe.evaluate(draft, adapter, held_out))


if __name__ == "__main__":
    main()

"""`hf-specdec distill`: train a reduced-vocabulary draft for a target by distillation, then measure it."""

from __future__ import annotations

import argparse

DEFAULT_OUT = "runs/distill"
EMBEDDED_TARGET = "embedded"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "distill",
        help="train a draft model for a target by distillation",
        description=(
            "Generate target continuations of ShareGPT train-split prompts (temperature 1), train a "
            "reduced-vocabulary Llama draft to minimise KL(p_target || q_draft) on them, save it "
            "(OUT/draft) and measure its acceptance on held-out prompts and its cost (OUT/draft/eval.json). "
            "Every stage is resumable: teacher batches already in OUT/teacher are reused, and --resume "
            "continues from OUT/checkpoint.pt."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--target",
        default=EMBEDDED_TARGET,
        help=f"HF model dir or id of a Llama-architecture target; {EMBEDDED_TARGET!r}: SmolLM2-135M-Instruct",
    )
    parser.add_argument("--out", default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--evaluate", metavar="DRAFT_DIR", help="only measure an existing draft against the target")
    data = parser.add_argument_group("teacher data")
    data.add_argument("--prompts", type=int, default=1536, help="train-split prompts to continue")
    data.add_argument("--max-prompt-tokens", type=int, default=256, help="longer prompts are skipped")
    data.add_argument("--max-new-tokens", type=int, default=128, help="continuation length (train and held-out)")
    data.add_argument("--generate-batch-size", type=int, default=32, help="prompts per target generate call")
    draft = parser.add_argument_group("draft")
    draft.add_argument("--vocab-size", type=int, default=8192, help="tokens the draft can propose")
    draft.add_argument("--layers", default="0,1", help="target layers copied into the draft, in order")
    draft.add_argument("--oov-rank", type=int, default=32, help="embedding rank of input tokens outside the vocabulary")
    train = parser.add_argument_group("training")
    train.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    train.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    train.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (cosine decay to a tenth)")
    train.add_argument("--warmup-steps", type=int, default=30, help="linear learning-rate warm-up")
    train.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    train.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    train.add_argument(
        "--fp32", action="store_true", help="no bf16 autocast (it is ~2x faster on CPUs with bf16 matmuls)"
    )
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--eval-prompts", type=int, default=128, help="held-out prompts")
    parser.add_argument("--seed", type=int, default=0, help="seeds sampling and data order")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")


def run(args) -> int:
    import json
    from pathlib import Path

    import torch

    from hf_specdec import distill
    from hf_specdec.draft_quality import evaluate_draft

    torch.set_num_threads(args.threads)
    target, tokenizer = _load_target(args.target)
    out = Path(args.out)
    if args.evaluate:
        from transformers import AutoModelForCausalLM

        draft = AutoModelForCausalLM.from_pretrained(args.evaluate, dtype=torch.float32).eval()
        report = evaluate_draft(target, draft, tokenizer, out / "heldout", args.eval_prompts, args.max_new_tokens, args.seed)
        print(json.dumps(report, indent=2))
        return 0

    checkpoint = out / "checkpoint.pt"
    if checkpoint.exists() and not args.resume:
        raise SystemExit(f"{checkpoint} exists: pass --resume to continue that run, or choose another --out")
    prompts = _train_prompts(args, tokenizer)
    samples = distill.generate_teacher_data(
        target, tokenizer, prompts, out / "teacher", args.generate_batch_size, args.max_new_tokens, args.seed
    )
    if args.resume and checkpoint.exists():
        draft = distill.draft_from_checkpoint(checkpoint)
    else:
        draft = _initial_draft(args, target, tokenizer, samples)
    teacher_head = distill.head_rows(target.get_output_embeddings(), draft.config.kept_token_ids)
    options = distill.TrainingOptions(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        bf16_autocast=not args.fp32,
    )
    distill.train_draft(draft, teacher_head, samples, options, checkpoint, args.resume, tokenizer.pad_token_id)
    distill.save_draft(draft, out / "draft")
    report = evaluate_draft(target, draft, tokenizer, out / "heldout", args.eval_prompts, args.max_new_tokens, args.seed)
    (out / "draft" / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


def _load_target(name: str):
    if name == EMBEDDED_TARGET:
        from hf_specdec.models import load_target, load_tokenizer

        return load_target(), load_tokenizer()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(name).eval(), AutoTokenizer.from_pretrained(name)


def _train_prompts(args, tokenizer):
    from hf_specdec.data import train_prompts

    return train_prompts(args.prompts, tokenizer, args.max_prompt_tokens)


def _initial_draft(args, target, tokenizer, samples):
    from hf_specdec import distill

    kept = distill.choose_kept_tokens(
        samples, target.get_output_embeddings(), args.vocab_size, always_keep=tokenizer.all_special_ids
    )
    layers = [int(layer) for layer in args.layers.split(",")]
    return distill.init_draft_from_target(target, kept, layers, args.oov_rank)

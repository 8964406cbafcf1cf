"""`hf-specdec distill`: train a draft (feature-conditioned or standalone) for a target, then measure it."""

from __future__ import annotations

import argparse

DEFAULT_OUT = "runs/distill"
DEFAULT_TEACHER_DIR = "runs/teacher"
EMBEDDED_TARGET = "embedded"
# per draft type: what its options default to (the shipped feature draft's first 900 steps; its model card has the
# continuation, and the standalone draft's card the older command that trained it)
DEFAULTS = {
    "feature": {"layers": "1", "steps": 900, "lr": 2e-3, "batch_tokens": 4096},
    "standalone": {"layers": "0,1", "steps": 400, "lr": 1e-3, "batch_tokens": 8192},
}


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "distill",
        help="train a draft model for a target by distillation",
        description=(
            "Teacher data: the target reads ShareGPT train-split conversations once (teacher forcing) and its "
            "LM-head input at every position is stored (TEACHER_DIR, sharded, resumable, reused by both draft types). "
            "Then a reduced-vocabulary draft is trained to minimise KL(p_target || q_draft) at assistant positions, "
            "saved (OUT/draft) and measured on held-out prompts (OUT/draft/eval.json). --draft-type feature: an "
            "EAGLE-style draft that reads the target's hidden state (the default draft of load_default_pair); "
            "standalone: an ordinary causal LM (for HF assisted generation and any speculative loop). --resume "
            "continues from OUT/checkpoint.pt."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--target",
        default=EMBEDDED_TARGET,
        help=f"HF model dir or id of a Llama-architecture target; {EMBEDDED_TARGET!r}: SmolLM2-135M-Instruct",
    )
    parser.add_argument("--draft-type", choices=("feature", "standalone"), default="feature")
    parser.add_argument("--out", default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--evaluate", metavar="DRAFT_DIR",
                        help="only measure an existing draft against the target (not with --fit-logit-scale)")
    parser.add_argument("--fit-logit-scale", metavar="DRAFT_DIR",
                        help="only fit an existing draft's logit scale (as training ends with) and write it to its "
                        "config.json")
    data = parser.add_argument_group("teacher data")
    data.add_argument("--teacher-dir", default=DEFAULT_TEACHER_DIR, help="where the teacher data is (or is built)")
    data.add_argument("--positions", type=int, default=2_000_000, help="teacher positions (tokens) to store")
    data.add_argument("--max-tokens", type=int, default=1024, help="conversations are cut at this many tokens")
    data.add_argument("--generated-prompts", type=int, default=1200,
                      help="also the target's own continuations of this many train prompts (sampled at temperature "
                      "1, read back by teacher forcing into TEACHER_DIR-generated): the text a draft meets when it "
                      "drafts for this target; 0: none")
    data.add_argument("--generated-new-tokens", type=int, default=192, help="length of those continuations")
    data.add_argument("--generated-repeats", type=int, default=3,
                      help="how many times each continuation counts per epoch (they are few beside ShareGPT's)")
    draft = parser.add_argument_group("draft")
    draft.add_argument("--vocab-size", type=int, default=8192, help="tokens the draft can propose")
    draft.add_argument("--layers", help="standalone: target layers copied into the draft, in order (default 0,1); "
                       "feature: number of decoder layers (default 1)")
    draft.add_argument("--oov-rank", type=int, default=32, help="embedding rank of input tokens outside the vocabulary")
    draft.add_argument("--init-from", metavar="DRAFT_DIR",
                       help="start from this saved draft (its weights and vocabulary, e.g. a shipped one) instead of "
                       "a fresh one: to train it further, on more data or another recipe, in a new --out")
    train = parser.add_argument_group("training")
    train.add_argument("--steps", type=int, help="optimizer steps (default: feature 900, standalone 400)")
    train.add_argument("--batch-tokens", type=int,
                       help="padded positions per step (default: feature 4096, standalone 8192)")
    train.add_argument("--lr", type=float,
                       help="peak learning rate, cosine decay to a tenth (default: feature 2e-3, standalone 1e-3)")
    train.add_argument("--warmup-steps", type=int, default=30, help="linear learning-rate warm-up")
    train.add_argument("--unroll", type=int, default=3, help="feature: unrolled draft steps (tree depths) trained")
    train.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    train.add_argument("--resume", action="store_true",
                       help="continue from OUT/checkpoint.pt; with a larger --steps than that run's, training goes "
                       "on with the cosine schedule recomputed for the new total (a warm restart)")
    train.add_argument(
        "--fp32", action="store_true", help="no bf16 autocast (it is ~2x faster on CPUs with bf16 matmuls)"
    )
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--eval-prompts", type=int, default=128, help="held-out prompts")
    evaluation.add_argument("--max-new-tokens", type=int, default=128, help="held-out continuation length")
    evaluation.add_argument("--scale-prompts", type=int, default=64,
                            help="held-out prompts after the --eval-prompts ones that the draft's logit scale is "
                            "fitted on (q = softmax(s * logits), the s with the most alpha)")
    parser.add_argument("--seed", type=int, default=0, help="seeds sampling and data order")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")


def run(args) -> int:
    import json
    from pathlib import Path

    if args.evaluate and args.fit_logit_scale:
        raise SystemExit("--evaluate and --fit-logit-scale each run alone: run one, then the other")
    if args.init_from and args.resume:
        raise SystemExit("--init-from starts a run from a saved draft, --resume continues a checkpoint: pass one")
    # None takes the draft type's default (`or` below), which would silently replace a 0 too
    for flag, value in (("--steps", args.steps), ("--batch-tokens", args.batch_tokens), ("--lr", args.lr)):
        if value is not None and value <= 0:
            raise SystemExit(f"{flag} must be positive (got {value}); leave it out for the default")
    import torch

    from hf_specdec import distill
    from hf_specdec.draft_quality import evaluate_draft
    from hf_specdec.teacher import build_generated_teacher_data, build_teacher_data

    torch.set_num_threads(args.threads)
    target, tokenizer = _load_target(args.target)
    out = Path(args.out)
    if args.evaluate or args.fit_logit_scale:
        from transformers import AutoModelForCausalLM

        import hf_specdec.models  # noqa: F401  (registers the draft model types)

        draft_dir = args.evaluate or args.fit_logit_scale
        draft = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=torch.float32).eval()
        if args.fit_logit_scale:
            report = _fit_logit_scale(target, draft, tokenizer, out, args)
            draft.config.save_pretrained(draft_dir)
        else:
            report = evaluate_draft(target, draft, tokenizer, out / "heldout", args.eval_prompts, args.max_new_tokens,
                                    args.seed)
        print(json.dumps(report, indent=2))
        return 0

    defaults = DEFAULTS[args.draft_type]
    layers = args.layers or defaults["layers"]
    checkpoint = out / "checkpoint.pt"
    if checkpoint.exists() and not args.resume:
        raise SystemExit(f"{checkpoint} exists: pass --resume to continue that run, or choose another --out")
    if args.resume and not checkpoint.exists():
        raise SystemExit(f"--resume: no checkpoint at {checkpoint}; drop --resume to start a run there")
    # before the teacher data: the draft a run continues, refusing options that describe another
    layer_count = int(layers) if args.draft_type == "feature" else len(layers.split(","))
    if args.resume:
        draft = distill.draft_from_checkpoint(checkpoint)
        distill.check_draft_options(draft, args.draft_type, layer_count, args.vocab_size, args.oov_rank)
    elif args.init_from:
        draft = distill.pretrained_draft(Path(args.init_from), target)
        distill.check_draft_options(draft, args.draft_type, layer_count, args.vocab_size, args.oov_rank,
                                    source=args.init_from, fix="pass the options that describe it")
    data = build_teacher_data(target, tokenizer, Path(args.teacher_dir), args.positions, args.max_tokens)
    if args.generated_prompts:
        generated = build_generated_teacher_data(target, tokenizer, Path(f"{args.teacher_dir}-generated"),
                                                 args.generated_prompts, args.generated_new_tokens, seed=args.seed)
        for _ in range(args.generated_repeats):
            data = data + generated
    if not (args.resume or args.init_from):
        kept = distill.choose_kept_tokens(data, target.get_output_embeddings(), args.vocab_size,
                                          always_keep=tokenizer.all_special_ids)
        if args.draft_type == "feature":
            draft = distill.init_feature_draft(target, kept, int(layers), args.oov_rank, seed=args.seed)
        else:
            draft = distill.init_standalone_draft(target, kept, [int(layer) for layer in layers.split(",")], args.oov_rank)
    teacher_head = distill.head_rows(target.get_output_embeddings(), draft.config.kept_token_ids)
    options = distill.TrainingOptions(
        steps=args.steps or defaults["steps"],
        batch_tokens=args.batch_tokens or defaults["batch_tokens"],
        lr=args.lr or defaults["lr"],
        warmup_steps=args.warmup_steps,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        bf16_autocast=not args.fp32,
        feature=distill.FeatureLossOptions(unroll=args.unroll),
    )
    out.mkdir(parents=True, exist_ok=True)
    distill.train_draft(draft, teacher_head, data, options, checkpoint, args.resume, tokenizer.pad_token_id)
    scale_fit = _fit_logit_scale(target, draft, tokenizer, out, args)
    distill.save_draft(draft, out / "draft")
    report = evaluate_draft(target, draft, tokenizer, out / "heldout", args.eval_prompts, args.max_new_tokens, args.seed)
    report["logit_scale_fit"] = scale_fit
    (out / "draft" / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


def _fit_logit_scale(target, draft, tokenizer, out, args) -> dict:
    """Fit `draft`'s logit scale (set on it and its config) on the held-out prompts after the ones --evaluate
    measures, so the measurement never sees what the scale was fitted on."""
    from hf_specdec.data import heldout_prompts
    from hf_specdec.draft_quality import fit_logit_scale
    from hf_specdec.teacher import target_continuations

    prompts = heldout_prompts(args.eval_prompts + args.scale_prompts, tokenizer)[args.eval_prompts:]
    samples = target_continuations(target, tokenizer, prompts, out / "scale-fit", 16, args.max_new_tokens, args.seed,
                                   greedy=False)
    fit = fit_logit_scale(draft, target, samples)
    draft.config.logit_scale = draft.lm_head.logit_scale = fit["logit_scale"]
    return fit


def _load_target(name: str):
    if name == EMBEDDED_TARGET:
        from hf_specdec.models import load_target, load_tokenizer

        return load_target(), load_tokenizer()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(name).eval(), AutoTokenizer.from_pretrained(name)

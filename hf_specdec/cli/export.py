"""`hf-specdec export`: the target and draft as ONNX files with a manifest, for `generate --backend onnxruntime`, and
with --tensorrt their TensorRT engines, for `generate --backend tensorrt`."""

from __future__ import annotations

import argparse
import sys

from hf_specdec.export.manifest import DEFAULT_MAX_BATCH, DEFAULT_MAX_NEW_TOKENS, DEFAULT_SPECULATIVE_CONFIG


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export the target and draft to ONNX (for --backend onnxruntime)",
        description="Export a target/draft pair to ONNX: DIR/target.onnx and DIR/draft.onnx (weights as external "
        "data), the tokenizer files, generation_config.json and manifest.json. Without --target/--draft the embedded "
        "default pair is exported. A feature-conditioned draft (`hf-specdec distill --draft-type feature`) exports "
        "with its target: the target graph also returns its hidden states (output hidden_states), which the draft "
        "graph reads (input features). Run it with `hf-specdec generate --backend onnxruntime --model-dir DIR PROMPT`.",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--target", help="target model: HF id or directory (default: the embedded target)")
    parser.add_argument(
        "--draft", help="draft model: HF id or directory, standalone or feature-conditioned (required with --target)"
    )
    parser.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, help=f"largest batch (default {DEFAULT_MAX_BATCH})")
    parser.add_argument(
        "--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
        help=f"most tokens per forward: the largest draft tree + 1; prompts are prefilled in chunks of this size "
        f"(default {DEFAULT_MAX_NEW_TOKENS})",
    )
    parser.add_argument("--max-past", type=int, help="most cache slots per row (default: the target's max_position_embeddings)")
    parser.add_argument(
        "--tensorrt", action="store_true",
        help="also build TensorRT engines (DIR/target.engine, draft.engine, verify_<rule>.engine) with tensorrt or "
        "tensorrt_rtx, whichever is installed; run them with `generate --backend tensorrt` (needs a supported GPU)",
    )
    parser.add_argument(
        "--engines-only", action="store_true",
        help="with --tensorrt: build the engines from the ONNX export already in DIR instead of exporting again",
    )
    parser.add_argument(
        "--compute-capability", action="append", metavar="SMxy",
        help="TensorRT for RTX: a GPU generation to build for, e.g. SM89 (repeatable; default SM80 SM86 SM89 SM120)",
    )
    parser.add_argument(
        "--config", default=DEFAULT_SPECULATIVE_CONFIG,
        help=f"speculative config that `generate --config auto` runs on this export (default {DEFAULT_SPECULATIVE_CONFIG})",
    )


def run(args: argparse.Namespace) -> int:
    if args.engines_only and not args.tensorrt:
        raise SystemExit("--engines-only builds TensorRT engines: add --tensorrt")
    if not args.engines_only:
        export_onnx(args)
    if args.tensorrt:
        from hf_specdec.export.tensorrt_build import build_engines

        record = build_engines(args.out, capabilities=args.compute_capability).tensorrt
        print(
            f"built {', '.join(record['engines'])} with {record['library']} {record['version']} for "
            f"{' '.join(record['compute_capabilities'])} in {args.out}",
            file=sys.stderr,
        )
    return 0


def export_onnx(args: argparse.Namespace) -> None:
    from hf_specdec.cli.generate import load_models
    from hf_specdec.export.onnx_export import export_pair

    if args.target is not None and args.draft is None:
        raise SystemExit("--target needs --draft: an export holds both models of the pair")
    target, draft, tokenizer = load_models(args)
    default_pair = "hf_specdec.models.load_default_pair()"
    sources = {"target": args.target or default_pair, "draft": args.draft or default_pair}
    manifest = export_pair(
        target, draft, tokenizer, args.out, sources,
        max_batch=args.max_batch, max_new_tokens=args.max_new_tokens, max_past=args.max_past, speculative_config=args.config,
    )
    print(
        f"exported {manifest.target.architecture} ({manifest.target.num_layers} layers) and "
        f"{manifest.draft.architecture} ({manifest.draft.num_layers} layers) to {args.out}; limits {manifest.max_dims}",
        file=sys.stderr,
    )

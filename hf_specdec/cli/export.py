"""`hf-specdec export`: the target and draft as ONNX files with a manifest, for `generate --backend onnxruntime`, and
with --tensorrt their TensorRT engines, for `generate --backend tensorrt`. With --quantize int4|int8 the graphs hold
block-quantized weights for ONNX Runtime's MatMulNBits (`hf_specdec.export.quantize`)."""

from __future__ import annotations

import argparse
import sys

from hf_specdec.export.manifest import AUTO, DEFAULT_MAX_BATCH, DEFAULT_MAX_NEW_TOKENS, DEFAULT_SPECULATIVE_CONFIG

# the choices of --quantize, --quantize-head, --accuracy-level (`hf_specdec.export.quantize`, which imports onnx)
WEIGHT_SCHEMES = ("none", "int8", "int4")
HEAD_SCHEMES = ("int8", "int4", "none")
DEFAULT_HEAD = "int8"
ACCURACY_LEVELS = (0, 1, 2, 3, 4)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export the target and draft to ONNX (for --backend onnxruntime)",
        description="Export a target/draft pair to ONNX: DIR/target.onnx and DIR/draft.onnx (weights as external "
        "data), the tokenizer files, generation_config.json and manifest.json. Without --target/--draft the embedded "
        "default pair is exported. A feature-conditioned draft (`hf-specdec distill --draft-type feature`) exports "
        "with its target: the target graph also returns its hidden states (output hidden_states), which the draft "
        "graph reads (input features). Run it with `hf-specdec generate --backend onnxruntime --model-dir DIR PROMPT`. "
        "--quantize int4 (or int8) stores every linear weight of both models in blocks of 32 along the input dimension "
        "(ONNX Runtime's com.microsoft.MatMulNBits; the LM head by --quantize-head); the default target's weights "
        "then come from its own Q4_1 GGUF blocks, the same weights llama.cpp multiplies. Speculative decoding on a "
        "quantized export is exact with respect to the quantized target graph.",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--target", help="target model: HF id or directory (default: the embedded target)")
    parser.add_argument(
        "--draft", help="draft model: HF id or directory, standalone or feature-conditioned (required with --target)"
    )
    parser.add_argument("--draft-kind", choices=("feature", "standalone"),
                        help="which embedded draft to export with the embedded target (default: feature; not with "
                        "--target)")
    # the export's options default to None (export_pair's defaults apply), so --engines-only can refuse each one given
    parser.add_argument("--max-batch", type=int, help=f"largest batch (default {DEFAULT_MAX_BATCH})")
    parser.add_argument(
        "--max-new-tokens", type=int,
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
        help="with --tensorrt: build the engines from the ONNX export already in DIR instead of exporting again "
        "(not with the options of the export: --target, --draft, --draft-kind, --max-*, --config)",
    )
    parser.add_argument(
        "--compute-capability", action="append", metavar="SMxy",
        help="with --tensorrt, TensorRT for RTX: a GPU generation to build for, e.g. SM89 (repeatable; default SM80 "
        "SM86 SM89 SM120)",
    )
    parser.add_argument(
        "--quantize", choices=WEIGHT_SCHEMES, default="none",
        help="block-quantize every linear weight of the decoder layers of target and draft (blocks of 32 along the "
        "input dimension, com.microsoft.MatMulNBits: ONNX Runtime only, not with --tensorrt); default none: float "
        "graphs as before",
    )
    parser.add_argument(
        "--quantize-head", choices=HEAD_SCHEMES,
        help=f"with --quantize: the LM head's scheme (default {DEFAULT_HEAD}; none keeps it in float)",
    )
    parser.add_argument(
        "--gguf", metavar="PATH|none",
        help="with --quantize: the target's GGUF file, whose Q4_0/Q4_1/Q8_0 blocks are used as they are wherever "
        "they hold exactly the target's weights (others are quantized round-to-nearest); default: the packaged "
        "Q4_1 GGUF for the embedded target, none for --target",
    )
    parser.add_argument(
        "--accuracy-level", type=int, choices=ACCURACY_LEVELS,
        help="with --quantize: MatMulNBits' accuracy_level for the decoder layers: 0 (the default for int4) keeps "
        "activations in float, so speculative decoding agrees with the graph's own one-token decoding as on float "
        "graphs; 4 (the default for int8: ONNX Runtime has no fast 8-bit kernel with float activations) quantizes them "
        "to int8 blocks, ~2x faster 4-bit products, but the output then moves by more than float rounding between "
        "a tree forward and one-token decoding, and greedy tokens can differ at near ties",
    )
    parser.add_argument(
        "--head-accuracy-level", type=int, choices=ACCURACY_LEVELS,
        help="with --quantize: the LM head's accuracy_level (default 4 for an int8 head, else the decoder layers')",
    )
    parser.add_argument(
        "--config",
        help="speculative config that `generate --config auto` runs on this export, or auto: the shape (or ar) predicted "
        "fastest from the exported graphs' own forwards timed on ONNX Runtime here (default: auto with --quantize, "
        f"whose graphs only ONNX Runtime runs; else {DEFAULT_SPECULATIVE_CONFIG})",
    )


def run(args: argparse.Namespace) -> int:
    if args.engines_only and not args.tensorrt:
        raise SystemExit("--engines-only builds TensorRT engines: add --tensorrt")
    if args.compute_capability and not args.tensorrt:
        raise SystemExit("--compute-capability picks the GPUs TensorRT engines are built for: add --tensorrt")
    export_options = {"--target": args.target, "--draft": args.draft, "--draft-kind": args.draft_kind,
                      "--max-batch": args.max_batch, "--max-new-tokens": args.max_new_tokens,
                      "--max-past": args.max_past, "--config": args.config}
    given = [flag for flag, value in export_options.items() if value is not None]
    if args.engines_only and given:
        raise SystemExit(f"--engines-only builds engines from the export already in {args.out}, so {', '.join(given)} "
                         "would be ignored: drop them, or export again (without --engines-only) with them")
    if args.tensorrt and args.config == AUTO:
        raise SystemExit("--config auto times the exported graphs on ONNX Runtime, not on the GPU the TensorRT engines "
                         "will run on: pass the config they should run (e.g. --config rsd-s:w=3,d=4)")
    if args.tensorrt and args.quantize != "none":
        raise SystemExit("--quantize writes ONNX Runtime's com.microsoft.MatMulNBits, which TensorRT cannot parse: "
                         "build TensorRT engines from a float export (without --quantize) in another --out DIR")
    quantize_options = (args.quantize_head, args.gguf, args.accuracy_level, args.head_accuracy_level)
    if args.quantize == "none" and any(option is not None for option in quantize_options):
        raise SystemExit("--quantize-head, --gguf and the accuracy levels apply to a quantized export: add --quantize "
                         "int4 (or int8)")
    if not args.engines_only:
        export_onnx(args)
    if args.tensorrt:
        from hf_specdec.export.manifest import Manifest
        from hf_specdec.export.tensorrt_build import build_engines

        if args.engines_only and any(Manifest.load(args.out).entry(r).quantized for r in ("target", "draft")):
            raise SystemExit(f"{args.out} is a quantized export (com.microsoft.MatMulNBits, ONNX Runtime only): build "
                             "TensorRT engines from a float export, `hf-specdec export --tensorrt --out OTHER_DIR`")

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
    quantization = quantization_spec(args)
    target, draft, tokenizer = load_models(args)
    default_pair = "hf_specdec.models.load_default_pair()"
    sources = {"target": args.target or default_pair, "draft": args.draft or default_pair}
    config = args.config or (AUTO if quantization is not None else None)
    given = {"max_batch": args.max_batch, "max_new_tokens": args.max_new_tokens, "speculative_config": config}
    manifest = export_pair(
        target, draft, tokenizer, args.out, sources, max_past=args.max_past, quantization=quantization,
        **{name: value for name, value in given.items() if value is not None},  # else export_pair's defaults
    )
    print(
        f"exported {manifest.target.architecture} ({manifest.target.num_layers} layers) and "
        f"{manifest.draft.architecture} ({manifest.draft.num_layers} layers) to {args.out}; limits {manifest.max_dims}",
        file=sys.stderr,
    )
    if quantization is not None:
        from hf_specdec.export.quantize import describe

        for role in ("target", "draft"):
            print(f"{role}: {describe(manifest.entry(role).quantization)}", file=sys.stderr)


def quantization_spec(args: argparse.Namespace):
    """The `QuantizationSpec` of --quantize, --quantize-head, --gguf, --accuracy-level (None: a float export). The
    GGUF defaults to the packaged one for the embedded target (the file it is converted from)."""
    if args.quantize == "none":
        return None
    from pathlib import Path

    from hf_specdec.export.quantize import QuantizationSpec

    gguf = args.gguf
    if gguf is None and args.target is None:
        from hf_specdec import models

        gguf = models._target_package_dir() / models.TARGET_GGUF_FILE
    elif gguf is not None and gguf.lower() == "none":
        gguf = None
    if gguf is not None and not Path(gguf).is_file():
        raise SystemExit(f"--gguf {gguf}: no such file")
    return QuantizationSpec.from_options(args.quantize, args.quantize_head, gguf, args.accuracy_level,
                                         args.head_accuracy_level)

"""`hf-specdec generate`: speculative decoding of one prompt from the shell. Text on stdout, stats on stderr."""

from __future__ import annotations

import argparse
import sys

BACKENDS = ("pytorch", "onnxruntime", "tensorrt")
# the sampling options' defaults (the target's own distribution): --greedy refuses other values, which it would ignore
SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate text for one prompt with speculative decoding",
        description="Generate a reply to PROMPT with tree speculative decoding. The generated text goes to stdout "
        "(streamed), statistics to stderr. Without --target/--model-dir the embedded default pair is used "
        "(SmolLM2-135M-Instruct and the project's distilled draft: the feature-conditioned one unless "
        "--draft-kind standalone).",
    )
    parser.add_argument("prompt", help="the user message (wrapped in the target's chat template unless --raw)")
    parser.add_argument("--backend", choices=BACKENDS, default="pytorch", help="runtime of both models (default: pytorch)")
    parser.add_argument("--model-dir", help="an exported pair (`hf-specdec export --out DIR`) for onnxruntime/tensorrt")
    parser.add_argument("--target", help="target model: HF id or directory (pytorch backend)")
    parser.add_argument("--draft", help="draft model: HF id or directory (pytorch backend; default: the embedded draft)")
    parser.add_argument("--draft-kind", choices=("feature", "standalone"),
                        help="which embedded draft (pytorch backend, without --target): feature-conditioned (reads the "
                        "target's hidden states; the default) or standalone")
    parser.add_argument(
        "--config", default="auto",
        help="speculative config, e.g. rsd-s:w=4,d=5, rsd-c:b=3-2-2, sd:l=4, ar (default: auto, the planner's choice; "
        "on an exported pair the config recorded at export)",
    )
    parser.add_argument("--greedy", action="store_true",
                        help="greedy decoding (default: sampling; not with --temperature, --top-k, --top-p)")
    parser.add_argument("--temperature", type=float, default=SAMPLING_DEFAULTS["temperature"])
    parser.add_argument("--top-k", type=int, default=SAMPLING_DEFAULTS["top_k"], help="0 = off")
    parser.add_argument("--top-p", type=float, default=SAMPLING_DEFAULTS["top_p"])
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--raw", action="store_true", help="use the prompt as is, without the chat template")
    parser.add_argument("--no-stream", action="store_true", help="print the text once at the end")
    parser.add_argument("--tp-plan", choices=("auto",),
                        help="shard the target with transformers' tensor parallelism, one shard per process: run under "
                        "`torchrun --nproc-per-node N -m hf_specdec generate --tp-plan auto ...` (pytorch backend; the "
                        "draft is replicated; rank 0 prints)")


def load_models(args, tp_plan: str | None = None):
    """(target, draft, tokenizer) for the pytorch backend; `tp_plan` shards the target (under torchrun)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.target is None:
        if args.draft is not None:
            raise SystemExit("--draft needs --target (the embedded draft belongs to the embedded target)")
        from hf_specdec import models

        if tp_plan:
            _converted_once(models.converted_target_dir)
        draft_kind = models.DEFAULT_DRAFT_KIND if args.draft_kind is None else args.draft_kind
        return models.load_default_pair(draft_kind=draft_kind, tp_plan=tp_plan)
    if args.draft_kind is not None:
        raise SystemExit("--draft-kind picks an embedded draft, which runs with the embedded target only: drop it and "
                         "give the draft for --target with --draft")
    extra = {"tp_plan": tp_plan} if tp_plan else {}
    target = AutoModelForCausalLM.from_pretrained(args.target, attn_implementation="sdpa", **extra).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.target)
    draft = AutoModelForCausalLM.from_pretrained(args.draft, attn_implementation="sdpa").eval() if args.draft else None
    return target, draft, tokenizer


def _converted_once(convert) -> None:
    """Under torchrun: rank 0 converts (or finds) the cached target first, the other ranks then read it."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group()
    if dist.get_rank() == 0:
        convert()
    dist.barrier()


def encode_prompt(tokenizer, prompt: str, raw: bool):
    if raw or tokenizer.chat_template is None:
        return tokenizer(prompt, return_tensors="pt")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )


def sampling_options(args) -> dict:
    """Generation settings shared by every backend."""
    options = {"do_sample": not args.greedy, "max_new_tokens": args.max_new_tokens}
    if not args.greedy:
        options.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    return options


def pytorch_generator(args):
    """(tokenizer, generate(inputs, streamer) -> (sequences, stats)) on the HF models."""
    from hf_specdec import speculative_generate

    if args.model_dir is not None:
        raise SystemExit(f"--model-dir holds an exported pair: run it with --backend onnxruntime (now: --backend {args.backend})")
    if args.target is not None and args.draft is None and _config_method(args.config) != "ar":
        raise SystemExit(f"--config {args.config} drafts, and --target has no embedded draft: add --draft DIR, or use "
                         "--config ar")
    target, draft, tokenizer = load_models(args, args.tp_plan)

    def generate(inputs, streamer):
        out = target.generate(
            **inputs,
            custom_generate=speculative_generate,
            draft_model=draft,
            speculative_config=args.config,
            speculative_streamer=streamer,
            return_dict_in_generate=True,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            **sampling_options(args),
        )
        return out.sequences, out.speculative_stats

    return tokenizer, generate


def exported_generator(args):
    """(tokenizer, generate(inputs, streamer) -> (sequences, stats)) on an exported pair (onnxruntime or tensorrt)."""
    from hf_specdec.generation import decode

    if args.model_dir is None:
        extra = " --tensorrt" if args.backend == "tensorrt" else ""
        raise SystemExit(f"--backend {args.backend} needs --model-dir DIR: create one with `hf-specdec export{extra} --out DIR`")
    if args.target or args.draft or args.draft_kind:
        raise SystemExit(f"--target/--draft/--draft-kind pick PyTorch models; with --backend {args.backend} both models "
                         "come from --model-dir")
    if args.backend == "tensorrt":
        from hf_specdec.export.trt_backend import load_tensorrt_pair as load_pair
    else:
        from hf_specdec.export.ort_backend import load_onnxruntime_pair as load_pair
    try:
        pair = load_pair(args.model_dir)
    except (RuntimeError, ValueError) as error:  # no usable GPU, a broken or mismatched model directory
        raise SystemExit(str(error)) from None
    generation_config = pair.generation_config
    generation_config.update(**sampling_options(args))
    config = pair.manifest.speculative_config if args.config == "auto" else args.config
    device = pair.target.device
    if args.config == "auto":
        from hf_specdec.planner.exported import planned_elsewhere

        note = planned_elsewhere(pair.manifest, device)
        if note is not None:
            print(f"note: {note}", file=sys.stderr)

    def generate(inputs, streamer):
        result = decode(pair.target, pair.draft, inputs["input_ids"].to(device), generation_config, config,
                        inputs["attention_mask"].to(device), streamer, verifier=pair.verifier)
        return result.sequences.cpu(), result.stats

    return pair.tokenizer, generate


def _config_method(config: str) -> str:
    from hf_specdec.config import SpeculativeConfig

    try:
        return SpeculativeConfig.parse(config).method
    except ValueError as error:
        raise SystemExit(f"--config: {error}") from None


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import TextStreamer

    sampling = ["--" + name.replace("_", "-") for name, default in SAMPLING_DEFAULTS.items()
                if getattr(args, name) != default]
    if args.greedy and sampling:
        raise SystemExit(f"--greedy does not sample, so {', '.join(sampling)} would be ignored: drop "
                         f"{'it' if len(sampling) == 1 else 'them'}, or drop --greedy to sample")
    torch.manual_seed(args.seed)
    if args.tp_plan and args.backend != "pytorch":
        raise SystemExit("--tp-plan shards a PyTorch target: use it with --backend pytorch")
    tokenizer, generate = pytorch_generator(args) if args.backend == "pytorch" else exported_generator(args)
    inputs = encode_prompt(tokenizer, args.prompt, args.raw)
    # every rank of a tensor-parallel run generates the same text; the first one prints it
    prints = not args.tp_plan or torch.distributed.get_rank() == 0
    streamer = None if args.no_stream or not prints else TextStreamer(tokenizer, skip_prompt=True,
                                                                     skip_special_tokens=True)
    sequences, stats = generate(inputs, streamer)
    if prints:
        if args.no_stream:
            new_tokens = sequences[0, inputs["input_ids"].shape[1]:]
            print(tokenizer.decode(new_tokens, skip_special_tokens=True))
        rate = stats.generated_tokens / max(stats.time_total, 1e-9)
        print(f"[{stats.summary()}; {rate:.1f} tokens/s]", file=sys.stderr)
    if args.tp_plan:
        # the ranks leave together: one exiting with its process group alive can abort the other's gloo threads
        # ("terminate called without an active exception")
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0

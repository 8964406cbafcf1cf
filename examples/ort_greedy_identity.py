"""Greedy speculative decoding on an exported (e.g. int4) pair against the same graphs decoding one token at a time,
on held-out prompts: the speculative text must be the plain text, prompt by prompt. Prints where a config first
differs, how many prompts were identical, and tokens/s of each.

    hf-specdec export --out runs/onnx-int4 --quantize int4
    python examples/ort_greedy_identity.py runs/onnx-int4 [--prompts 20] [--max-new-tokens 64] \
        [--configs rsd-c:b=2-2 sd:l=4]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoTokenizer, GenerationConfig

from hf_specdec.data import heldout_prompts
from hf_specdec.export.ort_backend import load_onnxruntime_pair
from hf_specdec.generation import decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--configs", nargs="+", default=["rsd-c:b=2-2", "rsd-s:w=2,d=3", "sd:l=4"],
                        help="speculative configs (space-separated)")
    args = parser.parse_args()
    configs = args.configs

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    pair = load_onnxruntime_pair(args.model_dir)
    eos = tokenizer.eos_token_id
    generation_config = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=False, eos_token_id=eos,
                                         pad_token_id=eos)
    identical = dict.fromkeys(configs, 0)
    seconds, tokens = dict.fromkeys(["ar", *configs], 0.0), dict.fromkeys(["ar", *configs], 0)
    prompts = heldout_prompts(args.prompts, tokenizer)
    for index, text in enumerate(prompts):
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
        outputs = {}
        for config in ["ar", *configs]:
            start = time.perf_counter()
            result = decode(pair.target, pair.draft, ids, generation_config, config)
            seconds[config] += time.perf_counter() - start
            outputs[config] = result.sequences[0, ids.shape[1]:].tolist()
            tokens[config] += len(outputs[config])
        for config in configs:
            if outputs[config] == outputs["ar"]:
                identical[config] += 1
            else:
                pairs = list(zip(outputs[config], outputs["ar"]))
                first = next((i for i, (a, b) in enumerate(pairs) if a != b), len(pairs))
                print(f"prompt {index}: {config} differs from one-token decoding at new token {first}", flush=True)
        print(f"{index + 1}/{len(prompts)} prompts: " + ", ".join(f"{c} {identical[c]} identical" for c in configs),
              flush=True)
    print("identical to one-token decoding: " + ", ".join(f"{c} {identical[c]}/{len(prompts)}" for c in configs))
    print("tokens/s: " + ", ".join(f"{c} {tokens[c] / seconds[c]:.1f}" for c in seconds))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()

"""Does `auto` ever lose to plain `generate`? On the embedded pair, for each batch size and temperature: plain
`generate`, `auto` (the planner's pick, learning from every run before it) and a fixed tree, on the same held-out
prompts (left-padded batches), interleaved per batch so that a slow spell of the machine hits all alike. Prints
tokens/s, the ratio to plain `generate`, and what `auto` ran.

    python examples/auto_batches.py [--batch-sizes 1,4] [--temperatures 1,0] [--prompts 8] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import time

import torch

from hf_specdec import speculative_generate
from hf_specdec.data import heldout_prompts
from hf_specdec.models import load_default_pair
from hf_specdec.planner.calibration import cpu_name


def generated_tokens(new_tokens: torch.Tensor, eos: int) -> int:
    """Tokens each row generated: up to and including its first eos (generate pads the rest)."""
    is_eos = new_tokens == eos
    ended = is_eos.any(-1)
    lengths = torch.where(ended, is_eos.int().argmax(-1) + 1, new_tokens.shape[-1])
    return int(lengths.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    csv = lambda kind: (lambda text: [kind(x) for x in text.split(",")])  # noqa: E731
    parser.add_argument("--batch-sizes", type=csv(int), default=[1, 4])
    parser.add_argument("--temperatures", type=csv(float), default=[1.0, 0.0])
    parser.add_argument("--fixed", default="rsd-c:b=2-2", help="a fixed tree shape to run beside auto")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    target, draft, tokenizer = load_default_pair()
    tokenizer.padding_side = "left"
    prompts = heldout_prompts(args.prompts, tokenizer)
    eos = tokenizer.eos_token_id
    methods = {
        "plain generate": {},
        "auto": dict(custom_generate=speculative_generate, draft_model=draft, speculative_config="auto",
                     return_dict_in_generate=True),
        args.fixed: dict(custom_generate=speculative_generate, draft_model=draft, speculative_config=args.fixed),
    }
    print(f"{args.prompts} held-out prompts x {args.max_new_tokens} new tokens on {cpu_name()}, "
          f"{torch.get_num_threads()} threads", flush=True)
    for temperature in args.temperatures:
        sampling = (dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0
                    else dict(do_sample=False))
        for batch_size in args.batch_sizes:
            batches = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]

            def run(batch, max_new_tokens, kwargs):
                inputs = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False)
                torch.manual_seed(args.seed)
                start = time.perf_counter()
                out = target.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=eos, **sampling, **kwargs)
                seconds = time.perf_counter() - start
                sequences = out.sequences if hasattr(out, "sequences") else out
                return out, generated_tokens(sequences[:, inputs["input_ids"].shape[1]:], eos), seconds

            for kwargs in methods.values():  # warm-up (and auto's one-time calibration at this batch size)
                run(batches[0], 8, kwargs)
            tokens, seconds, ran = dict.fromkeys(methods, 0), dict.fromkeys(methods, 0.0), []
            for batch in batches:
                for name, kwargs in methods.items():
                    out, count, spent = run(batch, args.max_new_tokens, kwargs)
                    tokens[name] += count
                    seconds[name] += spent
                    if name == "auto":
                        ran.append(out.speculative_stats.config)
            plain = tokens["plain generate"] / seconds["plain generate"]
            print(f"temperature {temperature:g}, batch {batch_size} (auto ran {', '.join(dict.fromkeys(ran))}):")
            for name in methods:
                rate = tokens[name] / seconds[name]
                print(f"  {name:20s} {rate:6.1f} tokens/s  {rate / plain:.2f}x", flush=True)


if __name__ == "__main__":
    main()

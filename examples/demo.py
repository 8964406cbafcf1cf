"""The main job on the embedded default pair, measured honestly on this machine: on the same prompts, plain
`generate`, HF assisted generation with the same draft, hf_specdec's loop without speculation (`ar`) and the
speculative config (`auto` by default: the planner's pick, which is plain decoding itself when no tree pays here),
each with tokens/s and its ratio to plain `generate`.

    python examples/demo.py [--config rsd-s:w=3,d=4] [--prompts 3] [--max-new-tokens 96]
"""

from __future__ import annotations

import argparse
import time

import torch

from hf_specdec import speculative_generate
from hf_specdec.data import heldout_prompts
from hf_specdec.models import load_default_pair
from hf_specdec.planner.calibration import cpu_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="auto", help="speculative config (default: the planner's choice)")
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(max(torch.get_num_threads(), 1))
    target, draft, tokenizer = load_default_pair()
    prompts = heldout_prompts(args.prompts, tokenizer)
    sampling = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=args.max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id)

    def timed(**kwargs):
        tokens, seconds, outputs = 0, 0.0, []
        for prompt in prompts:
            inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
            torch.manual_seed(args.seed)
            start = time.perf_counter()
            out = target.generate(**inputs, **{**sampling, **kwargs})
            seconds += time.perf_counter() - start
            sequences = out.sequences if hasattr(out, "sequences") else out
            new = sequences[0, inputs["input_ids"].shape[1]:]
            tokens += len(new)
            outputs.append((out, tokenizer.decode(new, skip_special_tokens=True)))
        return tokens / seconds, outputs

    # warm-up, which also runs the planner's one-time calibration for "auto" (and its first exploration)
    timed(custom_generate=speculative_generate, draft_model=draft, speculative_config=args.config, max_new_tokens=8)
    timed(max_new_tokens=8)
    rows = {"plain generate": timed()[0]}
    rows["HF assisted generation (same draft)"] = timed(assistant_model=draft)[0]
    rows["hf_specdec loop, no speculation (ar)"] = timed(custom_generate=speculative_generate, speculative_config="ar")[0]
    rate, outputs = timed(custom_generate=speculative_generate, draft_model=draft, speculative_config=args.config,
                          return_dict_in_generate=True)
    for prompt, (out, text) in zip(prompts, outputs):
        print(f"--- {prompt.strip()[-80:]!r}\n{text}\n[{out.speculative_stats.summary()}]\n")
    rows[f"hf_specdec {args.config} (ran {outputs[0][0].speculative_stats.config})"] = rate
    print(f"{len(prompts)} held-out prompts x {args.max_new_tokens} new tokens, sampling at temperature 1, on "
          f"{cpu_name()}, {torch.get_num_threads()} threads:")
    plain = rows["plain generate"]
    for name, value in rows.items():
        print(f"  {name:55s} {value:6.1f} tokens/s  {value / plain:.2f}x")


if __name__ == "__main__":
    main()

"""The main job on the embedded default pair, measured honestly on this machine: on the same prompts, plain
`generate`, HF assisted generation with the project's standalone draft (HF assisted generation cannot run a
feature-conditioned draft), hf_specdec's loop without speculation (`ar`) and the speculative config with the default
(feature-conditioned) draft (`auto` by default: the planner's pick, which is plain decoding itself when no tree pays
here), each with tokens/s and its ratio to plain `generate`.

    python examples/demo.py [--config rsd-s:w=3,d=4] [--prompts 3] [--max-new-tokens 96]
"""

from __future__ import annotations

import argparse
import time

import torch

from hf_specdec import speculative_generate
from hf_specdec.data import heldout_prompts
from hf_specdec.models import load_default_pair, load_draft
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
    standalone = load_draft(kind="standalone")
    prompts = heldout_prompts(args.prompts, tokenizer)
    sampling = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=args.max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id)

    methods = {
        "plain generate": {},
        "HF assisted generation (standalone draft)": dict(assistant_model=standalone),
        "hf_specdec loop, no speculation (ar)": dict(custom_generate=speculative_generate, speculative_config="ar"),
        f"hf_specdec {args.config}": dict(custom_generate=speculative_generate, draft_model=draft,
                                          speculative_config=args.config, return_dict_in_generate=True),
    }

    def run(prompt: str, max_new_tokens: int, **kwargs):
        inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        out = target.generate(**inputs, **{**sampling, "max_new_tokens": max_new_tokens, **kwargs})
        seconds = time.perf_counter() - start
        sequences = out.sequences if hasattr(out, "sequences") else out
        new = sequences[0, inputs["input_ids"].shape[1]:]
        return out, len(new), seconds, tokenizer.decode(new, skip_special_tokens=True)

    # warm-up, which also runs the planner's one-time calibration for "auto" (and its first exploration)
    for kwargs in methods.values():
        run(prompts[0], 8, **kwargs)
    # interleaved: every method on a prompt before the next prompt, so that a slow spell of the machine hits all alike
    tokens, seconds, ours = dict.fromkeys(methods, 0), dict.fromkeys(methods, 0.0), []
    for prompt in prompts:
        for name, kwargs in methods.items():
            out, count, spent, text = run(prompt, args.max_new_tokens, **kwargs)
            tokens[name] += count
            seconds[name] += spent
            if "draft_model" in kwargs:
                ours.append((prompt, out, text))
    for prompt, out, text in ours:
        print(f"--- {prompt.strip()[-80:]!r}\n{text}\n[{out.speculative_stats.summary()}]\n")
    ran = sorted({out.speculative_stats.config for _, out, _ in ours})
    print(f"{len(prompts)} held-out prompts x {args.max_new_tokens} new tokens, sampling at temperature 1, on "
          f"{cpu_name()}, {torch.get_num_threads()} threads (hf_specdec {args.config} ran {', '.join(ran)}):")
    plain = tokens["plain generate"] / seconds["plain generate"]
    for name in methods:
        rate = tokens[name] / seconds[name]
        print(f"  {name:55s} {rate:6.1f} tokens/s  {rate / plain:.2f}x")

if __name__ == "__main__":
    main()

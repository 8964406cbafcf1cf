"""One rank of the tensor-parallel tests (tests/test_tensor_parallel.py launches it with torchrun, 2 processes, gloo).

Each rank loads the target of every family in MODELS with tp_plan="auto" (sharded over the ranks), the same target
unsharded, and the draft replicated; runs every method greedy and sampled, batch 1 and 3 with left padding; and
writes what it saw to OUT/rank-R.json: the sharded and unsharded sequences and the collective calls per step.
With --diverge, rank 1 runs a different draft and records the error the loop raised instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import left_padded_prompts, perturbed_copy  # noqa: E402

from hf_specdec import speculative_generate  # noqa: E402
from hf_specdec.distributed import RanksDivergedError  # noqa: E402

METHODS = ["ar", "sd:l=4", "spectr:k=3,l=3", "rsd-c:b=2-2-1", "rsd-s:w=3,d=4", "rsd-c:b=3-2-1-1,q=0.2"]
NEW_TOKENS = 24


def generate(model, draft, inputs, method, do_sample, seed=0):
    torch.manual_seed(seed)
    out = model.generate(**inputs, do_sample=do_sample, max_new_tokens=NEW_TOKENS, pad_token_id=0,
                         custom_generate=speculative_generate, draft_model=draft, speculative_config=method,
                         return_dict_in_generate=True)
    return out.sequences, out.speculative_stats


def collectives(run) -> tuple[int, object]:
    """Process-group collectives (gloo or NCCL calls) made while `run()` runs, and its result."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = run()
    counts = Counter(event.name.split(":")[0] for event in prof.events() if event.name.startswith(("gloo:", "nccl:")))
    return sum(counts.values()), result


def error_of(run) -> str | None:
    try:
        run()
    except ValueError as error:
        return str(error)
    return None


def compare(models: Path, rank: int) -> dict:
    report = {"cases": [], "collectives": {}, "tokens_per_second": {}, "errors": {}}
    for family_dir in sorted(models.iterdir()):
        sharded = AutoModelForCausalLM.from_pretrained(family_dir / "target", tp_plan="auto", dtype=torch.float32).eval()
        unsharded = AutoModelForCausalLM.from_pretrained(family_dir / "target", dtype=torch.float32).eval()
        draft = AutoModelForCausalLM.from_pretrained(family_dir / "draft", dtype=torch.float32).eval()
        vocab = sharded.config.vocab_size
        for batch in (1, 3):
            inputs = left_padded_prompts([2 * row for row in range(batch)], 9, vocab, seed=7)
            plain = unsharded.generate(**inputs, do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=0)
            for method in METHODS:
                for do_sample in (False, True):
                    ours, _ = generate(sharded, draft, inputs, method, do_sample)
                    reference, _ = generate(unsharded, draft, inputs, method, do_sample)
                    report["cases"].append({"family": family_dir.name, "batch": batch, "method": method,
                                            "do_sample": do_sample, "sharded": ours.tolist(),
                                            "unsharded": reference.tolist(),
                                            "plain generate": None if do_sample else plain.tolist()})
        if family_dir.name == "llama":
            inputs = left_padded_prompts([0], 9, vocab, seed=7)
            for method in ("ar", "rsd-s:w=3,d=4"):
                calls, (_, stats) = collectives(lambda: generate(sharded, draft, inputs, method, False))
                report["collectives"][method] = {"calls": calls, "target_calls": stats.target_calls,
                                                 "generated_tokens": stats.generated_tokens}
            plain, _ = collectives(lambda: sharded.generate(**inputs, do_sample=False, max_new_tokens=NEW_TOKENS,
                                                            pad_token_id=0))
            report["collectives"]["plain generate"] = {"calls": plain, "target_calls": NEW_TOKENS,
                                                       "generated_tokens": NEW_TOKENS}
            report["errors"]["auto"] = error_of(lambda: generate(sharded, draft, inputs, "auto", False))
            # a plan that misses layer 1: its weights gathered back into ordinary (replicated) tensors
            partly = AutoModelForCausalLM.from_pretrained(family_dir / "target", tp_plan="auto").eval()
            for module in partly.model.layers[1].modules():
                for name, weight in list(module._parameters.items()):
                    if isinstance(weight, DTensor):
                        module._parameters[name] = torch.nn.Parameter(weight.full_tensor(), requires_grad=False)
            report["errors"]["layer 1 unsharded"] = error_of(lambda: generate(partly, draft, inputs, "sd:l=2", False))
            for name, model in (("sharded", sharded), ("unsharded", unsharded)):
                generate(model, draft, inputs, "rsd-s:w=3,d=4", False)  # warm-up
                start = time.perf_counter()
                _, stats = generate(model, draft, inputs, "rsd-s:w=3,d=4", False)
                report["tokens_per_second"][name] = stats.generated_tokens / (time.perf_counter() - start)
    return report


def diverge(models: Path, rank: int) -> dict:
    family_dir = models / "llama"
    sharded = AutoModelForCausalLM.from_pretrained(family_dir / "target", tp_plan="auto", dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(family_dir / "draft", dtype=torch.float32).eval()
    if rank == 1:
        draft = perturbed_copy(draft, noise=2.0, seed=5)  # this rank's trees differ from rank 0's
    inputs = left_padded_prompts([0], 9, sharded.config.vocab_size, seed=7)
    try:
        generate(sharded, draft, inputs, "rsd-s:w=3,d=4", False)
    except RanksDivergedError as error:
        return {"error": str(error)}
    return {"error": None}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("models", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--diverge", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    report = diverge(args.models, rank) if args.diverge else compare(args.models, rank)
    (args.out / f"rank-{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

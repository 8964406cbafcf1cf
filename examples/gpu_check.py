"""The GPU check of the speculative step, in one run of under 10 minutes on one CUDA GPU (H100/H200 class).

    python examples/gpu_check.py [--quick] [--out runs/gpu]
    python examples/gpu_check.py --dry-run        # checks 1-3 on the CPU: the script's own test (about a minute)

Without a CUDA GPU it says so and exits 0 (CI has none). On a GPU, with random weights (latency does not depend on
weight values):
  1. the Triton verification kernel and the batched verifier against the reference on random trees, every rule;
  2. greedy identity of every method against plain generate, batch 1 and 3 with left padding (a tiny Llama pair, with a
     standalone and with a feature-conditioned draft);
  3. a chi-square test of sampled first tokens against the enumerated target distribution (tiny Llama, vocab 12);
  4. host reads per steady-state step (torch.cuda.set_sync_debug_mode counts what the step waits for);
  5. a 7B-shaped bf16 Llama target with a 2-layer draft (same width, shared embeddings and head) and with a 1-layer
     feature-conditioned draft (EAGLE-shaped): the step split (draft / target / verify / other, ms per step) and
     tokens/s against plain generate and HF assisted generation, batch 1 and 8.
Results print as they come and go to OUT/gpu_check.json. Checks 1-4 pass or fail (a verifier or greedy mismatch, a
chi-square p-value under 0.001, more than two host reads in a steady-state step): the script exits 1 and lists the
failures when any fails, so a run on a lent GPU answers without reading the log.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

METHODS = ["sd:l=4", "spectr:k=3,l=3", "rsd-c:b=2-2-1", "rsd-s:w=3,d=4"]
DEVICE = "cuda"  # --dry-run: "cpu", to check the script itself without a GPU


CHI_SQUARE_ALPHA = 1e-3  # 3 methods: a correct sampler fails the check with probability 0.3%


def log(results: dict, name: str, value, passed: bool = True) -> None:
    """Print and record a result; one that fails its check also goes to results["failures"]."""
    results[name] = value
    if not passed:
        results.setdefault("failures", []).append(name)
    print(f"{name}: {value}{'' if passed else '   <- FAILED'}", flush=True)


def check_verifiers(results: dict, cases: int) -> None:
    from verify_cases import random_case

    from hf_specdec.trt_plugins.triton_kernel import verify_tree_triton
    from hf_specdec.verification import VerifyInputs, verify_tree
    from hf_specdec.verify_batched import verify_tree_batched

    generator = torch.Generator().manual_seed(0)
    for rule in ("rrs", "spectr", "greedy"):
        mismatches = {"triton": 0, "batched": 0}
        for _ in range(cases):
            case = random_case(rule, batch=8, vocab=int(torch.randint(2, 64, (1,), generator=generator)), max_nodes=16,
                               generator=generator)
            expected = verify_tree(VerifyInputs(**case))
            on_gpu = VerifyInputs(**{k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in case.items()})
            for name, verifier in (("triton", verify_tree_triton), ("batched", verify_tree_batched)):
                found = verifier(on_gpu)
                same = all(torch.equal(getattr(expected, f).cpu(), getattr(found, f).cpu().to(getattr(expected, f).dtype))
                           for f in ("accepted_nodes", "num_accepted", "next_tokens"))
                mismatches[name] += not same
        log(results, f"verifier mismatches vs reference ({rule}, {cases} batches of 8)", mismatches,
            passed=not any(mismatches.values()))


def tiny_pair(vocab: int = 96):
    from tiny_models import perturbed_copy, tiny_model

    target = tiny_model("llama", vocab_size=vocab, scale=0.3).to(DEVICE)
    target.generation_config.eos_token_id = None
    return target, perturbed_copy(target, noise=0.05).to(DEVICE)


def check_greedy_identity(results: dict) -> None:
    from feature_fixtures import feature_draft_for, predictable_target
    from tiny_models import left_padded_prompts

    from hf_specdec import speculative_generate

    standalone = tiny_pair()
    feature_target = predictable_target("llama").to(DEVICE)
    feature_target.generation_config.eos_token_id = None
    pairs = {"standalone": standalone, "feature": (feature_target, feature_draft_for(feature_target).to(DEVICE))}
    failures = []
    for kind, (target, draft) in pairs.items():
        for batch in (1, 3):
            inputs = {k: v.to(DEVICE) for k, v in left_padded_prompts([2 * r for r in range(batch)], 9, 96, seed=7).items()}
            reference = target.generate(**inputs, do_sample=False, max_new_tokens=48, pad_token_id=0)
            for method in METHODS:
                out = target.generate(**inputs, do_sample=False, max_new_tokens=48, pad_token_id=0,
                                      custom_generate=speculative_generate, draft_model=draft, speculative_config=method)
                if not torch.equal(out, reference):
                    failures.append(f"{kind} draft, {method}, batch {batch}")
    log(results, "greedy identity failures", failures, passed=not failures)


def check_chi_square(results: dict, samples: int) -> None:
    from scipy.stats import chisquare
    from tiny_models import perturbed_copy, tiny_model

    from hf_specdec import speculative_generate

    torch.manual_seed(0)
    target = tiny_model("llama", vocab_size=12, scale=0.5).to(DEVICE)
    target.generation_config.eos_token_id = None
    draft = perturbed_copy(target, noise=0.5).to(DEVICE)
    prompt = torch.tensor([[1, 4, 7]], device=DEVICE)
    with torch.no_grad():
        first = target(prompt).logits[0, -1].float().softmax(-1).cpu()
    for method in ("sd:l=2", "rsd-s:w=3,d=2", "spectr:k=2,l=2"):
        counts = torch.zeros(12)
        prompts = prompt.expand(256, -1)
        for _ in range(samples // 256):
            out = target.generate(prompts, do_sample=True, top_k=0, max_new_tokens=1, pad_token_id=0,
                                  custom_generate=speculative_generate, draft_model=draft, speculative_config=method)
            counts += torch.bincount(out[:, -1].cpu(), minlength=12).float()
        expected = first * counts.sum()
        kept = expected > 5
        pvalue = float(chisquare(counts[kept], expected[kept] * counts[kept].sum() / expected[kept].sum()).pvalue)
        log(results, f"chi-square p-value of the first token ({method}, {int(counts.sum())} samples)", round(pvalue, 4),
            passed=pvalue >= CHI_SQUARE_ALPHA)


def check_host_syncs(results: dict) -> None:
    from tiny_models import left_padded_prompts

    from hf_specdec import speculative_generate
    from hf_specdec.loop import SpeculativeDecoder

    target, draft = tiny_pair()
    per_step = []
    step = SpeculativeDecoder._step

    def counting_step(self, *args, **kwargs):
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step(self, *args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        per_step.append(sum("synchroniz" in str(w.message) for w in caught))

    SpeculativeDecoder._step = counting_step
    try:
        for batch in (1, 8):
            per_step.clear()
            inputs = {k: v.to(DEVICE) for k, v in left_padded_prompts([r % 3 for r in range(batch)], 9, 96, seed=7).items()}
            target.generate(**inputs, do_sample=True, max_new_tokens=32, pad_token_id=0,
                            custom_generate=speculative_generate, draft_model=draft, speculative_config="rsd-s:w=3,d=4")
            steady = per_step[1:-1]
            log(results, f"synchronising calls per step (batch {batch}, rsd-s:w=3,d=4)", steady,
                passed=bool(steady) and max(steady) <= 2)
    finally:
        SpeculativeDecoder._step = step


def big_models():
    """A 7B-shaped target, a 2-layer standalone draft sharing its embeddings and head, and a 1-layer feature draft
    with a 8192-token head (random weights: latency does not depend on them)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_specdec.feature_draft import FeatureDraftConfig, FeatureDraftForCausalLM

    shape = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                 num_key_value_heads=32, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=None)
    with torch.device("cuda"):
        target = LlamaForCausalLM(LlamaConfig(num_hidden_layers=32, **shape)).to(torch.bfloat16).eval()
        draft = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, **shape)).to(torch.bfloat16).eval()
        feature = FeatureDraftForCausalLM(FeatureDraftConfig(num_hidden_layers=1, kept_token_ids=list(range(8192)),
                                                             **shape)).to(torch.bfloat16).eval()
    draft.model.embed_tokens.weight = target.model.embed_tokens.weight
    draft.lm_head.weight = target.lm_head.weight
    for model in (target, draft, feature):
        model.config._attn_implementation = "sdpa"
    return target, draft, feature


def timed(fn) -> tuple[float, object]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start, out


def check_speed(results: dict, new_tokens: int) -> None:
    from hf_specdec import speculative_generate

    target, draft, feature = big_models()
    for batch in (1, 8):
        prompt = torch.randint(3, 32000, (batch, 128), device=DEVICE)
        common = dict(max_new_tokens=new_tokens, pad_token_id=0, do_sample=False)
        rows = {}
        seconds, _ = timed(lambda: target.generate(prompt, **common))  # warm-up
        seconds, _ = timed(lambda: target.generate(prompt, **common))
        rows["plain generate"] = batch * new_tokens / seconds
        if batch == 1:  # HF assisted generation is batch-1 only
            seconds, _ = timed(lambda: target.generate(prompt, assistant_model=draft, **common))
            rows["HF assisted"] = new_tokens / seconds
        for name, model in (("standalone", draft), ("feature", feature)):
            for method in ("sd:l=4", "rsd-s:w=4,d=4"):
                speculative = dict(custom_generate=speculative_generate, draft_model=model, speculative_config=method,
                                   return_dict_in_generate=True)
                timed(lambda: target.generate(prompt, **common, **speculative))
                seconds, out = timed(lambda: target.generate(prompt, **common, **speculative))
                rows[f"{method} ({name} draft)"] = batch * new_tokens / seconds
                log(results, f"step split batch {batch} {method} ({name} draft)", out.speculative_stats.summary())
        plain = rows["plain generate"]
        log(results, f"tokens/s batch {batch} (ratio to plain)", {k: f"{v:.1f} ({v / plain:.2f}x)" for k, v in rows.items()})


def verdict(results: dict) -> int:
    """Exit status: 1 (and the failed checks listed) when any check failed, else 0."""
    failures = results.get("failures", [])
    print(f"FAILED: {'; '.join(failures)}" if failures else "all checks passed", flush=True)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer cases and tokens (about 3 minutes)")
    parser.add_argument("--out", type=Path, default=Path("runs/gpu"))
    parser.add_argument("--dry-run", action="store_true", help="run checks 1-3 on the CPU (the script's own test)")
    args = parser.parse_args(argv)
    if args.dry_run:
        global DEVICE
        DEVICE = "cpu"
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton kernel through its interpreter
        results = {}
        check_verifiers(results, cases=3)
        check_greedy_identity(results)
        check_chi_square(results, samples=1024)
        return verdict(results)
    if not torch.cuda.is_available():
        print("no CUDA GPU here: nothing to check (this script is for a machine with one)")
        return 0
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    print(results, flush=True)
    check_verifiers(results, cases=20 if args.quick else 100)
    check_greedy_identity(results)
    check_chi_square(results, samples=4096 if args.quick else 16384)
    check_host_syncs(results)
    check_speed(results, new_tokens=32 if args.quick else 128)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    return verdict(results)


if __name__ == "__main__":
    sys.exit(main())

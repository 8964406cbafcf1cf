"""`hf-specdec simulate`: predicted speedup of tree speculative decoding by batch size and tree size."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_CANDIDATES = "1,16,32,48,64,80,96,112"
DEFAULT_DEVICE = "cpu"  # of --measure; --device defaults to None so that one given without --measure is refused

EXAMPLES = """\
examples:
  # the Medusa appendix G.3 setting (the seed charts): Llama-7B on an A100, sequence length 1024
  hf-specdec simulate --model llama-7b --hardware a100-80gb --seq-len 1024 --operators medusa-g3 \\
      --acceptance medusa --batch 1,2,4,8,16,32,64 --out runs/g3

  # this CPU: time SmolLM2-135M forwards, fit the model, then rank tree shapes with measured acceptance
  hf-specdec simulate --model smollm2-135m --measure --draft DRAFT_DIR --configs default \\
      --acceptance bench.json --seq-len 256 --batch 1,4,16
"""


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "simulate",
        help="predict the speedup of tree shapes by batch size on a GPU profile or this machine",
        description="Predict the speedup of tree speculative decoding from a per-operator latency model "
                    "(roofline of a GPU profile, or calibrated on this machine with --measure) and an "
                    "acceptance model. speedup = acceptance rate / (step latency / plain decoding latency).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="llama-7b",
                        help="target: a preset (llama-7b, smollm2-135m), a Hugging Face model id, a model "
                             "directory or a config.json (default: llama-7b)")
    parser.add_argument("--hardware",
                        help="a100-80gb, h100-sxm, h200, cpu (this machine's calibration for --model; see "
                             "--measure) or a JSON spec file with the fields of hf_specdec.planner.Hardware "
                             "(default: a100-80gb, or this machine with --measure)")
    parser.add_argument("--seq-len", type=int, default=1024, help="context length: tokens in the KV cache (default: 1024)")
    parser.add_argument("--batch", type=_int_list, default=[1], help="batch sizes, e.g. 1,2,4 (default: 1)")
    shapes = parser.add_mutually_exclusive_group()
    shapes.add_argument("--candidates", type=_int_list, default=_int_list(DEFAULT_CANDIDATES),
                        help=f"tokens the target scores per step (default: {DEFAULT_CANDIDATES})")
    shapes.add_argument("--configs",
                        help="tree shapes instead of candidate counts: 'default' (the family auto chooses "
                             "from) or speculative_config strings separated by ';', e.g. 'sd:l=4;rsd-s:w=2,d=3'")
    parser.add_argument("--acceptance", default="medusa",
                        help="'medusa' (acc_rate = 1 + 0.477 ln candidates) or a `hf-specdec bench --json` file "
                             "to fit the pair's per-depth acceptance to (default: medusa)")
    parser.add_argument("--temperature", type=float,
                        help="with an acceptance file (not medusa): use only its measurements at this temperature")
    parser.add_argument("--operators", choices=("full", "medusa-g3"), default="full",
                        help="full: every operator, each sequence reads its own KV cache; medusa-g3: the "
                             "appendix G.3 accounting of the seed charts (default: full)")
    parser.add_argument("--draft", help="draft model (same forms as --model) whose passes are added to each step")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"),
                        help="weights and activations dtype (default: the hardware profile's)")
    parser.add_argument("--measure", action="store_true",
                        help="time forwards of randomly initialised --model (and --draft) on --device, fit the "
                             "latency model, cache it, and simulate with it (a couple of minutes for SmolLM2-135M)")
    parser.add_argument("--device", help=f"device for --measure (default: {DEFAULT_DEVICE})")
    parser.add_argument("--validate", action="store_true",
                        help="with --measure: afterwards, time the target again at every --batch x --candidates "
                             "(at --seq-len) and print measured vs predicted latency")
    parser.add_argument("--json", metavar="FILE", help="write one JSON object per (batch, candidates) to FILE")
    parser.add_argument("--out", metavar="DIR", help="write CSV tables and PNG charts to DIR")


def run(args) -> int:
    try:
        return _simulate(args)
    except ValueError as err:
        print(f"hf-specdec simulate: error: {err}", file=sys.stderr)
        return 2


def _check_options(args) -> None:
    """Refuse the options this run would ignore."""
    if args.acceptance == "medusa" and args.temperature is not None:
        raise ValueError("--temperature picks the measurements of an acceptance file, and --acceptance medusa has "
                         "none: drop --temperature, or give --acceptance a `hf-specdec bench --json` file")
    unused = [flag for flag, given in (("--validate", args.validate), ("--device", args.device is not None)) if given]
    if unused and not args.measure:
        listed = " and ".join(unused)
        raise ValueError(f"only --measure reads {listed}: add --measure, or leave out {listed}")


def _latency_model(spec: str, args, role: str):
    from hf_specdec.planner import OPERATOR_SETS, LatencyModel, load_hardware, load_shape

    shape = load_shape(spec)
    if args.measure:
        if args.hardware not in (None, "cpu"):
            raise ValueError(f"--measure times this machine; drop --hardware {args.hardware} or --measure")
        device = DEFAULT_DEVICE if args.device is None else args.device
        hardware = _measure(shape, args.dtype or "float32", device, args if role == "target" else None)
    elif args.hardware == "cpu":
        hardware = _cpu_calibration(shape, args.dtype or "float32", role)
    else:
        hardware = load_hardware(args.hardware or "a100-80gb")
    return LatencyModel(shape, hardware, args.dtype or hardware.dtype, OPERATOR_SETS[args.operators])


def _measure(shape, dtype: str, device: str, validation_args=None):
    """Calibrate on this machine; with `validation_args.validate`, re-time the simulated points afterwards."""
    from hf_specdec.planner import FULL, LatencyModel
    from hf_specdec.planner.calibration import MEASURE_GRID, Sample, calibrate, random_model, time_forward

    print(f"measuring {shape.name} ({dtype}) on {device}", file=sys.stderr)
    model = random_model(shape, dtype, device)
    calibration = calibrate(model, shape, MEASURE_GRID)
    print(f"calibration saved to {calibration.path()}\nfit:", file=sys.stderr)
    print(_errors_table(calibration.errors()), file=sys.stderr)
    if validation_args is not None and validation_args.validate:
        latency = LatencyModel(shape, calibration.hardware, dtype, FULL)
        checks = [(Sample(b, n, validation_args.seq_len, time_forward(model, b, n, validation_args.seq_len, repeats=5)),
                   latency.seconds(b, n, validation_args.seq_len))
                  for b in validation_args.batch for n in validation_args.candidates]
        print("validation (timed after the fit):", file=sys.stderr)
        print(_errors_table(checks), file=sys.stderr)
    return calibration.hardware


def _errors_table(pairs) -> str:
    return _table(["batch", "tokens", "context", "measured ms", "predicted ms", "error %"],
                  [[s.batch, s.new_tokens, s.context, f"{1e3 * s.seconds:.1f}", f"{1e3 * p:.1f}",
                    f"{100 * (p - s.seconds) / s.seconds:+.1f}"] for s, p in pairs])


def _cpu_calibration(shape, dtype: str, role: str):
    from hf_specdec.planner.calibration import device_name, load_calibration
    from hf_specdec.planner.hardware import BUILTIN

    calibration = load_calibration(device_name("cpu"), shape, dtype)
    if calibration is None:
        print(f"warning: no calibration of the {role} {shape.name} ({dtype}) on this CPU; using a rough placeholder. "
              f"Run with --measure to calibrate.", file=sys.stderr)
        return BUILTIN["cpu"]
    return calibration.hardware


def _simulate(args) -> int:
    from hf_specdec.config import SpeculativeConfig
    from hf_specdec.planner.acceptance import load_acceptance
    from hf_specdec.planner.planning import estimate_candidates, estimate_config
    from hf_specdec.planner.trees import default_candidates

    _check_options(args)
    target = _latency_model(args.model, args, "target")
    draft = _latency_model(args.draft, args, "draft") if args.draft else None
    acceptance = load_acceptance(args.acceptance, args.temperature)
    if args.configs:
        configs = (default_candidates() if args.configs.strip() == "default"
                   else [SpeculativeConfig.parse(c) for c in args.configs.split(";") if c.strip()])
        estimates = [estimate_config(target, b, args.seq_len, c, acceptance, draft)
                     for b in args.batch for c in configs if c.is_speculative]
    else:
        estimates = [estimate_candidates(target, b, args.seq_len, n, acceptance, draft)
                     for b in args.batch for n in args.candidates]

    print(f"# {target.shape.name} on {target.hardware.name} ({target.dtype}), sequence length {args.seq_len}, "
          f"operators {target.operators.name}, acceptance: {acceptance.description}"
          + (f", draft {draft.shape.name}" if draft else ""))
    print(_table(["batch", "candidates", "config", "acc rate", "norm. latency", "speedup", "latency ms"],
                 [[e.batch, e.candidates, e.config or "-", f"{e.block_efficiency:.2f}",
                   f"{e.normalized_latency:.3f}", f"{e.speedup:.2f}", f"{1e3 * e.seconds:.2f}"] for e in estimates]))
    best = _best_by_batch(estimates)
    print("\n# best per batch size")
    print(_table(["batch", "candidates", "config", "speedup"],
                 [[b, e.candidates, e.config or "-", f"{e.speedup:.2f}"] for b, e in best.items()]))
    if args.json:
        Path(args.json).write_text(json.dumps([e.to_json() for e in estimates], indent=1))
    if args.out:
        _write_outputs(Path(args.out), estimates, best, target, args.seq_len)
    return 0


def _best_by_batch(estimates) -> dict:
    best = {}
    for e in estimates:
        if e.batch not in best or e.speedup > best[e.batch].speedup:
            best[e.batch] = e
    return best


def _best_by_candidates(estimates) -> list:
    """One estimate per candidate count (the fastest shape of that size), in order: what the charts show."""
    best = {}
    for e in estimates:
        if e.candidates not in best or e.speedup > best[e.candidates].speedup:
            best[e.candidates] = e
    return [best[n] for n in sorted(best)]


def _write_outputs(out: Path, estimates, best, target, seq_len: int) -> None:
    import csv

    from hf_specdec.planner.plots import plot_best_by_batch, plot_latency_breakdown, plot_speedup_by_batch

    out.mkdir(parents=True, exist_ok=True)
    rows = [e.to_json() for e in estimates]
    groups = sorted({g for row in rows for g in row["latency_by_group"]})
    with (out / "simulate.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["batch", "candidates", "config", "acc_rate", "normalized_latency", "speedup", "latency_ms",
                         "baseline_ms"] + [f"latency_{g}" for g in groups])
        for row in rows:
            writer.writerow([row[k] for k in ("batch", "candidates", "config", "acc_rate", "normalized_latency",
                                              "speedup", "latency_ms", "baseline_ms")]
                            + [row["latency_by_group"].get(g, 0.0) for g in groups])
    with (out / "best.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["batch", "candidates", "config", "acc_rate", "speedup"])
        for batch, e in best.items():
            writer.writerow([batch, e.candidates, e.config, e.block_efficiency, e.speedup])
    by_batch = {b: _best_by_candidates([e for e in estimates if e.batch == b]) for b in best}
    name = target.shape.name
    for batch, series in by_batch.items():
        plot_latency_breakdown(series, f"{name}, Batch Size: {batch}, Sequence Length: {seq_len}",
                               out / f"latency_bs{batch}.png")
    plot_speedup_by_batch(by_batch, f"{name}, Sequence Length: {seq_len}", out / "speedup_by_batch.png")
    plot_best_by_batch(best, f"{name}: best tree size by batch size (sequence length {seq_len})",
                       out / "best_by_batch.png")
    print(f"wrote {out}/simulate.csv, best.csv and PNG charts", file=sys.stderr)


def _table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells)

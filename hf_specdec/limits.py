"""What a speculative step needs in memory, checked before the first forward: a tree that cannot fit is refused with
the size that would, instead of exhausting the machine mid-generation."""

from __future__ import annotations

import math
import os

import torch

from hf_specdec.config import SpeculativeConfig

# refuse a step whose working set exceeds this share of the memory available when the call starts
MEMORY_SHARE = 0.5


def step_bytes(config: SpeculativeConfig, batch: int, vocab_size: int, sequence_width: int, do_sample: bool,
               nodes: int | None = None) -> int:
    """Working memory of one step (the loop's own tensors; the models' activations come on top): per row, the
    ancestor matrix and path tables of the tree, [nodes, vocab] logits / scores / probabilities (and q when sampling)
    and the [nodes, cache + nodes] attention masks (bool and the model's additive float)."""
    n = (config.tree_size if nodes is None else nodes) + 1
    depth = max(config.depth, 1)
    paths = min(n, {"sd": 1, "spectr": config.num_sequences, "rsd-c": math.prod(config.branching)}.get(config.method, n))
    per_row = (
        2 * n * n  # ancestors and their per-level copies
        + paths * depth * n  # the path table's one-hot search
        + 8 * n * depth  # path tokens
        + 4 * n * vocab_size * (4 if do_sample else 2)
        + 7 * n * (sequence_width + n)
    )
    return batch * per_row


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_step_fits(config: SpeculativeConfig, batch: int, vocab_size: int, sequence_width: int, do_sample: bool,
                    device: torch.device) -> None:
    if not config.is_speculative:
        return
    budget = MEMORY_SHARE * available_bytes(device)
    needed = step_bytes(config, batch, vocab_size, sequence_width, do_sample)
    if needed <= budget:
        return
    fitting = config.tree_size
    while fitting > 1 and step_bytes(config, batch, vocab_size, sequence_width, do_sample, nodes=fitting) > budget:
        fitting //= 2
    raise ValueError(
        f"speculative_config={str(config)!r} drafts {config.tree_size} nodes per row; at batch {batch} with a "
        f"{vocab_size}-token vocabulary a step needs about {needed / 2**30:.1f} GiB of working memory, more than "
        f"{MEMORY_SHARE:.0%} of the {budget / MEMORY_SHARE / 2**30:.1f} GiB available on {device}: choose a tree of at "
        f"most ~{fitting} nodes (e.g. 'rsd-s:w=4,d=5' has 20), or a smaller batch"
    )

"""The chi-square test the exactness tests share."""

from __future__ import annotations

import torch
from scipy.stats import chi2


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs.flatten() * counts.sum()
    if (counts[expected == 0] > 0).any():
        return 0.0  # a sequence the target can never produce
    large = expected >= 5
    observed = torch.cat([counts[large], counts[~large].sum()[None]])
    expected = torch.cat([expected[large], expected[~large].sum()[None]])
    keep = expected > 0
    statistic = float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    return float(chi2.sf(statistic, df=int(keep.sum()) - 1))

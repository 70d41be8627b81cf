"""Thresholds with a guarantee: the accuracy lost to early exit stays within a bound on new data, with high probability.

Jazbec et al. (2024, "Fast yet Safe: Early-Exiting with Risk Control") calibrate early-exit
thresholds with Learn-then-Test (Angelopoulos et al. 2021): each candidate threshold is a
hypothesis "its risk exceeds eps", tested on the calibration samples with a p-value from a
concentration bound; testing the candidates in a fixed order, from the most conservative, and
stopping at the first that is not rejected controls the family-wise error at `delta`. Every
threshold accepted has risk <= eps with probability at least 1 - delta over the calibration draw.

The risk here is bounded in [0, 1] as the bound needs: a sample costs 1 when early exit gets it
wrong and the final exit gets it right. Its mean bounds the accuracy drop against the final exit
from above (samples early exit gets right and the final exit wrong only help), so the guarantee
holds for the drop too. The candidates are single thresholds shared by every early exit (the rule
Jazbec et al. and SDN use), from "nobody leaves" down through the quantiles of the confidences.
"""
from __future__ import annotations

import math

import torch

__all__ = ["hoeffding_bentkus_p", "risk_controlled_thresholds"]


def _binomial_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    log_terms = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p) + (n - i) * math.log1p(-p)
        for i in range(k + 1)
    ]
    top = max(log_terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in log_terms))


def hoeffding_bentkus_p(risk: float, n: int, eps: float) -> float:
    """The Hoeffding-Bentkus p-value of "the mean of a [0, 1] loss exceeds eps" after `n` samples of mean `risk` (Bates et al. 2021)."""
    if risk >= eps:
        return 1.0
    if eps >= 1:
        return 0.0
    a = risk
    kl = (a * math.log(a / eps) if a > 0 else 0.0) + (1 - a) * math.log((1 - a) / (1 - eps))
    hoeffding = math.exp(-n * kl)
    bentkus = math.e * _binomial_cdf(math.ceil(n * risk), n, eps)
    return min(hoeffding, bentkus)


def risk_controlled_thresholds(conf: torch.Tensor, preds: torch.Tensor, labels: torch.Tensor, eps: float, delta: float) -> list[float]:
    """The lowest shared threshold Learn-then-Test accepts at level `delta` for risk `eps` (``inf``: nobody leaves early, when none is).

    `conf` and `preds` are ``(E, N)`` on the confidence scale; only labeled samples (labels >= 0) count.
    """
    labeled = labels >= 0
    conf, preds, labels = conf[:, labeled], preds[:, labeled], labels[labeled]
    num_exits, n = conf.shape
    final_right = preds[-1] == labels
    candidates = torch.quantile(
        conf[:-1].flatten().double(), torch.linspace(1, 0, 201, dtype=torch.float64)
    ).unique(sorted=True).flip(0).tolist()
    accepted = math.inf
    for t in candidates:  # most conservative first: fixed-sequence testing
        passed = torch.cat([conf[:-1] >= t, torch.ones(1, n, dtype=torch.bool)])
        chosen = passed.float().argmax(0)
        early_wrong = preds[chosen, torch.arange(n)] != labels
        risk = float((early_wrong & final_right).double().mean())
        if hoeffding_bentkus_p(risk, n, eps) > delta:
            break
        accepted = t
    return [accepted] * (num_exits - 1)

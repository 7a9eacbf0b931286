"""Chi-square survival function without scipy (no extra installs it): P(X >= x) for X ~ chi2(df).

The regularized upper incomplete gamma Q(df/2, x/2): a series below a + 1, Lentz's continued
fraction above (Numerical Recipes, gammq).
"""
from __future__ import annotations

import math


def chi2_sf(x: float, df: int) -> float:
    a, x = df / 2.0, x / 2.0
    if x <= 0:
        return 1.0
    log_pref = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1:                                   # P(a, x) by its series; Q = 1 - P
        term = total = 1.0 / a
        n = a
        while abs(term) > abs(total) * 1e-16:
            n += 1
            term *= x / n
            total += term
        return max(0.0, 1.0 - total * math.exp(log_pref))
    tiny = 1e-300
    b = x + 1 - a
    c, d = 1 / tiny, 1 / b
    h = d
    for i in range(1, 100000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        h *= d * c
        if abs(d * c - 1) < 1e-16:
            break
    return math.exp(log_pref) * h


def chisquare_pvalue(observed, expected) -> float:
    """p-value of Pearson's chi-square test (scipy.stats.chisquare(obs, exp).pvalue)."""
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    return chi2_sf(stat, len(expected) - 1)

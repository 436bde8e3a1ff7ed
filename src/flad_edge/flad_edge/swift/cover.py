"""The cover table: which vehicle subsets can still hold the rest of the model (exact feasibility).

Shared by the planners (greedy's repair, SWIFT) and the DQN (its action mask), so its own module: `planners`
builds on `dqn` (it loads or trains the policy), and `dqn` must not import `planners` back.
"""

from __future__ import annotations

import numpy as np

from flad_edge.swift.cost import CostModel


def cover_table(cm: CostModel) -> np.ndarray:
    """cover[R][e]: can the vehicles in bitmask R, in some order, cover layers [e, L) with non-empty ranges?

    Exact, computed backwards over subsets: some v in R takes [e, b) with b up to its memory reach (capped so
    the others keep a layer each) and R minus v covers [b, L). Prefix counts make "some b in a window" O(1).
    Used by greedy's repair and as the DQN's action mask (so its plans are feasible whenever one exists).
    """
    n, L = cm.n, cm.L
    full = 1 << n
    cover = np.zeros((full, L + 1), dtype=bool)
    cover[0, L] = True
    e = np.arange(L + 1)
    popcount = np.array([bin(s).count("1") for s in range(full)])
    for R in sorted(range(1, full), key=lambda s: popcount[s]):
        k = popcount[R]
        acc = np.zeros(L + 1, dtype=bool)
        for v in range(n):
            if R >> v & 1:
                rest = cover[R ^ (1 << v)]
                cnt = np.concatenate([[0], np.cumsum(rest)])  # cnt[i] = number of coverable b < i
                hi = np.minimum(cm.max_end[v], L - (k - 1))
                acc |= (hi > e) & (cnt[np.maximum(hi, e) + 1] - cnt[e + 1] > 0)
        cover[R] = acc
    return cover

"""Exercise 2: what the root's Gumbel noise does, on a 16-armed bandit whose best arm the
policy ranks 13th. Run from the repository root: python docs/ex_noise.py"""

import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import exit as ex  # noqa: E402

A = 16
prior = -0.3 * np.arange(A)  # the policy prefers arm 0, then 1, ...
means = np.linspace(0.5, 0.1, A)
means[12] = 0.9  # but arm 12 is the best, and the policy ranks it low
expand = lambda requests: [(np.zeros(A), means[p[0]], 0.0, False) for _, p in requests]
for scale in (1.0, 0.0):
    tried, best = set(), 0
    for seed in range(200):
        gen = torch.Generator().manual_seed(seed)
        actions, _, visits = ex.gumbel_search(
            prior[None], np.zeros(1), expand, 8, gumbel_scale=scale, generator=gen
        )
        tried.add(tuple(np.flatnonzero(visits[0])))
        best += actions[0] == 12
    print(
        f"gumbel_scale {scale}: {len(tried)} different sets of arms tried in 200 searches, "
        f"the best arm chosen in {best / 200:.0%}"
    )

"""Exercise 1: sequential halving against equal visits on 16-armed bandits.
Run from the repository root: python docs/ex_halving.py"""

import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import exit as ex  # noqa: E402

A, trials, halving = 16, 300, ex.get_sequence_of_considered_visits
equal = lambda m, n: [i // m for i in range(n)]  # the exercise's replacement
for n in (32, 128):
    for name, schedule in (("halving", halving), ("equal visits", equal)):
        ex.get_sequence_of_considered_visits = schedule
        rng, best = np.random.default_rng(0), 0
        for t in range(trials):
            means = rng.uniform(0, 0.6, A)
            means[rng.integers(A)] = 0.8  # one best arm; each visit sees its mean + noise
            expand = lambda requests: [
                (np.zeros(A), means[p[0]] + rng.normal(0, 0.25), 0.0, False) for _, p in requests
            ]
            gen = torch.Generator().manual_seed(t)
            actions, _, _ = ex.gumbel_search(
                np.zeros((1, A)), np.zeros(1), expand, n, generator=gen
            )
            best += means[actions[0]] == 0.8
        print(f"{n} simulations, {name}: the best arm in {best / trials:.0%} of {trials} bandits")

"""Exercise 3: a tree 3 levels deep, 4 actions a level, where only the path 2, 1, 3 pays 1.
How often does the search's root pick the first step of that path? Run from the repository root:
python docs/ex_puct.py"""

import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import exit as ex  # noqa: E402

A, depth, goal = 4, 3, [2, 1, 3]


def expand(requests):
    out = []
    for _, path in requests:
        done = len(path) == depth
        out.append((np.zeros(A), 0.0, float(list(path) == goal), done))
    return out


for n in (16, 32, 64):
    found = 0
    for seed in range(100):
        gen = torch.Generator().manual_seed(seed)
        actions, _, _ = ex.gumbel_search(np.zeros((1, A)), np.zeros(1), expand, n, generator=gen)
        found += actions[0] == goal[0]
    print(f"{n} simulations: the root picks the way to the reward in {found}% of 100 searches")

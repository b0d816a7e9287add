"""Exercise 4: what the replay priority trains on. A buffer as it stands early in a run: of 64
stored programs, 8 solve their task, 16 pass one or two of its three hidden test pairs, and 40
pass none. Prints the share of a policy batch that each group gets under exit.priority.
Run from the repository root: python docs/ex_priority.py"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import exit as ex  # noqa: E402

groups = {"solved": [1.0] * 8, "partial": [1 / 3, 2 / 3] * 8, "none": [0.0] * 40}
buffer = ex.ReplayBuffer()
for name, rewards in groups.items():
    for reward in rewards:
        buffer.add(name, ex.priority(reward), iteration=0)
drawn = buffer.sample(100_000, torch.Generator().manual_seed(0))
print(", ".join(f"{name} {drawn.count(name) / len(drawn):.0%}" for name in groups))

"""
exit.py: a language model teaches itself to program, by expert iteration.

A ~3.5M-parameter Llama-style transformer starts from random weights and learns to write programs
for the tiny accumulator machine in lmc.py from input/output examples alone, with no human-written
code. Each iteration it SEARCHES for programs on a batch of tasks, guided by its own policy and
outcome predictions, puts every program it wrote into a replay buffer, and LEARNS from that buffer
by next-token prediction, with high-reward programs drawn more often. This file implements
"Towards self-improving language models for code generation" (../shared/seeds, sections 2-3,
appendix C) top to bottom:

    tokenization -> model -> policy and value -> sampling & filtering -> Gumbel MCTS ->
    replay buffers -> training step -> evaluation -> checkpoint -> main (the expert-iteration loop)

Run it:
    python exit.py --task add4                  # learns add-2..4 from scratch; see the note below
    python exit.py --task add4 --search mcts    # the same with Gumbel MCTS as the searcher
    python exit.py --eval_only --ckpt runs/add4/ckpt.pt --task add6   # try a saved agent elsewhere

How long: on a 2-core laptop CPU the first add4 iteration takes about 52-55 s, later ones 9-21 s
(search a median 2.7-3.4 s, training 8.3-9.1 s, evaluation and checkpoint about 1.7 s). Seeds 0,
1 and 2 reach 100% of held-out add4 at 478, 467 and 565 s (3.4e13-4.2e13 FLOPs; README,
"Measured"). On an H100 the code of commit 17934e8, before the best buffer, reached 100% on
seeds 0-2 in 68-108 s (6.8e13-1.2e14 FLOPs). Each iteration searches 16 tasks and trains the
outcome predictor on 8 trajectories a step (table 3 fixes neither). With --search mcts (256
simulations a decision) on a 2-core CPU about twice as fast (S&F's seed 0 there: 238 s), a
later iteration takes 8-29 s (median 12 s, about 2,800-3,000 simulations/s), and seeds 0, 1 and
2 reach 100% at 672, 544 and 518 s (6.2e13-8.3e13 FLOPs; README).

Where we depart from the paper, and why:
- Eq. 1 sums the log-probabilities of a code unit's bytes. We restrict each byte's distribution
  to the bytes that can continue some code unit (after "BR" only A, Z or P) and write every unit
  with a trailing space, so that ADD and ADDL are told apart. A trained model puts nearly all its
  mass on those bytes anyway, so the two agree; but at random init every byte has probability
  ~1/256, and the literal sum makes a digit 256^2 times likelier than HLT: the untrained agent
  never halts, and learns only to write digits (we measured it).
- The outcome slot "O:x" is read by the model as "O:?": the outcome is a training target only, so
  no later position can copy it (SPEC section 5). The position that reads "?" predicts it (not the
  one that reads ":", as plain next-token training would): "A:" also ends in ":", and an
  untrained model, which sees little but the current byte, learned from the outcome targets
  T and S to write STA at every step (we measured it). "?" appears nowhere else.
- An outcome digit d is valued at d/9 (exact for 3 or 9 examples, close for 4).
- Policy-buffer priority is the fraction of the task's pairs passed, the train pairs of the prompt
  and the hidden test pairs alike (the authors' follow-up work counts examples passed; the reward
  stored with a trajectory stays the test pairs' one, as in the paper), to the power 8
  (--priority_exponent), plus a small floor that prefers programs that run over programs that
  err; the outcome buffer is uniform. Counting the train pairs keeps out luck: three hidden pairs
  drawn with replacement are sometimes degenerate, a program that ignores its inputs (ADDL 1 HLT)
  passed them, and such rare "solutions" took the buffer at the start, so that seeds 1 and 5
  never solved add-2; with all six pairs both start (README). With the power 2 we used before,
  a constant program right on 1 of 3 pairs by chance (LDL 8 HLT) took the buffer in the same
  way. The power 32, where partial credit counts for nothing, left seed 1 on add-2 for 10
  minutes: partial credit is also the first rung from add-2 to add-3. Each distinct program
  enters the policy buffer once per task and iteration, a task's programs with the same reward
  share one priority, and all of a task's priorities are divided by how many of its rollouts
  earned its best reward (--rarity 1) while the agent climbs. Without the first two, the agent
  collapsed onto "HLT" (the shortest program with partial credit); without the sharing, the twenty
  ways to solve an add-2 task drowned the one way to solve an add-3 task; without the division, an
  add-2 solution the policy writes in half its samples weighed as much as an add-3 solution it found
  once, and the search never got past add-2 in 10 minutes. (Dividing each reward by its own count
  instead let a task's rare wrong programs outweigh its common right ones: held-out add4 stalled at
  20-40% while the search solved every training task. All measured; README, "Measured".) A task's
  full solutions split its part equally until the search first solves every task of a batch, and
  from the next iteration all of it goes to one: the shortest, then the one written most over the
  batch (--sharpen solved). Each half alone falls short: the equal split left one sample at
  temperature 0.8 mixing several right programs into a wrong one (never 100% held-out in seven
  H100 runs to 1.5e14 FLOPs); the sharp split from the start took seed 0 to 93% in 10 CPU minutes
  but left seeds 1 and 2 on add-2, because the padded add-2 solutions it drops (ADD 0 ADD 1 HLT,
  right because unused cells hold 0) are the rung to add-3. In turn, 8 of 9 H100 runs that
  switched reached 100% by 1.2e14 FLOPs (README, "Measured"). At the switch the rarity divisor
  goes too: a solution the policy now writes in most of its samples weighed a hundredth of one
  found once in the climb, so the buffer's oldest items kept the weight. Dropping it took seed 0
  from the switch to 100% in 9 iterations (5.8e13 FLOPs), where the same run with the divisor
  stood at 61-80% (README). And at the switch the policy buffer's priorities are cut a
  thousandfold (CLIMB_FADE), so that it teaches each task's one solution and little else: the
  climb's rival solutions (ADD 1 ADD 0 HLT, padded ones) and, before the shortest came first, the
  padded solutions a short task took from the batch (ADD 0 ADD 1 HLT, written on 2- and 3-input
  tasks alike) held 6-15% of the priority at the end of the demo runs, the policy loss stayed at
  0.02-0.05, and one sample in 12 on 4-input tasks was wrong, nearly always by a repeated operand
  (ADD 0 ADD 1 ADD 1 HLT, ADD 0 ADD 1 ADD 2 ADD 1 HLT). Trained from the same checkpoint with
  those priorities set to 0, the loss fell to 0.002-0.004 and 99% of samples were right within 32
  steps. Resumed at seed 1's switch with the shortest and the fade, the agent reached 100%
  held-out 7 iterations later; without them it never had in 16 (README, "Why sampling & filtering
  stops short of 100%").
- A quarter of each policy batch (--best_share) comes from a third buffer, the best buffer: each
  task's programs with its highest credit (if above 0), every task weighing the same, solved or
  not. The paper trains on the policy buffer alone. But there a solution outweighs a program
  right on 1 of 6 pairs a million-fold, so while the agent solves only add-2 tasks, the 3- and
  4-input prompts get almost no training, and it writes syntax errors for them: seeds 0 and 1
  stood on add-2 for 35 iterations or more. With the best buffer they left it at iterations 12
  and 18 (best_priorities; README). The --sharpen switch empties it, so that from then on it
  holds each task's one solution and none of the climb's rival programs.
- Each trajectory in a batch weighs the same in the loss (a mean over its own targets, then over
  trajectories), so the priority alone decides how much a program is trained on. With a plain
  mean over tokens, a rarely drawn 20-unit junk program outweighed the short programs that earn
  reward; this change took 10 CPU minutes of add4 from 0% to 22-28% held-out.
- The epsilon-greedy outcome sampler takes the policy's most likely unit, or with probability
  epsilon a uniformly random one. With MCTS's mask at every node (the default) both keep to the
  grammar: the paper fills this buffer with the states the search is likely to meet, and the
  trees meet no syntax error. Without it the predictor learned that a random unit often makes
  one and expected one where the trees could not reach it (seed 2's checkpoint valued the steps
  of ADD 0 ADD 1 HLT at -0.86 to -0.33, where HLT alone is worth 0), and add4 seed 0 wrote HLT
  for all of its 60 iterations; with it, seed 0 stood at 64% after 15 minutes (README).
- MCTS: the environment admits no syntax error (the paper adds a leaf "if admissible by the
  environment" and says no more), so the units that would make one are ruled out at every node:
  at each search's root through mctx's invalid_actions, and below it by expand, which gives
  them the float minimum as prior logits. mctx masks only the root and leaves the rest to the
  environment's logits (GUMBEL.md, section 5); the search core stays mctx's. With 256
  simulations it took add4 seeds 1 and 2 from 0% and 59% held-out after 15 minutes to 57% and
  66%, and seed 0 from 48% to 0% (gumbel_mcts; README). --mcts_mask syntax masks the root only,
  --mcts_mask none nothing.
- MCTS, once the search has solved a whole batch (--sharpen's switch): the root draws no
  Gumbel noise (gumbel_scale 0), so each state's unit is the search's deterministic pick, and
  among equally good units (ADD 0 or ADD 1 first) the policy's favourite rather than a draw from
  it: each kind of task teaches one solution, as S&F's consensus does. The paper keeps the noise
  throughout. With it, the search wrote a reordered or padded solution for half the 3-input
  tasks after the switch, and seed 0 of add4 never reached 100% in 15 minutes; without it,
  seeds 0-2 did (gumbel_mcts has the counts; README).
- Held-out evaluation is measurement, not part of the method: its FLOPs are not counted.
"""

import argparse
import collections
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import lmc
from lmc import CODE_UNITS, MAX_LENGTH, OUTCOMES

# ----------------------------------------------------------------------------------------------
# Knobs. Parsed only in main(), so that tests can import this file without side effects.

parser = argparse.ArgumentParser(description="Expert iteration for code generation on the LMC.")
arg = parser.add_argument
# task
arg("--task", default="add4", help="add2..add9, random, or a .jsonl task file")
arg("--num_tasks", type=int, default=16, help="training tasks searched per iteration")
arg("--num_heldout", type=int, default=100, help="held-out tasks evaluated (at most)")
arg("--heldout", metavar="FILE", help="held-out tasks (.jsonl); default: a fifth of a task file")
arg("--target", type=float, default=1.0, help="stop at this held-out solved fraction")
arg("--max_iters", type=int, default=200, help="stop after this many iterations")
arg("--max_flops", type=float, default=0, help="stop once this many FLOPs are spent (0: no limit)")
# model (paper 3.1)
arg("--dim", type=int, default=256, help="model width")
arg("--n_layers", type=int, default=4, help="transformer layers")
arg("--n_heads", type=int, default=4, help="attention heads")
# search
arg("--search", default="sf", choices=["sf", "mcts"], help="the searcher")
arg("--num_rollouts", type=int, default=128, help="S&F: samples per task")
arg("--gen_temperature", type=float, help="S&F temperature (1.2 add, 1.5 random)")
arg("--eval_temperature", type=float, help="held-out temperature (0.8 add, 1.0 random)")
arg("--eval_rollouts", type=int, default=1, help="held-out: best of K samples on train pairs")
arg("--epsilon", type=float, default=0.2, help="outcome sampler: chance of a random unit")
arg("--outcome_rollouts", type=int, default=4, help="outcome sampler: episodes per task")
arg("--num_simulations", type=int, default=256, help="MCTS: simulations per decision")
arg("--max_num_considered_actions", type=int, default=16, help="MCTS: m of Gumbel-top-m")
arg("--gumbel_scale", type=float, default=1.0, help="MCTS: scale of the root Gumbel noise")
arg("--c_visit", type=float, default=50.0, help="MCTS: sigma's visit offset")
arg("--c_scale", type=float, default=0.1, help="MCTS: sigma's value scale")
arg("--mcts_prior", default="policy", choices=["policy", "uniform"], help="MCTS prior logits")
arg("--mcts_value", default="model", choices=["model", "zero"], help="MCTS leaf values")
arg(
    "--mcts_mask",
    default="tree",
    choices=["tree", "syntax", "none"],
    help="MCTS: rule out the units that make a syntax error at each root (syntax), at every node"
    " (tree), or nowhere (none)",
)
# training
arg("--lr", type=float, help="AdamW learning rate (2e-4 add, 5e-5 random)")
arg("--batch_size", type=int, default=32, help="trajectories per policy batch")
arg("--outcome_batch_size", type=int, default=8, help="trajectories per outcome batch")
arg("--train_steps", type=int, default=8, help="gradient steps per iteration")
arg("--buffer_iters", type=int, default=16, help="replay keeps the last N iterations' programs")
arg("--replay", default="twolevel,tiebreak,allpairs", help="our replay rules, or 'paper'")
arg("--priority_temperature", type=float, default=0.1, help="priority exp(reward / T)")
# system
arg("--seed", type=int, default=0, help="one seed for the whole run")
arg("--device", default="auto", help="auto (cuda, mps, cpu), or a torch device")
arg("--out_dir", help="log and checkpoint folder (default runs/<task>)")
arg("--resume", action="store_true", help="continue the run saved in --out_dir")
arg("--eval_only", action="store_true", help="evaluate --ckpt on --task, then exit")
arg("--ckpt", help="checkpoint for --eval_only and --show")
arg("--show", action="store_true", help="print how --ckpt writes programs for 3 held-out tasks")
arg("--show_every", type=int, default=5, help="show a held-out program every N iterations")
# experiments (paper section 3): a baseline, snapshots, plots, the ladder
arg("--no_train", action="store_true", help="search only, no gradient steps: the baseline")
arg("--snapshot_every", type=int, default=0, help="keep the model every N iterations (0: off)")
arg("--plot", nargs="+", metavar="RUN_DIR", help="draw held-out solved against FLOPs for runs")
arg("--ladder", metavar="RUN_DIR", help="evaluate RUN_DIR's snapshots on --task at --budgets")
arg("--budgets", default="1,16,64,256", help="ladder: S&F samples or MCTS simulations per task")
arg("--out", help="picture for --plot/--ladder; the series also go to a .csv beside it")

# Appendix C, table 3: per task family (a task file uses the add settings)
FAMILY_DEFAULTS = {
    "add": dict(lr=2e-4, gen_temperature=1.2, eval_temperature=0.8),
    "random": dict(lr=5e-5, gen_temperature=1.5, eval_temperature=1.0),
}
HELDOUT_SEED = "heldout"  # training draws its tasks from f"train-{seed}": the streams never meet


class UserError(Exception):
    """Bad input from the user: main() prints it as one line and exits non-zero."""


# ----------------------------------------------------------------------------------------------
# Tokenization (paper 2.2): UTF-8 bytes, one token per byte.
# A trajectory reads  inputs=[[3, 5], [4, 8]]outputs=[8, 12]\nO:9 A:ADD O:9 A:0 O:9 A:HLT
# (each unit is followed by a space, which ends it: "ADD " is not the start of "ADDL")
# The model reads "O:?" at every outcome slot; the outcome digit or letter is only a target.

VOCAB_SIZE = 256
MASK = ord("?")
SUFFIX = b"O:? A:"  # what follows every code unit: an outcome slot, then the next action
UNIT_WIDTH = 5  # the longest code unit plus its trailing space, "ADDL "
SEGMENT = UNIT_WIDTH + len(SUFFIX)  # one step of the program string, right-aligned, padded
PAD = 0  # padding byte; padded positions are never attended to
MAX_POS = 1024  # positions the model can read: a prompt and a whole episode must fit
OUTCOME_IDS = torch.tensor([ord(o) for o in OUTCOMES])  # the 13 outcome bytes
OUTCOME_REWARDS = torch.tensor([lmc.outcome_reward(o) for o in OUTCOMES])


def prompt_bytes(task):
    """The prompt: the train pairs in the paper's form, then a newline."""
    return f"inputs={task.train_inputs}outputs={task.train_outputs}\n".encode()


def encode_trajectory(task, program, outcome):
    """Input bytes and two target rows for one trajectory.

    Returns (x, y_policy, y_outcome): x is what the model reads, y_policy targets the bytes of
    each code unit and its trailing space, y_outcome targets each outcome slot with the program's
    outcome; -1 elsewhere (the prompt carries no loss).
    """
    written, role = list(prompt_bytes(task)), ["prompt"] * len(prompt_bytes(task))
    for unit in program:
        parts = (
            (b"O:", "-"),
            (outcome.encode(), "outcome"),
            (b" A:", "-"),
            (unit.encode() + b" ", "policy"),
        )
        for part, r in parts:
            written += list(part)
            role += [r] * len(part)
    read = [MASK if r == "outcome" else b for b, r in zip(written, role)]
    # policy: position t reads byte t and predicts byte t + 1, the next byte of the code unit
    y_policy = [b if r == "policy" else -1 for b, r in zip(written[1:], role[1:])]
    # outcome: the position that reads the masked slot "?" predicts what the slot stands for
    y_outcome = [b if r == "outcome" else -1 for b, r in zip(written[:-1], role[:-1])]
    return read[:-1], y_policy, y_outcome


# ----------------------------------------------------------------------------------------------
# Model: llama2.c's Llama-2 decoder, trimmed (RMSNorm, rotary embeddings, SwiGLU, SDPA attention).


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def apply_rope(x, cos, sin):
    """Rotate channel pairs of x (B, H, T, hd) by position-dependent angles (B, 1, T, hd/2):
    (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos). That is the product of the complex numbers
    x1 + i x2 and cos + i sin, and torch computes it so, to the same bits, about 5x faster on a
    CPU than on the strided halves (which took a tenth of iteration 0's search). Apple's GPU
    (mps) lacks complex numbers in some torch versions, so it takes the halves."""
    if x.device.type == "mps":
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * torch.complex(cos, sin)).flatten(-2)


class Attention(nn.Module):
    def __init__(self, dim, n_heads):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x, cos, sin, mask, cache, layer):
        B, T, C = x.shape
        q, k, v = self.wqkv(x).split(C, dim=2)  # each (B, T, C)
        q, k, v = (t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # (B, H, T, hd)
        if cache is not None:  # the cached keys/values first, then this call's (KVCache.attend)
            k, v = cache.attend(layer, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.wo(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class FeedForward(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, dim, n_heads):
        super().__init__()
        self.attention_norm, self.ffn_norm = RMSNorm(dim), RMSNorm(dim)
        self.attention = Attention(dim, n_heads)
        self.feed_forward = FeedForward(dim, 3 * dim)

    def forward(self, x, cos, sin, mask, cache, layer):
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, layer)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    """Byte-level decoder. It counts the FLOPs of its own forward passes in `self.flops`."""

    def __init__(self, dim=256, n_layers=4, n_heads=4, max_pos=MAX_POS):
        super().__init__()
        self.dim, self.n_layers, self.n_heads = dim, n_layers, n_heads
        self.tok_embeddings = nn.Embedding(VOCAB_SIZE, dim)
        self.layers = nn.ModuleList(Block(dim, n_heads) for _ in range(n_layers))
        self.norm = RMSNorm(dim)
        self.output = nn.Linear(dim, VOCAB_SIZE, bias=False)
        head_dim = dim // n_heads
        freqs = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)
        angles = torch.outer(torch.arange(max_pos).float(), freqs)  # (max_pos, hd/2)
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # scaled init of residual projections (GPT-2)
            if name.endswith("wo.weight") or name.endswith("w2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layers))
        # matmul parameters: every weight but the embedding table, which is a lookup
        self.n_matmul = (
            sum(p.numel() for p in self.parameters()) - self.tok_embeddings.weight.numel()
        )
        self.flops = 0.0  # FLOPs of every forward pass so far
        self.tokens = 0  # tokens read so far (padding included)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, pos, mask=None, cache=None):
        """Logits (B, T, 256) for tokens idx (B, T) at positions pos (B, T).

        mask (B, T, Tc + T) says which keys each token sees (the Tc cached ones, then this call's);
        None means plain causal attention with no cache (training). With a cache, this call's keys
        and values are written after its `length` cached slots; the caller decides how many to keep.
        """
        B, T = idx.shape
        x = self.tok_embeddings(idx)  # (B, T, C)
        cos, sin = self.rope_cos[pos].unsqueeze(1), self.rope_sin[pos].unsqueeze(
            1
        )  # (B, 1, T, hd/2)
        if mask is not None:
            mask = mask.unsqueeze(1)  # (B, 1, T, Tk): the same for every head
        n_keys = T if cache is None else cache.length + T
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache, i)
        # FLOPs: 2 per matmul weight per token, plus QK^T and AV: 4 * dim per key per layer
        keys_per_query = (T + 1) / 2 if mask is None else n_keys
        self.flops += B * T * (2 * self.n_matmul + 4 * self.n_layers * self.dim * keys_per_query)
        self.tokens += B * T
        return self.output(self.norm(x))  # (B, T, V)


class KVCache:
    """Keys and values of the tokens read so far, for B rows (one row per rollout state or tree).

    Every row has the same number of slots (`length`); `visible` (B, slots) marks the slots that
    later tokens may attend to (padding is not), and `next_pos` (B,) each row's next position.
    """

    def __init__(self, model, batch, slots, device, capacity=0):
        # room for max(batch, capacity) rows, so that select() can add rows without reallocating
        shape = (max(batch, capacity), model.n_heads, slots, model.dim // model.n_heads)
        # empty, not zeros: a slot is always written before any token attends to it
        self.tensors = [torch.empty(shape, device=device) for _ in range(2 * model.n_layers)]
        self._use_rows(batch)
        self.visible = torch.zeros(batch, slots, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.length = 0

    def _use_rows(self, n_rows):
        """k[layer] and v[layer]: the first n_rows rows of the tensors (views, contiguous)."""
        n_layers = len(self.tensors) // 2
        self.k = [t[:n_rows] for t in self.tensors[:n_layers]]
        self.v = [t[:n_rows] for t in self.tensors[n_layers:]]

    def attend(self, layer, k, v):
        """Write this call's keys and values (B, H, T, hd) after the `length` cached slots and
        return all of them, for the call's tokens to attend over."""
        start, T = self.length, k.shape[2]
        self.k[layer][:, :, start : start + T] = k
        self.v[layer][:, :, start : start + T] = v
        return self.k[layer][:, :, : start + T], self.v[layer][:, :, : start + T]

    def select(self, rows):
        """Row k becomes a copy of row rows[k] (a list of indices, repeats allowed); rows past
        len(rows) are dropped.

        Only the rows that change are copied, each a whole contiguous block. Rollouts call this
        at every step and leave most states in their rows (see rollout), so a step copies a few
        rows where moving every row to a new place copied the whole cache (a quarter of the
        first iteration's search time, when a random policy keeps 512 states apart).
        """
        rows = [int(r) for r in rows]
        device = self.visible.device
        if len(rows) > self.tensors[0].shape[0]:  # more rows than we have room for: grow
            extra = (len(rows) - self.tensors[0].shape[0],) + self.tensors[0].shape[1:]
            self.tensors = [torch.cat([t, t.new_empty(extra)]) for t in self.tensors]
        moved = [k for k, r in enumerate(rows) if r != k]
        if moved:
            target = torch.tensor(moved, device=device)
            source = torch.tensor([rows[k] for k in moved], device=device)
            for t in self.tensors:  # read all sources before writing any target
                used = t[:, :, : self.length]  # the slots past it are written before read
                used.index_copy_(0, target, used.index_select(0, source))
        self._use_rows(len(rows))
        index = torch.tensor(rows, dtype=torch.long, device=device)
        self.visible = self.visible[index]
        self.next_pos = self.next_pos[index]
        return self


# ----------------------------------------------------------------------------------------------
# Policy and value (paper 2.2, eq. 1-2).
# The 21 code units, each followed by its space, form a byte trie. A code unit's log-probability
# is the sum of the log-probabilities of its bytes, each one restricted to the bytes that can
# continue some code unit at that point of the trie (after "BR" only A, Z or P). Only the nodes
# where the trie branches contribute: after "A:", "S", "LD", "BR", "ADD" and "SUB" ("ADD " or
# "ADDL"). We read the prefixes on the way to them (A, AD, ADD, S, ...) as extra tokens in the
# same forward pass: each attends to the context and to its own ancestors in the trie, at the
# position it would have in the string, and none is stored in the cache. One model call thus
# gives the policy and the value for a whole batch of states.


def _build_trie():
    """Trie tokens (the last byte of each prefix we read), their positions, which of them each
    one sees, which bytes may follow each branching node, and which terms sum to eq. 1."""
    units = [u.encode() + b" " for u in CODE_UNITS]
    children = {}  # prefix -> the set of bytes that can follow it
    for u in units:
        for i in range(len(u)):
            children.setdefault(u[:i], set()).add(u[i])
    branching = [p for p, c in children.items() if len(c) > 1]
    # the prefixes we must read: every non-empty prefix of a branching node
    prefixes = sorted(
        {b[:i] for b in branching for i in range(1, len(b) + 1)}, key=lambda p: (len(p), p)
    )
    nodes = [b""] + prefixes  # node 0 is the position right after "A:"
    node = {p: i for i, p in enumerate(nodes)}
    allowed = torch.zeros(len(nodes), VOCAB_SIZE, dtype=torch.bool)
    for p in nodes:
        for c in children.get(p, ()):
            allowed[node[p], c] = True
    # eq. 1: one (node, byte) term per branching point on the unit's way through the trie
    terms = [[(node[u[:i]], u[i]) for i in range(len(u)) if u[:i] in branching] for u in units]
    width = max(len(t) for t in terms)
    gather = torch.tensor(
        [[n * VOCAB_SIZE + b for n, b in t] + [0] * (width - len(t)) for t in terms]
    )
    keep = torch.tensor([[1.0] * len(t) + [0.0] * (width - len(t)) for t in terms])
    ids = torch.tensor([p[-1] for p in prefixes])
    depth = torch.tensor([len(p) for p in prefixes])
    sees = torch.tensor([[pi.startswith(pj) for pj in prefixes] for pi in prefixes])
    return ids, depth, sees, allowed, gather, keep


TRIE_IDS, TRIE_DEPTH, TRIE_SEES, TRIE_ALLOWED, TRIE_GATHER, TRIE_KEEP = _build_trie()
N_TRIE = len(TRIE_IDS)  # 10 prefix tokens: A AD ADD B BR L LD S SU SUB


def unit_logits(logits):
    """Eq. 1: u(a) for the 21 code units, from next-byte logits (B, 1 + N_TRIE, 256) after "A:"
    and after each trie prefix. Each node's distribution is restricted to the bytes that continue
    a code unit. The u(a) are log-probabilities (they sum to 1 in probability), and eq. 2 is
    softmax(u / temperature)."""
    allowed = TRIE_ALLOWED.to(logits.device)
    logp = logits.masked_fill(~allowed, float("-inf")).log_softmax(-1).masked_fill(~allowed, 0.0)
    flat = logp.flatten(1)  # (B, nodes * 256)
    return (flat[:, TRIE_GATHER.to(logits.device)] * TRIE_KEEP.to(logits.device)).sum(-1)  # (B, 21)


def outcome_value(logits):
    """Value of a state: the expected reward under the predicted outcome distribution.
    logits (B, 256) at an outcome slot; returns (values (B,), outcome probabilities (B, 13))."""
    probs = logits[:, OUTCOME_IDS.to(logits.device)].softmax(-1)  # restricted to T S R 0..9
    return probs @ OUTCOME_REWARDS.to(logits.device), probs


def _segment(unit):
    """Tokens and visibility of one program step: the unit and its space right-aligned in
    UNIT_WIDTH slots (padding first), then "O:? A:". unit "" is the first step (no unit yet);
    None is a fully padded step that lets paths of different depths share one batch."""
    body = b"" if not unit else unit.encode() + b" "
    ids = [PAD] * (UNIT_WIDTH - len(body)) + list(body) + list(SUFFIX)
    vis = [False] * (UNIT_WIDTH - len(body)) + [True] * (len(body) + len(SUFFIX))
    if unit is None:
        vis = [False] * SEGMENT
    return ids, vis


SEGMENTS = {u: _segment(u) for u in (None, "", *CODE_UNITS)}


@torch.no_grad()
def prefill(model, tasks, device, capacity=0):
    """A cache holding each task's prompt (right-aligned: padding first), one row per task, with
    room for `capacity` rows."""
    prompts = [prompt_bytes(t) for t in tasks]
    width = max(map(len, prompts))
    slots = width + SEGMENT * (MAX_LENGTH + 1) + N_TRIE  # room for a whole episode and a trie
    cache = KVCache(model, len(tasks), slots, device, capacity)
    ids = torch.tensor([[PAD] * (width - len(p)) + list(p) for p in prompts], device=device)
    vis = ids != PAD
    pos = (vis.long().cumsum(1) - 1).clamp(min=0)  # (B, T) positions of real bytes from 0
    eye = torch.eye(width, dtype=torch.bool, device=device)
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    mask = (causal & vis[:, None, :]) | eye  # (B, T, T); a pad sees only itself (no NaN rows)
    model(ids, pos, mask, cache)
    cache.visible[:, :width] = vis
    cache.next_pos = vis.sum(1)
    cache.length = width
    return cache


@torch.no_grad()
def extend(model, cache, paths, store):
    """Read one path of code units per cache row, and return the policy and value after it.

    paths: B tuples of units, all of one length d (None pads a shorter path at its front). The
    call reads d program steps, then the N_TRIE trie tokens. Returns (prior_logits (B, 21), eq. 1,
    values (B,), outcome probabilities (B, 13)). With store=True the d steps stay in the cache
    (the rollout moves on); otherwise the cache is left as it was (MCTS looks ahead).
    """
    device = cache.visible.device
    B, d = len(paths), len(paths[0])
    seg_ids = [[i for u in path for i in SEGMENTS[u][0]] for path in paths]
    seg_vis = [[v for u in path for v in SEGMENTS[u][1]] for path in paths]
    n_path = d * SEGMENT
    ids = torch.cat([torch.tensor(seg_ids, device=device), TRIE_IDS.to(device).expand(B, -1)], 1)
    vis_path = torch.tensor(seg_vis, device=device)  # (B, d * SEGMENT)
    # positions: visible path bytes count up from next_pos; a trie prefix of length k sits k
    # places after the final ':' of "A:"
    pos_path = cache.next_pos[:, None] + vis_path.long().cumsum(1) - 1
    last = pos_path[:, -1:]
    pos = torch.cat([pos_path, last + TRIE_DEPTH.to(device)], 1)  # (B, T)
    T = n_path + N_TRIE
    # attention: causal over visible path bytes; trie tokens see the path and their ancestors
    new = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    new[n_path:, n_path:] = TRIE_SEES.to(device)
    vis_new = torch.cat([vis_path, torch.ones(B, N_TRIE, dtype=torch.bool, device=device)], 1)
    new = (new & vis_new[:, None, :]) | torch.eye(T, dtype=torch.bool, device=device)
    old = cache.visible[:, None, : cache.length].expand(B, T, cache.length)
    logits = model(ids, pos, torch.cat([old, new], 2), cache)  # (B, T, V)
    trie_logits = logits[:, n_path - 1 :]  # (B, 1 + N_TRIE, V): after "A:", then each prefix
    values, outcome_probs = outcome_value(logits[:, n_path - 4])  # the "?" of the last "O:?"
    if store:
        cache.visible[:, cache.length : cache.length + n_path] = vis_path
        cache.next_pos = last[:, 0] + 1
        cache.length += n_path
    return unit_logits(trie_logits), values, outcome_probs


class TreeCache:
    """The keys and values of the program steps below the roots of MCTS's trees, a slot a node.

    A leaf of a search tree is its root's program plus a path of a few units. extend would read
    the whole path again for every leaf, and pad every tree without a new leaf into the call.
    Here a leaf reads only its own step and the trie: it attends to its root's row of the roots'
    KVCache (prompt and program so far) and to the keys and values its ancestors' steps left in
    their slots when they were leaves, and leaves its own step's in a new slot for its children.
    A call reads only the trees that asked for a leaf. (Measured in the README: the same trees,
    figure for figure, in a third of the time.)
    """

    def __init__(self, model, roots, capacity):
        self.roots = roots  # the KVCache of the roots: one row per tree
        self.n_layers = model.n_layers
        shape = (capacity + 1, model.n_heads, SEGMENT, model.dim // model.n_heads)
        self.pool = [
            torch.empty(shape, device=roots.visible.device) for _ in range(2 * model.n_layers)
        ]
        for t in self.pool:  # slot 0 pads the ancestors of shallow leaves: never visible, but
            t[0] = 0.0  # zeros, not garbage (a masked key weighs 0, and 0 * NaN is still NaN)
        self.clear()

    def clear(self):
        """Forget every node: a new search begins, below roots that have moved on."""
        self.nodes = {}  # (root row, path of units) -> (slot, next position after its step)
        self.used = 1  # slots taken, the padding slot 0 included

    def attend(self, layer, k, v):
        """The root's keys and values, then the ancestors' steps, then this call's (model
        forward calls this in each layer); this call's step goes to the new leaves' slots."""
        n, H, _, hd = k.shape
        keys, values = self.pool[layer], self.pool[self.n_layers + layer]
        keys[self.new_slots], values[self.new_slots] = k[:, :, :SEGMENT], v[:, :, :SEGMENT]
        length = self.roots.length
        out = []
        for root, pool, new in ((self.roots.k[layer], keys, k), (self.roots.v[layer], values, v)):
            ancestors = pool[self.slots].transpose(1, 2).reshape(n, H, self.depth * SEGMENT, hd)
            out.append(torch.cat([root[self.rows, :, :length], ancestors, new], 2))
        return out

    @torch.no_grad()
    def read(self, model, leaves):
        """(prior_logits (n, 21), eq. 1, values (n,)) at the leaves, as extend would give them.
        leaves: n pairs (root row, path of units), each path's parent (the path less its last
        unit) being its root or a leaf read before."""
        roots, device = self.roots, self.roots.visible.device
        n, depth = len(leaves), max(len(path) for _, path in leaves) - 1  # most ancestors
        if self.used + n > self.pool[0].shape[0]:  # out of slots: double the room
            self.pool = [torch.cat([t, torch.empty_like(t)]) for t in self.pool]
        root_pos = roots.next_pos.tolist()
        slots, seen, ids, vis, start = [], [], [], [], []
        for row, path in leaves:
            pad = depth - (len(path) - 1)  # missing ancestors, read as the padding slot
            slots.append([self.nodes[row, path[:i]][0] for i in range(1, len(path))] + [0] * pad)
            seen.append([v for u in path[:-1] for v in SEGMENTS[u][1]] + [False] * SEGMENT * pad)
            ids.append(SEGMENTS[path[-1]][0])
            vis.append(SEGMENTS[path[-1]][1])
            start.append(root_pos[row] if len(path) == 1 else self.nodes[row, path[:-1]][1])
        self.rows = torch.tensor([row for row, _ in leaves], device=device)
        self.slots = torch.tensor(slots, dtype=torch.long, device=device).view(n, depth)
        self.new_slots = torch.arange(self.used, self.used + n, device=device)
        self.depth = depth
        self.length = roots.length + depth * SEGMENT  # keys before this call's (model FLOPs)
        # this call: the leaf's step, then the trie, placed and masked as in extend
        vis_step = torch.tensor(vis, device=device)  # (n, SEGMENT)
        ids = torch.cat([torch.tensor(ids, device=device), TRIE_IDS.to(device).expand(n, -1)], 1)
        pos_step = torch.tensor(start, device=device)[:, None] + vis_step.long().cumsum(1) - 1
        last = pos_step[:, -1:]
        pos = torch.cat([pos_step, last + TRIE_DEPTH.to(device)], 1)
        T = SEGMENT + N_TRIE
        new = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        new[SEGMENT:, SEGMENT:] = TRIE_SEES.to(device)
        vis_new = torch.cat([vis_step, torch.ones(n, N_TRIE, dtype=torch.bool, device=device)], 1)
        new = (new & vis_new[:, None, :]) | torch.eye(T, dtype=torch.bool, device=device)
        old = torch.cat(
            [
                roots.visible[self.rows, : roots.length],
                torch.tensor(seen, dtype=torch.bool, device=device),
            ],
            1,
        ).view(n, 1, -1)
        logits = model(ids, pos, torch.cat([old.expand(n, T, -1), new], 2), self)
        for (row, path), slot, after in zip(
            leaves, range(self.used, self.used + n), last[:, 0].tolist()
        ):
            self.nodes[row, path] = (slot, after + 1)
        self.used += n
        values, _ = outcome_value(logits[:, SEGMENT - 4])  # the "?" of the leaf's "O:?"
        return unit_logits(logits[:, SEGMENT - 1 :]), values


OPERAND_UNITS = np.array([u in lmc.OPERANDS for u in CODE_UNITS])


def syntax_errors(program):
    """(21,) bool: the code units that would make a syntax error if written next after
    `program` (itself free of one): an operand where an opcode must stand, or an opcode (HLT
    too) where the last opcode still needs its operand."""
    i = 0
    while i < len(program):  # step over whole instructions: HLT alone, any other with operand
        i += 1 if program[i] == "HLT" else 2
    needs_operand = i > len(program)
    return ~OPERAND_UNITS if needs_operand else OPERAND_UNITS.copy()


def choose_units(prior_logits, temperature, epsilon, generator, invalid=None):
    """Pick one unit per row: sample softmax(logits / temperature), or the argmax when the
    temperature is 0; with probability epsilon a uniformly random unit instead. invalid (B, A)
    bool, if given, rules units out of both."""
    B, A = prior_logits.shape
    if invalid is not None:
        prior_logits = prior_logits.masked_fill(invalid, float("-inf"))
    if temperature > 0:
        probs = (prior_logits / temperature).softmax(-1)
        units = torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0]
    else:
        units = prior_logits.argmax(-1).cpu()
    if epsilon > 0:
        explore = torch.rand(B, generator=generator) < epsilon
        if invalid is None:
            uniform = torch.randint(A, (B,), generator=generator)
        else:  # uniform over each row's valid units
            uniform = torch.multinomial((~invalid).float().cpu(), 1, generator=generator)[:, 0]
        units = torch.where(explore, uniform, units)
    return units.tolist()


# ----------------------------------------------------------------------------------------------
# Sampling & filtering (paper 2.4.1)

ROWS_PER_CALL = 512  # rollouts (at most) advanced in one model call: bigger batches thrash memory


def done(program):
    """A program is finished at HLT or at MAX_LENGTH code units."""
    return bool(program) and (program[-1] == "HLT" or len(program) >= MAX_LENGTH)


@torch.no_grad()
def rollout(model, tasks, num_rollouts, temperature, epsilon, generator, grammar=False):
    """num_rollouts programs for each task, written one code unit at a time from the policy.
    With grammar=True no unit that would make a syntax error is written (syntax_errors).

    Rollouts of a task that have written the same units so far stand in the same state, where
    the policy is the same: we read each distinct state once (one cache row) and draw the next
    unit of each of its rollouts from that one distribution. A task's rollouts all start in one
    state, and a sharp policy keeps them in few. Each step is one batched model call over the
    states of all tasks, and each prompt is read once. A program ends at HLT or at MAX_LENGTH
    units. Returns the programs, task-major (task 0's rollouts first).
    """
    device = next(model.parameters()).device
    per_call = max(1, ROWS_PER_CALL // num_rollouts)  # at most ROWS_PER_CALL states at once
    programs = []
    for start in range(0, len(tasks), per_call):
        chunk = tasks[start : start + per_call]
        cache = prefill(model, chunk, device, capacity=len(chunk) * num_rollouts)
        states = [(t, ()) for t in range(len(chunk))]  # cache row k holds (task, units so far)
        crowd = [num_rollouts] * len(chunk)  # how many rollouts stand in each state
        finished = [[] for _ in chunk]
        while states:
            last = [(units[-1] if units else "",) for _, units in states]
            prior_logits, _, _ = extend(model, cache, last, store=True)
            # one draw for each rollout, from the policy of the state it stands in
            rows = torch.arange(len(states)).repeat_interleave(torch.tensor(crowd))
            invalid = None
            if grammar:
                errors = np.array([syntax_errors(list(units)) for _, units in states])
                invalid = torch.from_numpy(errors)[rows].to(device)
            logits = prior_logits[rows.to(device)]
            draws = choose_units(logits, temperature, epsilon, generator, invalid)
            moves = collections.Counter(zip(rows.tolist(), draws))  # (row, unit) -> rollouts
            # the next states, as (parent row, state, rollouts): a state's first unfinished
            # child keeps its parent's row; further children go to new rows after the last
            placed, branches = [None] * len(states), []
            for (row, a), n in sorted(moves.items()):
                t, units = states[row]
                units = units + (CODE_UNITS[a],)
                if done(units):
                    finished[t] += [list(units)] * n
                elif placed[row] is None:
                    placed[row] = (row, (t, units), n)
                else:
                    branches.append((row, (t, units), n))
            placed += branches
            # close the gaps left by finished states with the states from the end, so that a
            # step copies only the rows that move (KVCache.select)
            n_live = len(placed) - placed.count(None)
            from_end = iter(k for k in range(n_live, len(placed)) if placed[k] is not None)
            order = [k if placed[k] is not None else next(from_end) for k in range(n_live)]
            cache.select([placed[k][0] for k in order])
            states = [placed[k][1] for k in order]
            crowd = [placed[k][2] for k in order]
        programs += [p for task_programs in finished for p in task_programs]
    return programs


def filter_best(task, programs, tiebreak=True):
    """Filtering: of one task's programs, the one that scores best on the train pairs (the only
    pairs a searcher may see). Ties go to the first written, or with tiebreak to the shortest,
    then to the one written most often: the policy's own favourite among equal programs."""
    written = collections.Counter(map(tuple, programs))  # first-written order

    def key(p):
        reward = lmc.score(p, task.train_inputs, task.train_outputs)[1]
        return (reward, -len(p), written[p]) if tiebreak else (reward,)

    return list(max(written, key=key))  # max keeps the first of equal keys


def sample_and_filter(model, tasks, args, generator):
    """Searcher: sampling & filtering (paper 2.4.1).

    Samples args.num_rollouts programs per task at args.gen_temperature from the policy (eq. 2)
    and keeps, per task, the one that scores best on the train pairs (filter_best). Returns
    (answers, written): one program per task, and per task the list of all programs sampled.
    """
    samples = rollout(model, tasks, args.num_rollouts, args.gen_temperature, 0.0, generator)
    R = args.num_rollouts
    written = [samples[i * R : (i + 1) * R] for i in range(len(tasks))]
    return [filter_best(t, w) for t, w in zip(tasks, written)], written


# ----------------------------------------------------------------------------------------------
# Gumbel MCTS (paper 2.4.2; Danihelka et al. 2022), deciding as DeepMind's mctx does (see
# ../shared/GUMBEL.md). Conventions: one agent, no sign flips; rewards lie in [-2, 1] and are paid
# only on the edge into a finished program (HLT or MAX_LENGTH units), which is a terminal node:
# its edge has discount 0, so Q(s, a) = r there, and nothing is expanded below it. Elsewhere
# Q(s, a) = V(child), where V is the running mean of the child's raw value and every return
# backed up through it. The search core below knows nothing of language models: `expand` is
# whatever gives (prior logits, value, reward, terminal) for a path, so tests and exercises can
# run it on a hand-made tree.


def get_sequence_of_considered_visits(m, n):
    """Sequential halving's schedule at the root: for simulation i, the visit count an action
    must have to be eligible. Each phase gives every surviving action
    max(1, n // (ceil(log2 m) * survivors)) more visits, then half of them go (never below 2).
    EXERCISE: replace it by equal visits for all m actions, e.g. [i // m for i in range(n)]."""
    if m <= 1:
        return list(range(n))
    log2max = math.ceil(math.log2(m))
    sequence, visits, num_considered = [], [0] * m, m
    while len(sequence) < n:
        num_extra_visits = max(1, int(n / (log2max * num_considered)))
        for _ in range(num_extra_visits):
            sequence.extend(visits[:num_considered])
            for i in range(num_considered):
                visits[i] += 1
        num_considered = max(2, num_considered // 2)
    return sequence[:n]


def completed_qvalues(prior_logits, qvalues, visit_counts, raw_value):
    """Q-values with the unvisited actions completed by v_mix (Danihelka et al., appendix D):
    v_mix = (v + sum N * (sum over visited pi * q) / (sum over visited pi)) / (1 + sum N),
    where v is the node's raw network value and pi = softmax(prior_logits)."""
    pi = np.maximum(softmax(prior_logits), np.finfo(np.float32).tiny)
    visited = visit_counts > 0
    total = visit_counts.sum()
    if total > 0:
        weighted = (pi * qvalues)[visited].sum() / pi[visited].sum()
        v_mix = (raw_value + total * weighted) / (1 + total)
    else:
        v_mix = raw_value
    return np.where(visited, qvalues, v_mix)


def sigma(completed, visit_counts, c_visit, c_scale):
    """The monotone transform of completed Q: min-max rescale over this node's actions, then
    scale by (c_visit + max N) * c_scale. A node whose completed values are all equal gets 0."""
    low, high = completed.min(), completed.max()
    rescaled = (completed - low) / max(high - low, 1e-8)
    return (c_visit + visit_counts.max()) * c_scale * rescaled


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def root_scores(gumbel, prior_logits, sigma_q, visit_counts, considered_visit):
    """Root selection: g + logits + sigma(q) among the actions with exactly `considered_visit`
    visits (the survivors of sequential halving at this point). EXERCISE: set gumbel to 0 (no
    noise) and see the same actions tried at every decision."""
    score = np.maximum(-1e9, gumbel + prior_logits - prior_logits.max() + sigma_q)
    return np.where(visit_counts == considered_visit, score, -np.inf)


def interior_action(prior_logits, sigma_q, visit_counts):
    """Interior selection, paper eq. 3: the action whose improved-policy probability most
    exceeds its share of visits. EXERCISE: use PUCT instead and compare the visit counts."""
    improved = softmax(prior_logits + sigma_q)
    return int(np.argmax(improved - visit_counts / (1 + visit_counts.sum())))


class Node:
    """One state in a search tree: its network outputs and its children's statistics."""

    def __init__(self, prior_logits, raw_value, num_actions, terminal=False):
        self.prior_logits = np.asarray(prior_logits, dtype=np.float64)
        self.raw_value = float(raw_value)
        self.value = float(raw_value)  # running mean V, starting at the raw value
        self.visits = 1
        self.terminal = terminal
        self.children = [None] * num_actions  # child Node per action, once expanded
        self.rewards = np.zeros(num_actions)  # reward of the edge into each child
        self.child_visits = np.zeros(num_actions)  # N(s, a), kept up to date by record()
        self.child_q = np.zeros(num_actions)  # Q(s, a); 0 while unvisited

    def record(self, action):
        """Copy child `action`'s visits and value into N(s, a) and Q(s, a) = r + V(child)
        (r alone below a terminal edge, whose discount is 0)."""
        child = self.children[action]
        self.child_visits[action] = child.visits
        self.child_q[action] = self.rewards[action] + (0.0 if child.terminal else child.value)

    def child_stats(self):
        """(visit_counts, qvalues) over actions; an unexpanded action has 0 and 0."""
        return self.child_visits.copy(), self.child_q.copy()

    def sigma(self, c_visit, c_scale):
        N, Q = self.child_stats()
        return (
            sigma(completed_qvalues(self.prior_logits, Q, N, self.raw_value), N, c_visit, c_scale),
            N,
        )


def mask_invalid(logits, invalid):
    """mctx's masking: logits minus their max, and the float minimum for invalid actions (the
    last axis holds the actions)."""
    logits = logits - logits.max(-1, keepdims=True)
    return np.where(invalid, np.finfo(np.float64).min, logits)


def gumbel_search(
    prior_logits,
    root_values,
    expand,
    num_simulations,
    max_num_considered_actions=16,
    gumbel_scale=1.0,
    c_visit=50.0,
    c_scale=0.1,
    generator=None,
    invalid_actions=None,
):
    """Gumbel MuZero's search on B trees at once, as mctx's gumbel_muzero_policy decides.

    prior_logits (B, A) and root_values (B,) describe the B roots. expand(requests) takes a list
    of (tree index, path of action indices from that root) and returns, for each, (prior_logits
    (A,), value, reward, terminal) of the node the path reaches, reward being what its edge pays.
    Each simulation adds at most one node per tree, and all trees' new nodes go to one expand
    call. invalid_actions (B, A) bool, if given, masks actions at the roots only, as mctx does:
    their logits fall to the float minimum, they are never visited or chosen, and the halving
    schedule is that of min(m, valid actions). Returns actions (B,), action_weights (B, A) =
    softmax(logits + sigma(completed Q)) (the improved policy, no noise) and visit_counts (B, A)
    at the roots.
    """
    prior_logits = np.asarray(prior_logits, dtype=np.float64)
    B, A = prior_logits.shape
    valid = np.ones((B, A), dtype=bool)
    if invalid_actions is not None:
        valid = ~np.asarray(invalid_actions, dtype=bool)
        prior_logits = mask_invalid(prior_logits, ~valid)
    roots = [Node(prior_logits[b], float(root_values[b]), A) for b in range(B)]
    # Gumbel noise, drawn once per search: argmax of g + logits samples from the policy
    u = torch.rand(B, A, generator=generator, dtype=torch.float64).numpy()
    gumbel = gumbel_scale * -np.log(-np.log(np.clip(u, 1e-12, 1 - 1e-12)))
    schedules = {  # one per number of valid actions k: the schedule of min(m, k)
        k: get_sequence_of_considered_visits(min(max_num_considered_actions, k), num_simulations)
        for k in set(valid.sum(1).tolist())
    }
    schedule = [schedules[k] for k in valid.sum(1).tolist()]

    def root_choice(b, root, considered_visit):
        sigma_q, N = root.sigma(c_visit, c_scale)
        score = root_scores(gumbel[b], root.prior_logits, sigma_q, N, considered_visit)
        return int(np.argmax(np.where(valid[b], score, -np.inf))), sigma_q, N

    for sim in range(num_simulations):
        walks, requests = [], []
        for b, root in enumerate(roots):
            # root: Gumbel-top-m and sequential halving; below: eq. 3
            a = root_choice(b, root, schedule[b][sim])[0]
            path, nodes = [a], [root]
            while (
                nodes[-1].children[path[-1]] is not None
                and not nodes[-1].children[path[-1]].terminal
            ):
                node = nodes[-1].children[path[-1]]
                sigma_q, N = node.sigma(c_visit, c_scale)
                nodes.append(node)
                path.append(interior_action(node.prior_logits, sigma_q, N))
            walks.append((b, path, nodes))
            if nodes[-1].children[path[-1]] is None:
                requests.append((b, tuple(path)))
        results = dict(zip(requests, expand(requests))) if requests else {}
        for b, path, nodes in walks:
            parent, a = nodes[-1], path[-1]
            if (b, tuple(path)) in results:  # a new leaf
                logits, value, reward, terminal = results[(b, tuple(path))]
                parent.children[a] = Node(logits, 0.0 if terminal else value, A, terminal)
                parent.rewards[a] = reward
                G = parent.children[a].value
            else:  # a finished program reached again: it pays its reward once more
                parent.children[a].visits += 1
                G = 0.0
            # backup: the return seen from each node up the path; terminal edges discount to 0
            for node, action in zip(reversed(nodes), reversed(path)):
                child = node.children[action]
                G = node.rewards[action] + (0.0 if child.terminal else G)
                node.value = (node.value * node.visits + G) / (node.visits + 1)
                node.visits += 1
                node.record(action)  # the child below has its new visits and value already
    actions, weights, visits = np.zeros(B, dtype=np.int64), np.zeros((B, A)), np.zeros((B, A))
    for b, root in enumerate(roots):
        N = root.child_stats()[0]
        # the final action: the best score among the most-visited actions
        actions[b], sigma_q, N = root_choice(b, root, N.max())
        weights[b] = np.where(valid[b], softmax(root.prior_logits + sigma_q), 0.0)
        visits[b] = N
    return actions, weights, visits


@torch.no_grad()
def gumbel_mcts(model, tasks, args, generator, trace=None):
    """Searcher: Gumbel MCTS, run anew at every state of every episode (paper 2.4.2).

    One episode per task. At each state a fresh search of args.num_simulations simulations picks
    the next code unit, with the model's eq. 2 policy as prior logits and its outcome prediction
    as leaf values; a finished program is valued by its score on the train pairs. All tasks' trees
    advance in lockstep: each simulation makes one batched model call for the leaves of every
    tree, and each leaf reads one step: the root's prompt and program stay in the KV cache, and
    the steps below it in TreeCache.
    --mcts_prior uniform and --mcts_value zero switch off the policy or the value (figure 5).
    Returns (programs, written) like sample_and_filter, one program per task. With a list as
    `trace`, each decision appends {task index: (root visit counts, action weights)}.

    The environment admits no syntax error (the paper adds a leaf "if admissible by the
    environment"): each search's root rules out the units that would make one, through mctx's
    invalid_actions, and expand gives them the float minimum as prior logits at every node
    below, so that eq. 3 never picks one (mctx leaves interior nodes to the environment's
    logits). Every program written is well formed, and a tree below `ADD` tries an operand
    rather than spending its visits on `ADD HLT`. The loop's outcome sampler then keeps to the
    grammar too (rollout, grammar=True). --mcts_mask syntax masks the root only, --mcts_mask
    none nothing; neither restricts the sampler.

    Measured on add4 (README). Without any mask, 64 simulations: 32% held-out on seed 0, 0% on
    seeds 1 and 2. With random weights the first search wrote HLT alone or long programs that
    err; HLT runs, so the policy learned it, the outcome predictor learned that every other
    unit leads to an error, and the trees reached only "X HLT", syntax errors one unit below
    the root. The root mask took seeds 1 and 2 off HLT to the 2-input tasks (28-32%) and seed 0
    onto HLT (0%); none left the add-2 plateau, as after ADD 0 the prior puts about e^-6 on ADD
    and after ADD 0 ADD about e^-12 on operand 1. With 256 simulations the trees reach such
    unlikely operands now and then: root mask 48%, 0% (HLT) and 59% after 15 minutes (seeds
    0-2), the mask at every node 0%, 57% and 66%. Which seed falls into a trap moves with the
    mask, but the trap stays. In one search of 16 2-input tasks from seed 0's last checkpoint
    the trees reached `ADD 0 HLT` and none wrote it: the roots gave `ADD` 5 or 17 visits and
    dropped it, and below `ADD` the trees finished `ADD 9 HLT` or `ADD 6 HLT`, the operands
    the prior favours (the interior rule follows the prior until a value says otherwise), and
    the outcome predictor, trained on a sampler free to err, expected a syntax error the trees
    could not reach. With the sampler kept to the grammar as well (the default), all three
    seeds climb: 64%, 47% and 49% after 15 minutes (commit aac9687). With each leaf reading one
    step (TreeCache: one search from a late checkpoint took 6.4 s against 17.4 s before it) and
    no root noise after the switch, all three reach 100%, at 672, 544 and 518 s.
    """
    device = next(model.parameters()).device

    def ablate(prior, values):
        prior = torch.zeros_like(prior) if args.mcts_prior == "uniform" else prior
        values = torch.zeros_like(values) if args.mcts_value == "zero" else values
        return prior.cpu().numpy(), values.cpu().numpy()

    cache = prefill(model, tasks, device)
    prior, values = ablate(*extend(model, cache, [("",)] * len(tasks), store=True)[:2])
    tree = TreeCache(model, cache, len(tasks) * args.num_simulations)  # the steps below the roots
    programs = [[] for _ in tasks]
    active = list(range(len(tasks)))  # tasks whose program is unfinished, in cache-row order
    while active:
        tree.clear()  # a fresh search below the new roots

        def expand(requests):
            results, model_rows = [None] * len(requests), {}
            for k, (row, path) in enumerate(requests):
                program = programs[active[row]] + [CODE_UNITS[a] for a in path]
                if program[-1] == "HLT" or len(program) >= MAX_LENGTH:  # terminal: run it
                    task = tasks[active[row]]
                    reward = lmc.score(program, task.train_inputs, task.train_outputs)[1]
                    results[k] = (np.zeros(len(CODE_UNITS)), 0.0, reward, True)
                else:
                    model_rows[row] = (k, [CODE_UNITS[a] for a in path])
            if model_rows:  # one call for every tree's new leaf, reading one step each
                leaves = [(row, tuple(units)) for row, (_, units) in model_rows.items()]
                leaf_prior, leaf_values = ablate(*tree.read(model, leaves))
                for j, (row, (k, units)) in enumerate(model_rows.items()):
                    logits = leaf_prior[j]
                    if args.mcts_mask == "tree":  # the grammar below the root too
                        logits = mask_invalid(logits, syntax_errors(programs[active[row]] + units))
                    results[k] = (logits, float(leaf_values[j]), 0.0, False)
            return results

        # the environment admits no syntax error: the root rules those units out (mctx masks
        # invalid actions at the root only; with --mcts_mask tree, expand rules them out below)
        invalid = (
            np.array([syntax_errors(programs[r]) for r in active])
            if args.mcts_mask != "none"
            else None
        )
        actions, weights, visits = gumbel_search(
            prior,
            values,
            expand,
            args.num_simulations,
            args.max_num_considered_actions,
            args.gumbel_scale,
            args.c_visit,
            args.c_scale,
            generator,
            invalid,
        )
        if trace is not None:
            trace.append({r: (visits[i], weights[i]) for i, r in enumerate(active)})
        for row, a in zip(active, actions):
            programs[row].append(CODE_UNITS[a])
        keep = [
            i
            for i, r in enumerate(active)
            if programs[r][-1] != "HLT" and len(programs[r]) < MAX_LENGTH
        ]
        if not keep:
            break
        # move every unfinished root one step down the chosen unit (one batched call)
        cache.select(keep)
        active = [active[i] for i in keep]
        step = [(programs[r][-1],) for r in active]
        prior, values = ablate(*extend(model, cache, step, store=True)[:2])
    return programs, [[p] for p in programs]


SEARCHERS = {"sf": sample_and_filter, "mcts": gumbel_mcts}


# ----------------------------------------------------------------------------------------------
# Replay (paper 2.3): what the policy trains on.
# The policy buffer draws programs with probability proportional to a priority that grows with
# their reward (prioritized replay, Schaul et al. 2015), so the agent trains most on what the
# search solved: priority exp(reward / T), --priority_temperature T, so a solution is drawn
# e^(1/T) times as often as a wrong program that runs, and errors least of all. The outcome
# buffer holds the epsilon-greedy sampler's programs, drawn uniformly: the outcome predictor
# must see bad programs too. Both keep what the last --buffer_iters iterations stored, so the
# attempts of a weaker policy age out. --replay names which of our three rules to add to the
# paper's own, which stores each task's filtered program with priority reward + 0.01:
#   twolevel   store every distinct program the search wrote for a task, and give each task
#              (each iteration) the same weight, shared by its programs in proportion to their
#              priorities: solved or not, every task is trained on, and a task with twenty
#              solutions does not outweigh a task with one;
#   tiebreak   a task's solutions count as one, its shortest, then the one written most, so each
#              task teaches one solution, not a blend of rival ones;
#   allpairs   the reward behind the priority counts all the task's pairs, train and hidden
#              test, so a program that passes a few degenerate test pairs by luck is no solution.

REPLAY_RULES = ("twolevel", "tiebreak", "allpairs")


class ReplayBuffer:
    """Trajectories with priorities, sampled with probability proportional to priority. Each
    item remembers the iteration that stored it; age_out forgets the oldest iterations."""

    def __init__(self):
        self.items, self.priorities, self.iterations = [], [], []

    def __len__(self):
        return len(self.items)

    def add(self, item, priority, iteration):
        self.items.append(item)
        self.priorities.append(priority)
        self.iterations.append(iteration)

    def age_out(self, oldest):
        """Keep only what iteration `oldest` and later stored."""
        keep = [k for k, it in enumerate(self.iterations) if it >= oldest]
        self.items = [self.items[k] for k in keep]
        self.priorities = [self.priorities[k] for k in keep]
        self.iterations = [self.iterations[k] for k in keep]

    def sample(self, n, generator):
        if n == 0:
            return []
        weights = torch.tensor(self.priorities, dtype=torch.float64)
        picks = torch.multinomial(weights, n, replacement=True, generator=generator)
        return [self.items[i] for i in picks.tolist()]


def task_priorities(task, programs, counts, rules, temperature):
    """Policy-buffer priorities for the distinct programs stored for one task (see above).
    counts[k] is how often programs[k] was written."""
    inputs, outputs = task.test_inputs, task.test_outputs
    if "allpairs" in rules:
        inputs, outputs = task.train_inputs + inputs, task.train_outputs + outputs
    rewards = [lmc.score(p, inputs, outputs)[1] for p in programs]
    if not rules:  # the paper: priority is the reward, with a little for errors
        return [max(r, 0.0) + 0.01 for r in rewards]
    weights = [math.exp(r / temperature) for r in rewards]
    if "tiebreak" in rules and 1.0 in rewards:  # one solution keeps the weight of all of them
        solutions = [k for k, r in enumerate(rewards) if r == 1.0]
        chosen = max(solutions, key=lambda k: (-len(programs[k]), counts[k]))
        weights = [0.0 if k in solutions and k != chosen else w for k, w in enumerate(weights)]
        weights[chosen] = math.exp(1.0 / temperature) * len(solutions)
    if "twolevel" in rules:  # each task weighs 1 in all
        weights = [w / sum(weights) for w in weights]
    return weights


# ----------------------------------------------------------------------------------------------
# Training step: next-token loss on policy bytes (policy buffer) and outcome slots (outcome buffer)


PIECE = 16  # trajectories per forward pass in training (see make_batch)


def make_batch(trajectories, which, device):
    """Encoded trajectories as a list of (x, y) tensor pairs; y keeps only the `which` targets.

    The trajectories are sorted by length and cut into pieces of about PIECE, each padded to
    its own longest. On late add4 buffers the policy batch's 32 (prompt ~65 bytes, programs of
    1-20 units) are then 9-12% padding rather than 11-20% as one block, and a training step
    took 0.91 s rather than 1.05 s (README, "What we tried").
    """
    rows = [encode_trajectory(task, program, outcome) for task, program, outcome in trajectories]
    rows.sort(key=lambda r: len(r[0]))
    n_pieces = max(1, round(len(rows) / PIECE))
    pieces = []
    for k in range(n_pieces):
        piece = rows[k * len(rows) // n_pieces : (k + 1) * len(rows) // n_pieces]
        width = len(piece[-1][0])  # the longest, since the rows are sorted
        x = torch.full((len(piece), width), PAD, dtype=torch.long)
        y = torch.full((len(piece), width), -1, dtype=torch.long)
        for i, (ids, y_policy, y_outcome) in enumerate(piece):
            x[i, : len(ids)] = torch.tensor(ids)
            y[i, : len(ids)] = torch.tensor(y_policy if which == "policy" else y_outcome)
        pieces.append((x.to(device), y.to(device)))
    return pieces


def train_step(model, optimizer, policy_batch, outcome_batch):
    """One AdamW step on the sum of the policy and outcome losses; returns both (nan for a
    missing batch: the outcome buffer is empty when --outcome_rollouts is 0). Each batch is a
    list of pieces (make_batch); their gradients add up before the step."""
    losses = []
    optimizer.zero_grad(set_to_none=True)
    for batch in (policy_batch, outcome_batch):
        if batch is None:
            losses.append(float("nan"))
            continue
        # each trajectory counts once, however long: a mean over its own targets, then a mean
        # over the trajectories of the whole batch (those with any target of this kind)
        n_rows = sum(((y >= 0).sum(1) > 0).sum().item() for _, y in batch)
        total = 0.0
        for x, y in batch:
            pos = torch.arange(x.shape[1], device=x.device).expand_as(x)
            flops = model.flops
            logits = model(x, pos)  # plain causal attention; padding only follows real bytes
            model.flops += 2 * (model.flops - flops)  # the backward pass costs twice the forward
            token_loss = F.cross_entropy(
                logits.transpose(1, 2), y, ignore_index=-1, reduction="none"
            )
            n_targets = (y >= 0).sum(1)  # (B,)
            loss = (token_loss.sum(1)[n_targets > 0] / n_targets[n_targets > 0]).sum() / n_rows
            loss.backward()
            total += loss.item()
        losses.append(total)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return losses


# ----------------------------------------------------------------------------------------------
# Evaluation: held-out tasks, one submitted program each


def evaluate(model, tasks, args, generator, mcts=False):
    """(held-out solved fraction, valid fraction, the submitted programs, their outcomes).

    The agent submits one program per task: one sample at args.eval_temperature, or the best of
    args.eval_rollouts samples on the train pairs (or, with mcts=True, the program Gumbel MCTS
    writes with args.num_simulations). A task is solved when that program passes all its hidden
    test pairs; a program is valid when it halts without error. Evaluation is measurement, so
    its FLOPs are not added to the run's.
    """
    flops, tokens = model.flops, model.tokens
    if mcts:
        submitted = gumbel_mcts(model, tasks, args, generator)[0]
    else:
        K = args.eval_rollouts
        programs = rollout(model, tasks, K, args.eval_temperature, 0.0, generator)
        submitted = [filter_best(t, programs[i * K : (i + 1) * K]) for i, t in enumerate(tasks)]
    outcomes = [lmc.score(p, t.test_inputs, t.test_outputs)[0] for p, t in zip(submitted, tasks)]
    model.flops, model.tokens = flops, tokens
    solved = outcomes.count("9") / len(tasks)
    valid = sum(o.isdigit() for o in outcomes) / len(tasks)  # not S, R or T: it runs and halts
    return solved, valid, submitted, outcomes


def solved_by_group(tasks, outcomes):
    """{group: (solved fraction, tasks)}, a group being a task's kind where the task file names
    one, else its number of inputs (add4: how the agent does on add-2, add-3 and add-4 apart)."""
    by_group = collections.defaultdict(list)
    for task, outcome in zip(tasks, outcomes):
        by_group[task.kind or len(task.train_inputs[0])].append(outcome == "9")
    return {g: (sum(v) / len(v), len(v)) for g, v in sorted(by_group.items(), key=str)}


def group_name(tasks):
    return "by kind" if tasks[0].kind else "by number of inputs"


def show(model, tasks, args, generator):
    """Inside the agent: for each task, the program it writes (by args.search), and at every
    step what the model believed: the chosen unit's policy probability, the predicted outcome
    distribution and its value, and with MCTS the root visit counts and the improved-policy
    weight of the chosen unit. Then the program runs on one hidden input, and the verdict."""
    device = next(model.parameters()).device
    for task in tasks:
        print(f"\nprompt  {prompt_bytes(task).decode().strip()}")
        trace = []
        if args.search == "mcts":
            program = gumbel_mcts(model, [task], args, generator, trace=trace)[0][0]
        else:
            program = rollout(model, [task], 1, args.eval_temperature, 0.0, generator)[0]
        # replay the program through the model to read its predictions at every state
        cache, last = prefill(model, [task], device), ""
        for step, unit in enumerate(program):
            prior, value, probs = extend(model, cache, [(last,)], store=True)
            a = CODE_UNITS.index(unit)
            top = probs[0].topk(3)
            outcomes = " ".join(f"{OUTCOMES[i]}:{p:.2f}" for p, i in zip(*top))
            line = (
                f"  {step + 1:2d} {unit:4s}  policy {prior[0].softmax(-1)[a]:.2f}  "
                f"value {value[0]:+.2f}  outcomes {outcomes}"
            )
            if trace:
                visits, weights = trace[step][0]
                tried = " ".join(f"{CODE_UNITS[i]}:{int(n)}" for i, n in enumerate(visits) if n)
                line += f"  | visits {tried}  weight {weights[a]:.2f}"
            print(line)
            last = unit
        print(lmc.show_run(program, task.test_inputs[0]))
        outcome, reward = lmc.score(program, task.test_inputs, task.test_outputs)
        verdict = "solved" if reward == 1.0 else "not solved"
        print(
            f"verdict: outcome {outcome} on the hidden test pairs, reward {reward:+.2f}: "
            f"{verdict}"
        )


# ----------------------------------------------------------------------------------------------
# Checkpoint: one file with everything a resumed run needs. Only plain types and tensors go in,
# so it loads with torch.load(weights_only=True).


def buffer_state(buffer):
    items = [
        (t.train_inputs, t.train_outputs, t.test_inputs, t.test_outputs, list(p), o)
        for t, p, o in buffer.items
    ]
    return dict(items=items, priorities=buffer.priorities, iterations=buffer.iterations)


def restore_buffer(state):
    buffer = ReplayBuffer()
    buffer.items = [(lmc.Task(*item[:4]), tuple(item[4]), item[5]) for item in state["items"]]
    buffer.priorities, buffer.iterations = list(state["priorities"]), list(state["iterations"])
    return buffer


def save_checkpoint(path, **state):
    """Write the checkpoint atomically: a crash mid-save leaves the previous one intact."""
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(path, device):
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        assert isinstance(state, dict) and {"model", "args", "iteration"} <= state.keys()
    except Exception as e:
        raise UserError(
            f"cannot load checkpoint {path}: corrupt or not an exit checkpoint "
            f"({type(e).__name__})"
        ) from None
    return state


# ----------------------------------------------------------------------------------------------
# Experiments (paper section 3): curves against compute, and the difficulty ladder. Pictures need
# matplotlib, which is optional: every series is also written as CSV, which needs nothing.

PLOT_METRICS = [  # (log.jsonl key, panel title)
    ("heldout_solved", "held-out tasks solved"),
    ("heldout_valid", "held-out programs valid (not S, R or T)"),
    ("train_solved", "training tasks solved by the search"),
]


def run_label(run_dir):
    """How a run is named on a plot: task, searcher and its budget, ablations, seed."""
    path = os.path.join(run_dir, "args.json")
    if not os.path.isfile(path):
        return os.path.basename(os.path.normpath(run_dir))
    a = json.load(open(path))
    if a["search"] == "mcts":
        label = f"{a['task']} MCTS {a['num_simulations']} sims"
        label += " uniform prior" * (a["mcts_prior"] == "uniform")
        label += " zero value" * (a["mcts_value"] == "zero")
        # runs from before the mask was built have no such key: nothing was masked
        label += {"tree": "", "syntax": " root mask", "none": " no mask"}[
            a.get("mcts_mask", "none")
        ]
    else:
        label = f"{a['task']} S&F {a['num_rollouts']} rollouts"
    return label + " no training" * bool(a.get("no_train")) + f" seed {a['seed']}"


def read_log(run_dir):
    """The rows of run_dir/log.jsonl, or a UserError that names what is wrong."""
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"{run_dir} is not a run folder: it has no log.jsonl")
    rows = []
    for n, line in enumerate(open(path), 1):
        try:
            rows.append(json.loads(line))
            float(rows[-1]["flops"])
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{path} line {n}: not a log row with 'flops'") from None
    if not rows:
        raise UserError(f"{path} is empty: the run has not finished an iteration")
    return rows


def write_csv(path, header, rows):
    with open(path, "w") as f:
        f.write(",".join(header) + "\n")
        for row in rows:
            f.write(",".join('"' + v + '"' if isinstance(v, str) else str(v) for v in row) + "\n")


def pyplot():
    """matplotlib's pyplot drawing to files, or None (with a hint) when it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): writing CSV only")
        return None
    return plt


def plot_runs(run_dirs, out):
    """Figures 3-5: each run's held-out solved (and valid, and search-solved) against FLOPs."""
    runs = [(d, run_label(d), read_log(d)) for d in run_dirs]
    csv_path = os.path.splitext(out)[0] + ".csv"
    keys = [key for key, _ in PLOT_METRICS]
    write_csv(
        csv_path,
        ["run", "label", "iter", "flops"] + keys,
        [
            [d, label, r["iter"], r["flops"]] + [r.get(k) for k in keys]
            for d, label, rows in runs
            for r in rows
        ],
    )
    print(f"wrote {csv_path}")
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(PLOT_METRICS), figsize=(5 * len(PLOT_METRICS), 4))
    for ax, (key, title) in zip(axes, PLOT_METRICS):
        for _, label, rows in runs:
            points = [(r["flops"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker=".", label=label)
        ax.set(xscale="log", ylim=(-0.03, 1.03), xlabel="FLOPs (search + training)", title=title)
        ax.xaxis.set_minor_formatter(plt.NullFormatter())  # label only the powers of ten
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=70)
    print(f"wrote {out}")


def run_ladder(args, device):
    """Figure 2: every snapshot of a run, evaluated on --task's held-out tasks at each search
    budget (best of B samples for S&F, B simulations per step for MCTS). The stage "untrained"
    is the run's own initial weights, rebuilt from its seed."""
    try:
        budgets = [int(b) for b in args.budgets.split(",")]
        assert min(budgets) >= 1
    except (ValueError, AssertionError):
        raise UserError(f"--budgets must be positive integers like 1,16,64, got {args.budgets}")
    snap_dir = os.path.join(args.ladder, "snapshots")
    paths = (
        sorted(p for p in os.listdir(snap_dir) if p.endswith(".pt"))
        if os.path.isdir(snap_dir)
        else []
    )
    if not paths:
        raise UserError(f"{args.ladder} has no snapshots: train it with --snapshot_every N")
    snapshots = [load_checkpoint(os.path.join(snap_dir, p), device) for p in paths]
    saved = snapshots[0]["args"]
    args = check_args(args)
    _, heldout, _ = task_source(args)
    torch.manual_seed(saved["seed"])  # the same draw that built the run's model at iteration 0
    model = Transformer(saved["dim"], saved["n_layers"], saved["n_heads"]).to(device).eval()
    # a copy: loading a snapshot later overwrites the model's own tensors in place
    stages = [("untrained", {k: v.clone() for k, v in model.state_dict().items()})]
    stages += [(f"iteration {s['iteration']}", s["model"]) for s in snapshots]
    searcher = "MCTS simulations" if args.search == "mcts" else "S&F samples"
    print(f"ladder: {args.ladder} on {len(heldout)} held-out {args.task} tasks, {searcher}")
    results = []
    for stage, weights in stages:
        model.load_state_dict(weights)
        solved = []
        for b in budgets:
            a = argparse.Namespace(**{**vars(args), "eval_rollouts": b, "num_simulations": b})
            gen = torch.Generator().manual_seed(args.seed)
            solved.append(evaluate(model, heldout, a, gen, mcts=args.search == "mcts")[0])
            results.append([stage, b, solved[-1]])
        print(f"  {stage:>14s}: " + "  ".join(f"{b}: {s:4.0%}" for b, s in zip(budgets, solved)))
    out = args.out or os.path.join(args.ladder, f"ladder_{args.task}.png")
    write_csv(os.path.splitext(out)[0] + ".csv", ["stage", "budget", "solved"], results)
    print(f"wrote {os.path.splitext(out)[0]}.csv")
    plt = pyplot()
    if plt is None:
        return results
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for stage, _ in stages:
        ax.plot(budgets, [s for st, _, s in results if st == stage], marker="o", label=stage)
    ax.set(
        xscale="log",
        ylim=(-0.03, 1.03),
        xlabel=f"search budget ({searcher} per task)",
        ylabel=f"held-out {args.task} solved",
        title=f"trained on {saved['task']}",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=70)
    print(f"wrote {out}")
    return results


# ----------------------------------------------------------------------------------------------
# main: set up, then the expert-iteration loop


def pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}': use auto, cpu, cuda or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but torch sees no CUDA GPU here")
    return device


def check_args(args):
    """Fill the per-family defaults (appendix C) and reject values that make no sense."""
    family = "random" if args.task == "random" else "add"
    for key, value in FAMILY_DEFAULTS[family].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    positive = [
        "num_tasks",
        "num_heldout",
        "num_rollouts",
        "eval_rollouts",
        "num_simulations",
        "max_num_considered_actions",
        "batch_size",
        "outcome_batch_size",
        "buffer_iters",
        "show_every",
        "dim",
        "n_layers",
        "n_heads",
    ]
    for key in positive:
        if getattr(args, key) < 1:
            raise UserError(f"--{key} must be at least 1, got {getattr(args, key)}")
    for key in [
        "outcome_rollouts",
        "train_steps",
        "max_iters",
        "snapshot_every",
        "max_flops",
        "gumbel_scale",
        "c_visit",
        "c_scale",
    ]:
        if getattr(args, key) < 0:
            raise UserError(f"--{key} must not be negative, got {getattr(args, key)}")
    for key in ["gen_temperature", "eval_temperature", "lr", "priority_temperature"]:
        if not getattr(args, key) > 0:
            raise UserError(f"--{key} must be positive, got {getattr(args, key)}")
    for key in ["epsilon", "target"]:
        if not 0 <= getattr(args, key) <= 1:
            raise UserError(f"--{key} must lie in 0..1, got {getattr(args, key)}")
    if args.dim % args.n_heads or (args.dim // args.n_heads) % 2:
        raise UserError(
            f"--dim {args.dim} must split into --n_heads {args.n_heads} even-sized heads"
        )
    if args.search not in SEARCHERS:
        raise UserError(f"--search {args.search} is not built yet")
    if isinstance(args.replay, str):  # "tiebreak,allpairs" -> a list; "paper" -> no rule
        rules = [] if args.replay == "paper" else args.replay.split(",")
        unknown = [r for r in rules if r not in REPLAY_RULES]
        if unknown:
            raise UserError(
                f"--replay: unknown rule {unknown[0]}; use 'paper' or some of "
                + ",".join(REPLAY_RULES)
            )
        args.replay = [r for r in REPLAY_RULES if r in rules]
    return args


def load_tasks(name, n, seed):
    try:
        return lmc.make_tasks(name, n, seed)
    except ValueError as e:
        raise UserError(str(e)) from None


def task_source(args):
    """(draw, heldout, about): draw(i) gives iteration i's training tasks, heldout the tasks the
    agent is scored on, which it never trains on, and about says how many of each. A task family draws fresh training tasks from a seed
    of its own each iteration. A task file is split with a fixed seed: a fifth of its tasks are
    held out (or --heldout names a file of them), and training goes round the rest in a shuffled
    order. At most --num_heldout held-out tasks are evaluated."""
    heldout = load_tasks(args.heldout, None, None) if args.heldout else None
    if lmc.is_task_file(args.task):
        tasks = load_tasks(args.task, None, None)
        check_context(tasks)
        if heldout is None:  # hold out a fifth, the same fifth on every run
            if len(tasks) < 2:
                raise UserError(f"{args.task} has 1 task: a fifth is held out of at least 2")
            order = random.Random("split").sample(range(len(tasks)), len(tasks))
            n_heldout = max(1, len(tasks) // 5)
            heldout = [tasks[k] for k in sorted(order[:n_heldout])]
            tasks = [tasks[k] for k in sorted(order[n_heldout:])]
        order = random.Random(f"order-{args.seed}").sample(tasks, len(tasks))

        def draw(i):  # round the training tasks, num_tasks at a time
            return [order[(i * args.num_tasks + j) % len(order)] for j in range(args.num_tasks)]

    else:

        def draw(i):
            return lmc.make_tasks(args.task, args.num_tasks, f"train-{args.seed}-{i}")

    if heldout is None:
        heldout = load_tasks(args.task, args.num_heldout, HELDOUT_SEED)
    heldout = heldout[: args.num_heldout]
    check_context(heldout)
    n_train = f"{len(order)}" if lmc.is_task_file(args.task) else "new"
    return draw, heldout, f"{n_train} training tasks, {len(heldout)} held out"


def check_context(tasks):
    """A clear error for a task whose prompt and longest program do not fit the model."""
    for task in tasks:
        need = len(prompt_bytes(task)) + SEGMENT * (MAX_LENGTH + 1) + N_TRIE
        if need > MAX_POS:
            raise UserError(
                f"{task.source}: the prompt is {len(prompt_bytes(task))} bytes; with a "
                f"{MAX_LENGTH}-unit program it needs {need} positions, and the model reads "
                f"{MAX_POS}: use fewer or shorter examples"
            )


def fmt_flops(x):
    return f"{x:.2e}"


def main(argv=None):
    args = parser.parse_args(argv)
    try:
        run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def run(args):
    if args.plot:
        return plot_runs(args.plot, args.out or "plot.png")
    device = pick_device(args.device)
    if args.eval_only or args.show:
        return run_eval_only(args, device)
    if args.ladder:
        return run_ladder(args, device)
    out_dir = args.out_dir or os.path.join(
        "runs", os.path.basename(args.task).removesuffix(".jsonl")
    )
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    state = None
    if args.resume:
        state = load_checkpoint(ckpt_path, device)
        # the saved run's settings, except where to run, when to stop and what to show or keep
        where_when = ("device", "out_dir", "max_iters", "max_flops", "target")
        shown_kept = ("show_every", "snapshot_every")
        keep = {k: getattr(args, k) for k in where_when + shown_kept}
        args = argparse.Namespace(**{**vars(args), **state["args"], **keep})
    args = check_args(args)
    draw, heldout, about = task_source(args)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "args.json"), "w") as f:  # what --plot labels the run by
        json.dump(vars(args), f)

    # seed once; every random choice below flows from these generators
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)  # search and replay sampling
    eval_gen = torch.Generator().manual_seed(args.seed + 1)  # held-out sampling
    model = Transformer(args.dim, args.n_layers, args.n_heads).to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0
    )
    policy_buffer, outcome_buffer = ReplayBuffer(), ReplayBuffer()
    start_iter, flops_search, flops_train, elapsed0 = 0, 0.0, 0.0, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        policy_buffer = restore_buffer(state["policy_buffer"])
        outcome_buffer = restore_buffer(state["outcome_buffer"])
        gen.set_state(state["gen"])
        eval_gen.set_state(state["eval_gen"])
        start_iter, flops_search, flops_train = (
            state["iteration"] + 1,
            state["flops_search"],
            state["flops_train"],
        )
        elapsed0 = state["elapsed_s"]
        print(f"resumed {ckpt_path} after iteration {state['iteration']}")
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"task {args.task} ({about}) | search {args.search} | device {device} | "
        f"{n_params / 1e6:.2f}M parameters | "
        f"out {out_dir}"
    )

    t_start = time.time() - elapsed0
    log_path = os.path.join(out_dir, "log.jsonl")
    kept = []
    if state is not None and os.path.exists(log_path):  # drop rows logged after the checkpoint
        kept = [line for line in open(log_path) if json.loads(line)["iter"] <= state["iteration"]]
    log_file = open(log_path, "w")
    log_file.writelines(kept)
    heldout_solved = 0.0
    for it in range(start_iter, args.max_iters):
        # --- search: the expert writes programs for a fresh batch of training tasks
        tasks = draw(it)
        t0, flops0, tokens0 = time.time(), model.flops, model.tokens
        answers, written = SEARCHERS[args.search](model, tasks, args, gen)
        # the epsilon-greedy sampler feeds the outcome buffer with good and bad programs alike;
        # where MCTS admits no syntax error at any node, neither does this sampler
        grammar = args.search == "mcts" and args.mcts_mask == "tree"
        outcome_programs = (
            rollout(model, tasks, args.outcome_rollouts, 0.0, args.epsilon, gen, grammar)
            if args.outcome_rollouts and not args.no_train
            else []
        )
        search_s = time.time() - t0
        # MCTS runs num_simulations simulations for every code unit it writes
        simulations = sum(map(len, answers)) * args.num_simulations if args.search == "mcts" else 0
        search_tokens = model.tokens - tokens0
        flops_search += model.flops - flops0

        # --- store: the programs and their priorities (the replay rule, above); the outcome
        # recorded with each is its outcome on the hidden test pairs
        for buffer in (policy_buffer, outcome_buffer):
            buffer.age_out(it - args.buffer_iters + 1)
        for task, answer, programs in zip(tasks, answers, written):
            counts = collections.Counter(map(tuple, programs))
            kept = list(counts) if "twolevel" in args.replay else [tuple(answer)]
            copies = [counts[p] for p in kept]
            weights = task_priorities(task, kept, copies, args.replay, args.priority_temperature)
            for program, weight in zip(kept, weights):
                outcome = lmc.score(program, task.test_inputs, task.test_outputs)[0]
                policy_buffer.add((task, program, outcome), weight, it)
        R = max(args.outcome_rollouts, 1)
        for j, program in enumerate(outcome_programs):
            task = tasks[j // R]
            outcome, _ = lmc.score(program, task.test_inputs, task.test_outputs)
            outcome_buffer.add((task, tuple(program), outcome), 1.0, it)
        rewards = [lmc.score(p, t.test_inputs, t.test_outputs)[1] for p, t in zip(answers, tasks)]
        train_solved = rewards.count(1.0) / len(tasks)

        # --- learn: next-token training on the replay buffers
        t0, flops0, tokens0 = time.time(), model.flops, model.tokens
        loss_policy = loss_outcome = float("nan")
        model.train()
        for _ in range(0 if args.no_train else args.train_steps):
            policy_batch = make_batch(policy_buffer.sample(args.batch_size, gen), "policy", device)
            outcome_batch = (
                make_batch(outcome_buffer.sample(args.outcome_batch_size, gen), "outcome", device)
                if len(outcome_buffer)
                else None
            )
            loss_policy, loss_outcome = train_step(model, optimizer, policy_batch, outcome_batch)
        model.eval()
        train_s = time.time() - t0
        train_tokens = model.tokens - tokens0
        flops_train += model.flops - flops0

        # --- evaluate on held-out tasks, log, checkpoint
        heldout_solved, heldout_valid, submitted, outcomes = evaluate(
            model, heldout, args, eval_gen
        )
        elapsed = time.time() - t_start
        n_programs = sum(map(len, written)) + len(outcome_programs)  # every program written
        row = dict(
            iter=it,
            elapsed_s=round(elapsed, 2),
            flops_search=flops_search,
            flops_train=flops_train,
            flops=flops_search + flops_train,
            train_solved=train_solved,
            heldout_solved=heldout_solved,
            heldout_valid=heldout_valid,
            # held-out solved by kind or number of inputs, e.g. {"2": 0.97, "3": 0.59} on add4
            heldout_by={str(g): f for g, (f, _) in solved_by_group(heldout, outcomes).items()},
            mean_reward=sum(rewards) / len(rewards),
            policy_buffer=len(policy_buffer),
            outcome_buffer=len(outcome_buffer),
            loss_policy=None if math.isnan(loss_policy) else loss_policy,  # strict JSON: no NaN
            loss_outcome=None if math.isnan(loss_outcome) else loss_outcome,
            search_s=round(search_s, 4),  # 4 places: a tiny run searches in 0.04 s
            train_s=round(train_s, 4),
            programs_per_s=n_programs / search_s,
            tokens_per_s=search_tokens / search_s,
            train_tokens_per_s=train_tokens / max(train_s, 1e-9),
            simulations_per_s=simulations / search_s,
        )
        print(
            f"iter {it:3d} | train {train_solved:4.0%} | heldout {heldout_solved:4.0%} | "
            f"reward {row['mean_reward']:+.2f} | "
            f"buf {len(policy_buffer)}/{len(outcome_buffer)} | "
            f"loss pi {loss_policy:.3f} out {loss_outcome:.3f} | search {search_s:4.1f}s "
            f"train {train_s:4.1f}s | {row['programs_per_s']:4.0f} prog/s "
            f"{row['tokens_per_s'] / 1e3:4.1f}k tok/s"
            + (f" {row['simulations_per_s']:4.0f} sim/s" if simulations else "")
            + f" | {fmt_flops(row['flops'])} FLOPs | "
            f"{elapsed:5.0f}s",
            flush=True,
        )
        log_file.write(json.dumps(row) + "\n")
        log_file.flush()
        if it % args.show_every == 0:
            t = heldout[0]
            sizes = ", ".join(f"{n}: {f:.0%}" for n, f in row["heldout_by"].items())
            print(
                f"      held-out {prompt_bytes(t).decode().strip()} -> {' '.join(submitted[0])}"
                f"  (test outcome {outcomes[0]})\n"
                f"      held-out solved {group_name(heldout)}: {sizes}"
            )
        save_checkpoint(
            ckpt_path,
            model=model.state_dict(),
            optimizer=optimizer.state_dict(),
            args=vars(args),
            iteration=it,
            flops_search=flops_search,
            flops_train=flops_train,
            elapsed_s=elapsed,
            gen=gen.get_state(),
            eval_gen=eval_gen.get_state(),
            policy_buffer=buffer_state(policy_buffer),
            outcome_buffer=buffer_state(outcome_buffer),
        )
        if args.snapshot_every and it % args.snapshot_every == 0:  # for --ladder
            os.makedirs(os.path.join(out_dir, "snapshots"), exist_ok=True)
            save_checkpoint(
                os.path.join(out_dir, "snapshots", f"iter_{it:04d}.pt"),
                model=model.state_dict(),
                args=vars(args),
                iteration=it,
                flops=flops_search + flops_train,
            )
        if heldout_solved >= args.target:
            print(
                f"reached {heldout_solved:.0%} held-out solved at iteration {it}: "
                f"{elapsed:.0f} s, {fmt_flops(flops_search + flops_train)} FLOPs "
                f"(search {fmt_flops(flops_search)}, train {fmt_flops(flops_train)})"
            )
            break
        if args.max_flops and flops_search + flops_train >= args.max_flops:
            print(
                f"spent the --max_flops budget at iteration {it} with {heldout_solved:.0%} "
                f"held-out solved: {elapsed:.0f} s, {fmt_flops(flops_search + flops_train)} FLOPs"
            )
            break
    else:
        print(
            f"stopped after {args.max_iters} iterations at {heldout_solved:.0%} held-out solved: "
            f"{time.time() - t_start:.0f} s, {fmt_flops(flops_search + flops_train)} FLOPs"
        )
    log_file.close()


def run_eval_only(args, device):
    """Evaluate a saved agent on --task (any family or task file) and print held-out solved,
    overall and by the number of inputs per example, or with --show print how it writes
    programs for the first three held-out tasks. With --search mcts, Gumbel MCTS writes the
    submitted programs (--num_simulations per decision) instead of one sample.
    """
    if not args.ckpt:
        raise UserError("--eval_only and --show need --ckpt PATH")
    state = load_checkpoint(args.ckpt, device)
    saved = state["args"]
    args = check_args(args)
    model = Transformer(saved["dim"], saved["n_layers"], saved["n_heads"]).to(device)
    model.load_state_dict(state["model"])
    model.eval()
    _, heldout, _ = task_source(args)
    generator = torch.Generator().manual_seed(args.seed)
    if args.show:
        return show(model, heldout[:3], args, generator)
    # --search mcts: Gumbel MCTS writes each submitted program (search at test time)
    mcts = args.search == "mcts"
    solved, _, _, outcomes = evaluate(model, heldout, args, generator, mcts=mcts)
    how = (
        f"Gumbel MCTS, {args.num_simulations} simulations"
        if mcts
        else f"best of {args.eval_rollouts} at temperature {args.eval_temperature}"
    )
    # the same, split by how many inputs a task's examples have (add4: 2, 3 or 4)
    by_size = solved_by_group(heldout, outcomes)
    sizes = ", ".join(f"{n}: {f:.0%} of {count}" for n, (f, count) in by_size.items())
    print(
        f"{args.ckpt} (trained on {saved['task']}, iteration {state['iteration']}) on "
        f"{len(heldout)} held-out {args.task} tasks, {how}: {solved:.0%} solved "
        f"({group_name(heldout)}: {sizes})"
    )
    return solved


if __name__ == "__main__":
    main()

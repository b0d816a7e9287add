"""
exit.py: a language model teaches itself to program, by expert iteration.

A 3.5M-parameter Llama-style transformer starts from random weights and learns to write programs
for the accumulator machine in lmc.py from input/output examples alone, with no human-written
code. Each iteration it SEARCHES for programs on a batch of tasks, guided by its own policy and
outcome predictions, stores what it wrote in a replay buffer, and LEARNS from that buffer by
next-token prediction, high-reward programs drawn more often. It implements "Towards
self-improving language models for code generation" (section 2: method; 3.1: setup; appendix C:
hyperparameters), top to bottom:

    tokenization -> model -> policy and value -> sampling & filtering -> Gumbel MCTS ->
    replay -> training step -> evaluation -> checkpoint -> experiments -> main (the loop)

Run it:
    python exit.py --task add4                  # learns add-2..4 from scratch
    python exit.py --task add4 --search mcts    # the same with Gumbel MCTS as the searcher
    python exit.py --task add4 --search enum    # a baseline: enumeration (--learner pg another)
    python exit.py --task mix.jsonl             # your own tasks; a fifth of them held out
    python exit.py --eval runs/add4/ckpt.pt --task add6   # a saved agent, on other tasks
    python exit.py --task add6 --init runs/add4/ckpt.pt   # the ladder: train on from there

On a 2-core laptop CPU the add4 demo takes minutes (the README has the measured times).

Where we depart from the paper, and why:
- Eq. 1 sums the log-probabilities of a unit's bytes, each restricted to the bytes that can
  continue some code unit; units end with a space (ADD vs ADDL). With all 256 bytes, a random
  model makes a digit 256^2 times likelier than HLT, so the untrained agent never halts.
- The model reads each outcome slot as "O:?" and predicts the outcome at the "?": the outcome is
  a target only, so no later position can copy it, and "A:", which also ends in ":", stays a
  place to write a code unit.
- An outcome digit d is valued at d/9 (exact for 3 or 9 examples, close for 4).
- Replay draws by reward + 0.01, so that nothing has probability 0.
- The replay buffers keep the last 4 iterations: what a weaker policy wrote ages out quickly.
- Each trajectory weighs the same in the loss (a mean over its targets, then over trajectories):
  with a mean over tokens, long junk programs outweigh the short ones that earn reward.
- The environment admits no syntax error: every sampler, and MCTS at every node (mctx masks
  the root alone), writes only units that keep the program well formed (the paper's MCTS adds a
  leaf "if admissible by the environment"). Unmasked, S&F's samples on a prompt unlike those it
  has solved are mostly syntax errors, and it finds nothing there to learn from.
- Gumbel MCTS submits the best finished program its trees reached (ties to the shortest, then
  to the policy's likeliest) and ends an episode once one passes the train pairs: the paper
  submits the path of its decisions, at a search per unit even once the task is solved.
- Gumbel MCTS weighs Q against the prior by c_scale = 0.03, not mctx's 0.1: sigma stretches
  each node's values to [0, 1], so siblings' values that differ by hundredths (a young outcome
  predictor's noise) would outweigh the prior, and the trees' solutions scatter.
- Every family trains at the add family's learning rate, 2e-4; the paper's 5e-5 for random
  programs suits its runs, a few hundred times longer: in ours it learned half as much.
- Held-out evaluation is measurement, not part of the method: its FLOPs are not counted.
"""

import argparse
import collections
import glob
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
arg("--max_iters", type=int, default=200, help="stop after this many iterations")
arg("--max_flops", type=float, default=0, help="stop once this many FLOPs are spent (0: no limit)")
# model (paper 3.1: 4 layers, 4 heads)
arg("--dim", type=int, default=256, help="model width")
# search
arg("--search", default="sf", choices=["sf", "mcts", "enum"], help="the searcher")
arg("--num_rollouts", type=int, help="programs per task: S&F samples 128, enum runs 100000")
arg("--gen_temperature", type=float, help="S&F temperature (1.2 add, 1.5 random)")
arg("--eval_temperature", type=float, help="held-out temperature (0.8 add, 1.0 random)")
arg("--num_simulations", type=int, default=256, help="MCTS: simulations per decision")
arg("--gumbel_scale", type=float, default=1.0, help="MCTS: scale of the root Gumbel noise")
arg("--mcts_guide", default="both", choices=["both", "policy", "value"], help="MCTS: what guides")
# training
arg("--lr", type=float, default=2e-4, help="AdamW learning rate")
arg("--batch_size", type=int, default=32, help="trajectories per policy batch")
arg("--train_steps", type=int, default=8, help="gradient steps per iteration")
arg("--buffer_iters", type=int, default=4, help="replay keeps N iterations (0: all, the paper)")
arg("--learner", default="exit", choices=["exit", "pg"], help="imitate replay, or REINFORCE")
# system
arg("--seed", type=int, default=0, help="one seed for the whole run")
arg("--device", default="auto", help="auto (cuda, mps, cpu), or a torch device")
arg("--out_dir", help="log and checkpoint folder (default runs/<task>)")
arg("--resume", action="store_true", help="continue the run saved in --out_dir")
arg("--init", metavar="CKPT", help="start from a saved agent's weights (climb the ladder)")
arg("--eval", metavar="CKPT", help="evaluate a checkpoint on --task's held-out tasks, then exit")
arg("--show", metavar="CKPT", help="print how a checkpoint writes programs for 3 held-out tasks")
# experiments (paper section 3): a baseline, snapshots, plots, the ladder
arg("--no_train", action="store_true", help="search only, no gradient steps: the baseline")
arg("--snapshot_every", type=int, default=0, help="keep the model every N iterations (0: off)")
arg("--plot", nargs="+", metavar="RUN_DIR", help="draw held-out solved against FLOPs for runs")
arg("--ladder", metavar="RUN_DIR", help="evaluate RUN_DIR's snapshots on --task at --budgets")
arg("--budgets", help="S&F samples (best of) or MCTS simulations per task, e.g. 1,16,64,256")
arg("--out", help="picture for --plot/--ladder; the series also go to a .csv beside it")

# Appendix C, table 3: sampling temperatures per task family (a task file uses the add ones)
FAMILY_DEFAULTS = {
    "add": dict(gen_temperature=1.2, eval_temperature=0.8),
    "random": dict(gen_temperature=1.5, eval_temperature=1.0),
}
HELDOUT_SEED = "heldout"  # training draws its tasks from f"train-{seed}": the streams never meet
EPSILON = 0.2  # the outcome sampler's chance of a uniformly random unit
OUTCOME_ROLLOUTS = 4  # the outcome sampler's episodes per task
C_SCALE = 0.03  # MCTS: how much sigma weighs Q against the prior (mctx's default: 0.1)
SHOW_EVERY = 5  # iterations between two held-out programs shown in the log


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
    x1 + i x2 and cos + i sin, and torch computes it so, to the same bits and faster on a CPU
    than on the strided halves. Apple's GPU (mps) lacks complex numbers in some torch versions,
    so it takes the halves."""
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
        self.n_matmul = sum(p.numel() for p in self.parameters()) - VOCAB_SIZE * dim
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
        cos, sin = self.rope_cos[pos][:, None], self.rope_sin[pos][:, None]  # (B, 1, T, hd/2)
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
        rows, not the whole cache.
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


def steps_then_trie(step_ids, step_vis, next_pos):
    """Tokens (B, T), positions (B, T) and attention among themselves (B, T, T) for some program
    steps (B, n) followed by the trie tokens, and each row's last step position (B,). Visible
    step bytes count up from next_pos; a trie prefix of length k sits k places after the final
    ':' of "A:". Steps attend causally to visible steps; a trie token sees the steps and its own
    ancestors in the trie; padding sees only itself (no empty rows)."""
    (B, n), device = step_ids.shape, step_ids.device
    ids = torch.cat([step_ids, TRIE_IDS.to(device).expand(B, -1)], 1)
    pos_steps = next_pos[:, None] + step_vis.long().cumsum(1) - 1
    last = pos_steps[:, -1]
    pos = torch.cat([pos_steps, last[:, None] + TRIE_DEPTH.to(device)], 1)
    mask = torch.ones(n + N_TRIE, n + N_TRIE, dtype=torch.bool, device=device).tril()
    mask[n:, n:] = TRIE_SEES.to(device)
    vis = torch.cat([step_vis, torch.ones(B, N_TRIE, dtype=torch.bool, device=device)], 1)
    mask = (mask & vis[:, None, :]) | torch.eye(n + N_TRIE, dtype=torch.bool, device=device)
    return ids, pos, mask, last


@torch.no_grad()
def extend(model, cache, paths, store):
    """Read one path of code units per cache row, and return the policy and value after it.

    paths: B tuples of units, all of one length d (None pads a shorter path at its front). The
    call reads d program steps, then the N_TRIE trie tokens. Returns (prior_logits (B, 21), eq. 1,
    values (B,), outcome probabilities (B, 13)). With store=True the d steps stay in the cache
    (the rollout moves on); otherwise the cache is left as it was (MCTS looks ahead).
    """
    device = cache.visible.device
    n_path = len(paths[0]) * SEGMENT
    step_ids = torch.tensor([[i for u in p for i in SEGMENTS[u][0]] for p in paths], device=device)
    vis_path = torch.tensor([[v for u in p for v in SEGMENTS[u][1]] for p in paths], device=device)
    ids, pos, new, last = steps_then_trie(step_ids, vis_path, cache.next_pos)
    old = cache.visible[:, None, : cache.length].expand(-1, new.shape[1], -1)
    logits = model(ids, pos, torch.cat([old, new], 2), cache)  # (B, T, V)
    trie_logits = logits[:, n_path - 1 :]  # (B, 1 + N_TRIE, V): after "A:", then each prefix
    values, outcome_probs = outcome_value(logits[:, n_path - 4])  # the "?" of the last "O:?"
    if store:
        cache.visible[:, cache.length : cache.length + n_path] = vis_path
        cache.next_pos = last + 1
        cache.length += n_path
    return unit_logits(trie_logits), values, outcome_probs


class TreeCache:
    """The keys and values of the program steps below the roots of MCTS's trees, a slot a node.

    A leaf of a search tree is its root's program plus a path of a few units. extend would read
    the whole path again for every leaf, and pad every tree without a new leaf into the call.
    Here a leaf reads only its own step and the trie: it attends to its root's row of the roots'
    KVCache (prompt and program so far) and to the keys and values its ancestors' steps left in
    their slots when they were leaves, and leaves its own step's in a new slot for its children.
    A call reads only the trees that asked for a leaf.
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
        ids, pos, new, last = steps_then_trie(
            torch.tensor(ids, device=device),
            torch.tensor(vis, device=device),
            torch.tensor(start, device=device),
        )
        seen = torch.tensor(seen, dtype=torch.bool, device=device)
        old = torch.cat([roots.visible[self.rows, : roots.length], seen], 1)[:, None]
        logits = model(ids, pos, torch.cat([old.expand(-1, new.shape[1], -1), new], 2), self)
        for k, (leaf, after) in enumerate(zip(leaves, last.tolist())):
            self.nodes[leaf] = (self.used + k, after + 1)
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
def rollout(model, tasks, num_rollouts, temperature, epsilon, generator):
    """num_rollouts programs for each task, written one code unit at a time from the policy,
    restricted to the units that make no syntax error (the environment admits none).

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


def filter_best(task, programs):
    """Filtering: of one task's programs, the one that scores best on the train pairs (the only
    pairs a searcher may see). Ties go to the shortest, then to the one written most often: the
    policy's own favourite among equal programs, then the first written."""
    written = collections.Counter(map(tuple, programs))  # first-written order

    def key(p):
        return (lmc.score(p, task.train_inputs, task.train_outputs)[1], -len(p), written[p])

    return list(max(written, key=key))  # max keeps the first of equal keys


def sample_and_filter(model, tasks, args, generator):
    """Searcher: sampling & filtering (paper 2.4.1).

    Samples args.num_rollouts programs per task at args.gen_temperature from the policy (eq. 2)
    and keeps, per task, the one that scores best on the train pairs (filter_best). Returns
    (answers, written, executed): one program per task, per task the list of all programs
    sampled, and how many programs were run on train pairs.
    """
    samples = rollout(model, tasks, args.num_rollouts, args.gen_temperature, 0.0, generator)
    R = args.num_rollouts
    written = [samples[i * R : (i + 1) * R] for i in range(len(tasks))]
    return [filter_best(t, w) for t, w in zip(tasks, written)], written, len(samples)


# ----------------------------------------------------------------------------------------------
# Gumbel MCTS (paper 2.4.2; Danihelka et al., "Policy improvement by planning with Gumbel", 2022),
# deciding as DeepMind's reference implementation mctx does. Conventions: one agent, no sign
# flips; rewards lie in [-2, 1] and are paid only on the edge into a finished program (HLT or
# MAX_LENGTH units), which is a terminal node: its edge has discount 0, so Q(s, a) = r there, and
# nothing is expanded below it. Elsewhere Q(s, a) = V(child), where V is the running mean of the
# child's raw value and every return backed up through it. The search core below knows nothing of
# language models: `expand` is whatever gives (prior logits, value, reward, terminal) for a path,
# so tests and exercises can run it on a hand-made tree.


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


def log_policy(logits):
    """log softmax(logits), with a very low finite value for masked units."""
    return np.log(np.maximum(softmax(logits), 1e-300))


def submit(found):
    """MCTS's answer for a task, from {program: (train reward, log-probability under the policy)}
    of the finished programs its trees reached: the best on the train pairs, then the shortest,
    then the policy's likeliest (S&F's tie-break, with the policy's probability in place of how
    often it wrote a program)."""
    return list(max(found, key=lambda p: (found[p][0], -len(p), found[p][1])))


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

    One episode per task: at each state a fresh search of args.num_simulations simulations picks
    the next code unit, with the eq. 2 policy as prior logits and the outcome prediction as leaf
    values; a finished program is valued by its score on the train pairs. The answer is the best
    finished program the trees reached (submit); an episode ends once they reached one that
    passes every train pair. The trees advance in lockstep, one batched model call per
    simulation, each new leaf reading one step (TreeCache). Units that would make a syntax error
    are invalid actions at the root (mctx's mask) and get the float minimum as prior logits
    below it. --mcts_guide policy or value leaves the search the one alone (the other
    uniform or zero: paper figure 5). Returns (answers, written, executed) like sample_and_filter,
    `written` being the finished programs each task's trees reached. With a list as `trace`, each
    decision appends {task index: (root visit counts, action weights)}.
    """
    device = next(model.parameters()).device

    def ablate(prior, values):
        prior = torch.zeros_like(prior) if args.mcts_guide == "value" else prior  # uniform
        values = torch.zeros_like(values) if args.mcts_guide == "policy" else values
        return prior.cpu().numpy(), values.cpu().numpy()

    cache = prefill(model, tasks, device)
    prior, values = ablate(*extend(model, cache, [("",)] * len(tasks), store=True)[:2])
    tree = TreeCache(model, cache, len(tasks) * args.num_simulations)  # the steps below the roots
    programs, executed = [[] for _ in tasks], 0
    found = [{} for _ in tasks]  # finished programs reached: (train reward, log-probability)
    committed = [0.0] * len(tasks)  # the log-probability of each episode's units so far
    solved = [False] * len(tasks)  # one of them passes every train pair
    active = list(range(len(tasks)))  # tasks whose program is unfinished, in cache-row order
    while active:
        tree.clear()  # a fresh search below the new roots
        nodes = {}  # (tree, path) -> (the path's log-probability, the log-policy at its end)
        # the environment admits no syntax error: at the root through mctx's invalid actions
        invalid = np.array([syntax_errors(programs[r]) for r in active])
        root = [log_policy(mask_invalid(p, i)) for p, i in zip(prior, invalid)]  # the log-policy

        def expand(requests):
            nonlocal executed
            results, model_rows = [None] * len(requests), {}
            for k, (row, path) in enumerate(requests):
                program = programs[active[row]] + [CODE_UNITS[a] for a in path]
                above = nodes[row, path[:-1]] if path[:-1] else (committed[active[row]], root[row])
                logp = above[0] + above[1][path[-1]]
                if done(program):  # terminal: run it on the train pairs
                    task = tasks[active[row]]
                    reward = lmc.score(program, task.train_inputs, task.train_outputs)[1]
                    results[k] = (np.zeros(len(CODE_UNITS)), 0.0, reward, True)
                    executed += 1
                    found[active[row]][tuple(program)] = (reward, logp)
                    solved[active[row]] |= reward == 1.0
                else:
                    model_rows[row] = (k, [CODE_UNITS[a] for a in path], logp)
            if model_rows:  # one call for every tree's new leaf, reading one step each
                leaves = [(row, tuple(units)) for row, (_, units, _) in model_rows.items()]
                leaf_prior, leaf_values = ablate(*tree.read(model, leaves))
                for j, (row, (k, units, logp)) in enumerate(model_rows.items()):
                    invalid = syntax_errors(programs[active[row]] + units)  # the grammar
                    logits = mask_invalid(leaf_prior[j], invalid)
                    results[k] = (logits, float(leaf_values[j]), 0.0, False)
                    nodes[row, requests[k][1]] = (logp, log_policy(logits))
            return results

        actions, weights, visits = gumbel_search(
            prior,
            values,
            expand,
            args.num_simulations,
            gumbel_scale=args.gumbel_scale,
            c_scale=C_SCALE,
            generator=generator,
            invalid_actions=invalid,
        )
        if trace is not None:
            trace.append({r: (visits[i], weights[i]) for i, r in enumerate(active)})
        for i, (row, a) in enumerate(zip(active, actions)):
            programs[row].append(CODE_UNITS[a])
            committed[row] += root[i][a]
        # an episode ends at a finished program, or once its trees have solved the train pairs:
        # searching on could find only a shorter or likelier solution, at a search per unit
        keep = [i for i, r in enumerate(active) if not (done(programs[r]) or solved[r])]
        if not keep:
            break
        # move every unfinished root one step down the chosen unit (one batched call)
        cache.select(keep)
        active = [active[i] for i in keep]
        step = [(programs[r][-1],) for r in active]
        prior, values = ablate(*extend(model, cache, step, store=True)[:2])
    return [submit(f) for f in found], [[list(p) for p in f] for f in found], executed


# ----------------------------------------------------------------------------------------------
# Enumeration: the baseline a skeptic asks for first. It ignores the model and runs programs in
# order of length on the train pairs until one passes them all. With training on, the model
# imitates what it finds: expert iteration with an enumerative expert.

INSTRUCTIONS = [(op, d) for op in lmc.OPCODES if op != "HLT" for d in range(10)]


def enum_step(states, line, op, d):
    """The machine states after instruction (op, d) at `line` (1-based), one per train input, or
    None if it makes a runtime error on one. A state is (the line control reaches next, acc,
    memory); an input whose jump passes over `line` skips it. Jumps go forward only."""
    if op.startswith("BR") and d <= line + 1:
        return None
    after = []
    for at, acc, mem in states:
        if at == line + 1:  # a jump onto this instruction's operand
            return None
        if at == line:  # the machine's own step (lmc.step)
            acc, mem, jump = lmc.step(op, d, acc, mem)
            at = line + 2 if jump is None else jump
            if not lmc.INT32_MIN <= acc <= lmc.INT32_MAX:
                return None
        after.append((at, acc, mem))
    return tuple(after)


def enumerate_programs(task, budget):
    """(program, programs executed): the shortest program that passes the task's train pairs,
    found by running programs in order of length, then of code units. Two classic restrictions
    keep the count down: jumps go forward only (no loops), and a prefix that leaves the machine
    in the same states on the train inputs as an earlier prefix of its length is dropped with all
    its extensions, which would behave exactly as the earlier one's. After `budget` programs it
    gives up and returns the first that got the most train outputs right."""
    outputs = task.train_outputs
    start = tuple((1, x[0], tuple(x[1:]) + (0,) * (11 - len(x))) for x in task.train_inputs)
    frontier, executed, best = [((), start)], 0, (-1, ["HLT"])
    while frontier:
        children, seen = [], set()
        for prefix, states in frontier:
            line = len(prefix) + 1  # where HLT stands, or the next instruction
            right = sum(at == line and acc == y for (at, acc, _), y in zip(states, outputs))
            executed += 1
            best = max(best, (right, list(prefix) + ["HLT"]), key=lambda b: b[0])
            if right == len(outputs) or executed >= budget:
                return best[1], executed
            if line + 2 <= MAX_LENGTH and len(children) < budget - executed:
                for op, d in INSTRUCTIONS:
                    after = enum_step(states, line, op, d)
                    if after is not None and after not in seen:
                        seen.add(after)
                        children.append((prefix + (op, str(d)), after))
        frontier = children
    return best[1], executed


def enum_search(model, tasks, args, generator):
    """Searcher: enumeration, at most args.num_rollouts programs per task; the model is unused.
    Returns (programs, written, executed) like sample_and_filter."""
    found = [enumerate_programs(task, args.num_rollouts) for task in tasks]
    return [p for p, _ in found], [[p] for p, _ in found], sum(n for _, n in found)


SEARCHERS = {"sf": sample_and_filter, "mcts": gumbel_mcts, "enum": enum_search}


# ----------------------------------------------------------------------------------------------
# Replay (paper 2.3): what the policy trains on.
# The searcher returns one program per task, the best it found on the train pairs (filtering;
# ties go to the shortest, then to the one the policy wrote most). The policy buffer draws these
# programs with probability proportional to a priority that grows with their reward on the
# hidden test pairs, reward + 0.01 (the paper's prioritized replay, after Schaul et al. 2015):
# the agent trains most on what the search solved, some on partial solutions, and a little on
# the rest. The outcome buffer draws the epsilon-greedy sampler's programs uniformly: the
# outcome predictor must see bad programs too. One departure: both buffers keep only the last
# --buffer_iters iterations (0 keeps all, as the paper), so what a weaker policy wrote ages out.


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


def priority(reward):
    """A stored program's priority: its reward on the hidden test pairs, plus 0.01 so that no
    program has probability 0 (a syntax error's negative reward counts as 0)."""
    # EXERCISE: raise it to a power alpha (Schaul et al.) and run the test of it
    return max(reward, 0.0) + 0.01


def store(policy_buffer, outcome_buffer, tasks, answers, outcome_programs, it, args):
    """The store step: each task's answer into the policy buffer by priority, the outcome
    sampler's programs into the outcome buffer; each keeps its outcome on the hidden test pairs.
    Both buffers first forget what is older than --buffer_iters iterations. Returns the
    answers' rewards on the hidden test pairs."""
    if args.buffer_iters:
        for buffer in (policy_buffer, outcome_buffer):
            buffer.age_out(it - args.buffer_iters + 1)
    rewards = []
    for task, answer in zip(tasks, answers):
        outcome, reward = lmc.score(answer, task.test_inputs, task.test_outputs)
        policy_buffer.add((task, tuple(answer), outcome), priority(reward), it)
        rewards.append(reward)
    for j, program in enumerate(outcome_programs):
        task = tasks[j // OUTCOME_ROLLOUTS]
        outcome = lmc.score(program, task.test_inputs, task.test_outputs)[0]
        outcome_buffer.add((task, tuple(program), outcome), 1.0, it)
    return rewards


# ----------------------------------------------------------------------------------------------
# Training step: next-token loss on policy bytes (policy buffer) and outcome slots (outcome buffer)


PIECE = 16  # trajectories per forward pass in training (see make_batch)


def make_batch(trajectories, which, device, weights=None):
    """Encoded trajectories as a list of (x, y, w) tensors; y keeps only the `which` targets,
    w (B,) weighs each trajectory's loss (1, or a policy-gradient advantage).

    The trajectories are sorted by length and cut into pieces of about PIECE, each padded to
    its own longest, so that a batch of short and long programs wastes little on padding.
    """
    weights = [1.0] * len(trajectories) if weights is None else weights
    rows = [(*encode_trajectory(*t), w) for t, w in zip(trajectories, weights)]
    rows.sort(key=lambda r: len(r[0]))
    n_pieces = max(1, round(len(rows) / PIECE))
    pieces = []
    for k in range(n_pieces):
        piece = rows[k * len(rows) // n_pieces : (k + 1) * len(rows) // n_pieces]
        width = len(piece[-1][0])  # the longest, since the rows are sorted
        x = torch.full((len(piece), width), PAD, dtype=torch.long)
        y = torch.full((len(piece), width), -1, dtype=torch.long)
        for i, (ids, y_policy, y_outcome, _) in enumerate(piece):
            x[i, : len(ids)] = torch.tensor(ids)
            y[i, : len(ids)] = torch.tensor(y_policy if which == "policy" else y_outcome)
        w = torch.tensor([r[-1] for r in piece])
        pieces.append((x.to(device), y.to(device), w.to(device)))
    return pieces


def reinforce_items(tasks, written):
    """--learner pg, REINFORCE with a baseline: every program sampled for a task, with its
    reward minus the mean reward of the task's samples as its weight (the advantage), as
    ((task, program, outcome), advantage). Weighted so, the policy loss raises the
    log-probability of the programs that beat their task's mean and lowers the others'."""
    items = []
    for task, programs in zip(tasks, written):
        programs = [tuple(p) for p in programs]
        pairs = (task.train_inputs + task.test_inputs, task.train_outputs + task.test_outputs)
        scored = {  # each distinct program run once: a task's samples repeat
            p: (lmc.score(p, *pairs)[1], lmc.score(p, task.test_inputs, task.test_outputs)[0])
            for p in set(programs)
        }
        baseline = sum(scored[p][0] for p in programs) / len(programs)
        items += [((task, p, scored[p][1]), scored[p][0] - baseline) for p in programs]
    return items


def draw_policy_batch(buffer, items, batch_size, generator, device):
    """The policy batch: drawn from the policy buffer by priority, or with --learner pg
    uniformly from this iteration's samples (reinforce_items), each weighed by its advantage."""
    if items is None:
        return make_batch(buffer.sample(batch_size, generator), "policy", device)
    drawn = [items[k] for k in torch.randint(len(items), (batch_size,), generator=generator)]
    return make_batch([t for t, _ in drawn], "policy", device, [a for _, a in drawn])


def train_step(model, optimizer, policy_batch, outcome_batch):
    """One AdamW step on the sum of the policy and outcome losses; returns both (nan for a
    missing batch: the outcome buffer is empty in a --no_train run). Each batch is a
    list of pieces (make_batch); their gradients add up before the step."""
    losses = []
    optimizer.zero_grad(set_to_none=True)
    for batch in (policy_batch, outcome_batch):
        if batch is None:
            losses.append(float("nan"))
            continue
        # each trajectory counts once, however long: a mean over its own targets, then a mean
        # over the trajectories of the whole batch (those with any target of this kind)
        n_rows = sum(((y >= 0).sum(1) > 0).sum().item() for _, y, _ in batch)
        total = 0.0
        for x, y, w in batch:
            pos = torch.arange(x.shape[1], device=x.device).expand_as(x)
            flops = model.flops
            logits = model(x, pos)  # plain causal attention; padding only follows real bytes
            model.flops += 2 * (model.flops - flops)  # the backward pass costs twice the forward
            token_loss = F.cross_entropy(
                logits.transpose(1, 2), y, ignore_index=-1, reduction="none"
            )
            n_targets = (y >= 0).sum(1)  # (B,)
            has = n_targets > 0
            loss = (w[has] * token_loss.sum(1)[has] / n_targets[has]).sum() / n_rows
            loss.backward()
            total += loss.item()
        losses.append(total)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return losses


# ----------------------------------------------------------------------------------------------
# Evaluation: held-out tasks, one submitted program each


def evaluate(model, tasks, args, generator, budget=1, search="sf"):
    """(held-out solved fraction, valid fraction, the submitted programs, their outcomes).

    The agent submits one program per task: one sample at args.eval_temperature, or the best of
    `budget` samples on the train pairs (search "mcts": the program Gumbel MCTS writes with
    `budget` simulations a step; "enum": what enumeration finds in `budget` programs, without the
    model). A task is solved when that program passes all its hidden test pairs; a program is
    valid when it halts without error. Evaluation is measurement: its FLOPs are not counted.
    """
    flops, tokens = model.flops, model.tokens
    if search == "mcts":
        args = argparse.Namespace(**{**vars(args), "num_simulations": budget})
        submitted = gumbel_mcts(model, tasks, args, generator)[0]
    elif search == "enum":
        submitted = [enumerate_programs(task, budget)[0] for task in tasks]
    else:
        K = budget
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


STATE_KEYS = ("iteration", "flops_search", "flops_train", "elapsed_s", "executed")  # counters


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


def load_run(path, device):
    """A checkpoint to resume: it must hold the whole state of a run of this exit.py."""
    state = load_checkpoint(path, device)
    missing = [k for k in STATE_KEYS + ("optimizer", "policy_buffer", "gen") if k not in state]
    if missing:
        raise UserError(f"cannot resume {path}: it has no {missing[0]} (an older exit.py?)")
    return state


# ----------------------------------------------------------------------------------------------
# Experiments (paper section 3): curves against compute, and the difficulty ladder. Pictures need
# matplotlib, which is optional: every series is also written as CSV, which needs nothing.

PLOT_KEYS = ["heldout_solved", "heldout_valid", "train_solved"]  # log fields in the CSV


def run_label(run_dir):
    """How a run is named on a plot: task, searcher and budget, learner, ablations, tasks, seed."""
    path = os.path.join(run_dir, "args.json")
    if not os.path.isfile(path):
        return os.path.basename(os.path.normpath(run_dir))
    a = json.load(open(path))
    task = os.path.basename(a["task"])
    label = f"{task} S&F {a['num_rollouts']} rollouts"
    if a["search"] == "mcts":
        guide = {"both": "", "policy": " policy only", "value": " value only"}[a["mcts_guide"]]
        label = f"{task} MCTS {a['num_simulations']} sims{guide}"
    if a["search"] == "enum":
        label = f"{task} enumeration"
    label += " REINFORCE" * (a.get("learner") == "pg") + " no training" * bool(a.get("no_train"))
    buffer_iters = a.get("buffer_iters", parser.get_default("buffer_iters"))
    if buffer_iters != parser.get_default("buffer_iters"):
        label += f" buffer {buffer_iters or 'all'}"
    num_tasks = a.get("num_tasks", parser.get_default("num_tasks"))
    if num_tasks != parser.get_default("num_tasks"):
        label += f" {num_tasks} tasks an iteration"
    return label + f" seed {a['seed']}"


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
    print(f"wrote {path}")


def draw(out, curves, **labels):
    """One picture: curves is a list of (label, xs, ys), on a log x axis; curves with the same
    label share a colour. Needs matplotlib, which is optional; without it the caller's CSV is
    all there is."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return print("matplotlib is not installed (pip install matplotlib): writing CSV only")
    fig, ax = plt.subplots(figsize=(6, 4))
    colours = {}  # curves of one label (the seeds of one setting) share a colour and a legend line
    for label, xs, ys in curves:
        first = label not in colours
        colour = colours.setdefault(label, f"C{len(colours) % 10}")
        ax.plot(xs, ys, marker=".", color=colour, label=label if first else None, alpha=0.8)
    ax.set(xscale="log", ylim=(-0.03, 1.03), **labels)
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # no crowded minor labels
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=70)
    print(f"wrote {out}")


def plot_runs(run_dirs, out):
    """Figures 3-5: each run's held-out solved against FLOPs (the CSV has more fields)."""
    runs = [(d, run_label(d), read_log(d)) for d in run_dirs]
    rows = [
        [d, label, r["iter"], r["flops"]] + [r.get(k) for k in PLOT_KEYS]
        for d, label, log in runs
        for r in log
    ]
    write_csv(
        os.path.splitext(out)[0] + ".csv", ["run", "label", "iter", "flops"] + PLOT_KEYS, rows
    )
    curves = [  # a setting's seeds: one colour
        (
            label.rsplit(" seed ", 1)[0],
            [r["flops"] for r in log],
            [r["heldout_solved"] for r in log],
        )
        for _, label, log in runs
    ]
    draw(out, curves, xlabel="FLOPs (search + training)", ylabel="held-out tasks solved")


def run_ladder(args, device):
    """Figure 2: every snapshot of a run, evaluated on --task's held-out tasks at each search
    budget (best of B samples for S&F, B simulations per step for MCTS). The first stage is the
    run's own initial weights, rebuilt from its seed, or the agent it started from (--init)."""
    budgets = parse_budgets(args, "1,16,64,256")
    paths = sorted(glob.glob(os.path.join(args.ladder, "snapshots", "*.pt")))
    if not paths:
        raise UserError(f"{args.ladder} has no snapshots: train it with --snapshot_every N")
    snapshots = [load_checkpoint(p, device) for p in paths]
    saved = snapshots[0]["args"]
    args = check_args(args)
    _, heldout, _ = task_source(args)
    torch.manual_seed(saved["seed"])  # the same draw that built the run's model at iteration 0
    model = Transformer(saved["dim"]).to(device).eval()
    if saved.get("init"):  # a run that began from a saved agent (--init) begins there
        start = load_checkpoint(saved["init"], device)
        stages = [(f"{start['args']['task']} agent", start["model"])]
    else:  # a copy: loading a snapshot later overwrites the model's own tensors in place
        stages = [("untrained", {k: v.clone() for k, v in model.state_dict().items()})]
    stages += [(f"iteration {s['iteration']}", s["model"]) for s in snapshots]
    searcher = "MCTS simulations" if args.search == "mcts" else "S&F samples"
    print(f"ladder: {args.ladder} on {len(heldout)} held-out {args.task} tasks, {searcher}")
    results, curves = [], []
    for stage, weights in stages:
        model.load_state_dict(weights)
        solved = []
        for b in budgets:
            gen = torch.Generator().manual_seed(args.seed)
            solved.append(evaluate(model, heldout, args, gen, b, args.search)[0])
            results.append([stage, b, solved[-1]])
        curves.append((stage, budgets, solved))
        print(f"  {stage:>14s}: " + "  ".join(f"{b}: {s:4.0%}" for b, s in zip(budgets, solved)))
    out = args.out or os.path.join(args.ladder, f"ladder_{args.task}.png")
    write_csv(os.path.splitext(out)[0] + ".csv", ["stage", "budget", "solved"], results)
    xlabel = f"search budget ({searcher} per task)"
    draw(
        out,
        curves,
        xlabel=xlabel,
        ylabel=f"held-out {args.task} solved",
        title=f"trained on {saved['task']}",
    )
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
    if args.num_rollouts is None:
        args.num_rollouts = 100_000 if args.search == "enum" else 128
    if args.learner == "pg" and args.search != "sf":
        raise UserError("--learner pg learns from S&F's samples: use it with --search sf")
    for key in ["num_tasks", "num_heldout", "num_rollouts", "num_simulations", "batch_size"]:
        if getattr(args, key) < 1:
            raise UserError(f"--{key} must be at least 1, got {getattr(args, key)}")
    for key in ["buffer_iters", "train_steps", "max_iters", "snapshot_every", "max_flops"]:
        if getattr(args, key) < 0:
            raise UserError(f"--{key} must not be negative, got {getattr(args, key)}")
    for key in ["gen_temperature", "eval_temperature", "lr"]:
        if not getattr(args, key) > 0:
            raise UserError(f"--{key} must be positive, got {getattr(args, key)}")
    if args.gumbel_scale < 0:
        raise UserError(f"--gumbel_scale must not be negative, got {args.gumbel_scale}")
    if args.dim < 8 or args.dim % 8:  # 4 heads, each of an even size (rotary pairs)
        raise UserError(f"--dim must be a positive multiple of 8, got {args.dim}")
    if args.search not in SEARCHERS:
        raise UserError(f"--search {args.search} is not built yet")
    return args


def load_tasks(name, n, seed):
    try:
        return lmc.make_tasks(name, n, seed)
    except ValueError as e:
        raise UserError(str(e)) from None


def task_source(args):
    """(draw, heldout, about): draw(i) gives iteration i's training tasks, heldout the tasks the
    agent is scored on, which it never trains on, and about says how many of each. A task family
    draws fresh training tasks from a seed of its own each iteration. A task file is split with
    a fixed seed: a fifth of its tasks are held out (or --heldout names a file of them), and
    training goes round the rest in a shuffled order. At most --num_heldout held-out tasks are
    evaluated."""
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


def main(argv=None):
    args = parser.parse_args(argv)
    try:
        run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def start(args, device, state=None):
    """Everything a run carries from one iteration to the next, new or from a checkpoint."""
    torch.manual_seed(args.seed)  # seed once; every random choice flows from these generators
    model = Transformer(args.dim).to(device)
    s = argparse.Namespace(
        model=model,
        optimizer=torch.optim.AdamW(
            model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0
        ),
        policy_buffer=ReplayBuffer(),
        outcome_buffer=ReplayBuffer(),
        gen=torch.Generator().manual_seed(args.seed),  # search and replay sampling
        eval_gen=torch.Generator().manual_seed(args.seed + 1),  # held-out sampling
        iteration=-1,
        flops_search=0.0,
        flops_train=0.0,
        elapsed_s=0.0,
        executed=0,  # programs run on train pairs by the searcher
    )
    if state is not None:
        s.model.load_state_dict(state["model"])
        s.optimizer.load_state_dict(state["optimizer"])
        s.policy_buffer = restore_buffer(state["policy_buffer"])
        s.outcome_buffer = restore_buffer(state["outcome_buffer"])
        s.gen.set_state(state["gen"])
        s.eval_gen.set_state(state["eval_gen"])
        for key in STATE_KEYS:
            setattr(s, key, state[key])
    return s


def save(out_dir, s, args):
    """The run's checkpoint, and every --snapshot_every iterations the model alone (--ladder)."""
    save_checkpoint(
        os.path.join(out_dir, "ckpt.pt"),
        model=s.model.state_dict(),
        optimizer=s.optimizer.state_dict(),
        policy_buffer=buffer_state(s.policy_buffer),
        outcome_buffer=buffer_state(s.outcome_buffer),
        gen=s.gen.get_state(),
        eval_gen=s.eval_gen.get_state(),
        args=vars(args),
        **{k: getattr(s, k) for k in STATE_KEYS},
    )
    if args.snapshot_every and s.iteration % args.snapshot_every == 0:
        os.makedirs(os.path.join(out_dir, "snapshots"), exist_ok=True)
        path = os.path.join(out_dir, "snapshots", f"iter_{s.iteration:04d}.pt")
        save_checkpoint(path, model=s.model.state_dict(), args=vars(args), iteration=s.iteration)


def log_row(s, rewards, heldout, losses, speed):
    """The iteration's record for log.jsonl: rewards of the searched programs, heldout (solved,
    valid, solved by group), losses (policy, outcome), speed (seconds, tokens, programs)."""
    row = dict(iter=s.iteration, elapsed_s=round(s.elapsed_s, 2))
    row.update(flops=s.flops_search + s.flops_train, flops_search=s.flops_search)
    row.update(flops_train=s.flops_train, executed=s.executed)
    row.update(
        train_solved=rewards.count(1.0) / len(rewards), mean_reward=sum(rewards) / len(rewards)
    )
    row.update(heldout_solved=heldout[0], heldout_valid=heldout[1])  # valid: no S, R or T
    # by kind, or by number of inputs: {"2": 0.97, "3": 0.59, "4": 0.11} on add4
    row["heldout_by"] = {str(g): f for g, (f, _) in heldout[2].items()}
    row.update(policy_buffer=len(s.policy_buffer), outcome_buffer=len(s.outcome_buffer))
    row.update(loss_policy=losses[0], loss_outcome=losses[1])
    search_s, train_s = speed["search_s"], speed["train_s"]
    row.update(search_s=round(search_s, 4), train_s=round(train_s, 4))
    row["programs_per_s"] = speed["programs"] / search_s
    row["tokens_per_s"] = speed["search_tokens"] / search_s
    row["train_tokens_per_s"] = speed["train_tokens"] / max(train_s, 1e-9)
    row["simulations_per_s"] = speed["simulations"] / search_s
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}


def log_line(row, simulations):
    """The iteration's one line on the terminal (the full row goes to log.jsonl)."""
    loss = [float("nan") if row[k] is None else row[k] for k in ("loss_policy", "loss_outcome")]
    sims = f" {row['simulations_per_s']:4.0f} sim/s" if simulations else ""
    return (
        f"iter {row['iter']:3d} | train {row['train_solved']:4.0%} | "
        f"heldout {row['heldout_solved']:4.0%} | reward {row['mean_reward']:+.2f} | "
        f"buf {row['policy_buffer']}/{row['outcome_buffer']} | "
        f"loss pi {loss[0]:.3f} out {loss[1]:.3f} | search {row['search_s']:4.1f}s "
        f"train {row['train_s']:4.1f}s | {row['programs_per_s']:4.0f} prog/s "
        f"{row['tokens_per_s'] / 1e3:4.1f}k tok/s{sims} | {row['flops']:.2e} FLOPs | "
        f"{row['elapsed_s']:5.0f}s"
    )


def setup(args, device):
    """A new run, or the one saved in its folder (--resume), or one that starts from a saved
    agent's weights (--init): its settings, state, tasks, folder and log."""
    name = os.path.basename(args.task).removesuffix(".jsonl")
    out_dir = args.out_dir or os.path.join("runs", name)
    ckpt_path, log_path = os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, "log.jsonl")
    state = None
    if args.resume:  # the saved run's settings, but where to run, when to stop, what to keep
        state = load_run(ckpt_path, device)
        keep = ("device", "out_dir", "max_iters", "max_flops", "snapshot_every")
        keep = {k: getattr(args, k) for k in keep}
        args = argparse.Namespace(**{**vars(args), **state["args"], **keep})
    init = load_checkpoint(args.init, device) if args.init and state is None else None
    if init is not None:  # a saved agent's weights, with a fresh optimizer and buffers
        args.dim = init["args"]["dim"]
    args = check_args(args)
    draw, heldout, about = task_source(args)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "args.json"), "w") as f:  # what --plot labels the run by
        json.dump(vars(args), f)
    s = start(args, device, state)
    if init is not None:
        s.model.load_state_dict(init["model"])
    print(
        f"task {args.task} ({about}) | search {args.search} | device {device} | "
        f"{sum(p.numel() for p in s.model.parameters()) / 1e6:.2f}M parameters | out {out_dir}"
    )
    if state is not None:
        print(f"resumed {ckpt_path} after iteration {s.iteration}")
    if init is not None:
        print(
            f"from {args.init} (trained on {init['args']['task']}, iteration {init['iteration']})"
        )
    kept = []  # log rows up to the checkpoint; later ones are dropped
    if state is not None and os.path.exists(log_path):
        kept = [line for line in open(log_path) if json.loads(line)["iter"] <= s.iteration]
    log_file = open(log_path, "w")
    log_file.writelines(kept)
    return args, s, draw, heldout, out_dir, log_file


def run(args):
    if args.plot:
        return plot_runs(args.plot, args.out or "plot.png")
    device = pick_device(args.device)
    if args.eval or args.show:
        return run_eval_only(args, device)
    if args.ladder:
        return run_ladder(args, device)
    args, s, draw, heldout, out_dir, log_file = setup(args, device)
    model, gen = s.model, s.gen
    t_start = time.time() - s.elapsed_s
    for it in range(s.iteration + 1, args.max_iters):
        # --- search: the expert writes programs for a fresh batch of training tasks
        tasks = draw(it)
        t0, flops0, tokens0 = time.time(), model.flops, model.tokens
        decisions = []  # MCTS appends one entry per decision (its trace), to count simulations
        trace = dict(trace=decisions) if args.search == "mcts" else {}
        answers, written, executed = SEARCHERS[args.search](model, tasks, args, gen, **trace)
        s.executed += executed
        # the epsilon-greedy sampler writes good and bad programs for the outcome predictor
        outcome_programs = []
        if not args.no_train:
            outcome_programs = rollout(model, tasks, OUTCOME_ROLLOUTS, 0.0, EPSILON, gen)
        search_s, search_tokens = time.time() - t0, model.tokens - tokens0
        s.flops_search += model.flops - flops0

        # --- store: what the search wrote goes into the replay buffers
        rewards = store(
            s.policy_buffer, s.outcome_buffer, tasks, answers, outcome_programs, it, args
        )

        # --- learn: next-token training on batches drawn from the buffers by priority
        #     (--learner pg: REINFORCE on this iteration's samples in place of the policy buffer)
        t0, flops0, tokens0 = time.time(), model.flops, model.tokens
        loss_policy = loss_outcome = float("nan")
        model.train()
        items = reinforce_items(tasks, written) if args.learner == "pg" else None
        for _ in range(0 if args.no_train else args.train_steps):
            policy = draw_policy_batch(s.policy_buffer, items, args.batch_size, gen, device)
            outcome = None
            if len(s.outcome_buffer):
                drawn = s.outcome_buffer.sample(max(1, args.batch_size // 4), gen)
                outcome = make_batch(drawn, "outcome", device)
            loss_policy, loss_outcome = train_step(model, s.optimizer, policy, outcome)
        model.eval()
        train_s, train_tokens = time.time() - t0, model.tokens - tokens0
        s.flops_train += model.flops - flops0

        # --- evaluate on held-out tasks, log, checkpoint
        solved, valid, submitted, outcomes = evaluate(model, heldout, args, s.eval_gen)
        s.iteration, s.elapsed_s = it, time.time() - t_start
        simulations = sum(map(len, decisions)) * args.num_simulations  # trees x searches x sims
        n_programs = executed + len(outcome_programs)  # every program run or written
        speed = dict(
            search_s=search_s,
            train_s=train_s,
            search_tokens=search_tokens,
            train_tokens=train_tokens,
            simulations=simulations,
            programs=n_programs,
        )
        by_group = solved_by_group(heldout, outcomes)
        row = log_row(s, rewards, (solved, valid, by_group), (loss_policy, loss_outcome), speed)
        print(log_line(row, simulations), flush=True)
        log_file.write(json.dumps(row) + "\n")
        log_file.flush()
        if it % SHOW_EVERY == 0:  # a held-out task, the program the agent submits for it
            t = heldout[0]
            groups = ", ".join(f"{g}: {f:.0%}" for g, f in row["heldout_by"].items())
            print(
                f"      held-out {prompt_bytes(t).decode().strip()} -> {' '.join(submitted[0])}"
                f"  (test outcome {outcomes[0]})\n"
                f"      held-out solved {group_name(heldout)}: {groups}"
            )
        save(out_dir, s, args)
        spent = f"{s.elapsed_s:.0f} s, {row['flops']:.2e} FLOPs (search {s.flops_search:.2e})"
        if solved == 1.0:
            print(f"reached {solved:.0%} held-out solved at iteration {it}: {spent}")
            break
        if args.max_flops and row["flops"] >= args.max_flops:
            print(f"spent --max_flops at iteration {it}: {solved:.0%} held-out solved, {spent}")
            break
    else:
        print(f"stopped after --max_iters {args.max_iters} iterations")
    log_file.close()


def parse_budgets(args, default):
    try:
        budgets = [int(b) for b in (args.budgets or default).split(",")]
        assert min(budgets) >= 1
    except (ValueError, AssertionError):
        raise UserError(f"--budgets must be positive integers like 1,16,64, got {args.budgets}")
    return budgets


def run_eval_only(args, device):
    """Evaluate a saved agent (--eval) on --task's held-out tasks (any family or task file) at
    each of --budgets, and print held-out solved, overall and by kind or number of inputs; or
    (--show) print how it writes programs for the first three held-out tasks. With --search
    mcts, Gumbel MCTS writes the submitted programs; with --search enum, enumeration does,
    without the checkpoint's weights (the baseline)."""
    ckpt = args.eval or args.show
    state = load_checkpoint(ckpt, device)
    saved = state["args"]
    args = check_args(args)
    model = Transformer(saved["dim"]).to(device)
    model.load_state_dict(state["model"])
    model.eval()
    _, heldout, _ = task_source(args)
    generator = torch.Generator().manual_seed(args.seed)
    if args.show:
        return show(model, heldout[:3], args, generator)
    default = {"mcts": args.num_simulations, "enum": args.num_rollouts}.get(args.search, 1)
    for budget in parse_budgets(args, str(default)):
        t0 = time.time()
        solved, _, _, outcomes = evaluate(model, heldout, args, generator, budget, args.search)
        how = f"best of {budget} samples" if budget > 1 else "one sample"
        how += f" at temperature {args.eval_temperature}"
        how = {
            "mcts": f"Gumbel MCTS, {budget} simulations a step",
            "enum": f"enumeration, at most {budget} programs a task",
        }.get(args.search, how)
        groups = solved_by_group(heldout, outcomes)
        groups = ", ".join(f"{g}: {f:.0%} of {n}" for g, (f, n) in groups.items())
        print(
            f"{ckpt} (trained on {saved['task']}, iteration {state['iteration']}) on "
            f"{len(heldout)} held-out {args.task} tasks, {how}: {solved:.0%} solved "
            f"({group_name(heldout)}: {groups}) "
            f"in {time.time() - t0:.0f} s"
        )
    return solved


if __name__ == "__main__":
    main()

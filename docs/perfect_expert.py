"""A ceiling for a task file: what the model learns from a perfect expert, with no search.
Every training task of the task mix (python lmc.py --mix mix.jsonl) gets its reference program,
the one of its kind in lmc.MIX_KINDS that passes all its pairs, and the model trains on these
with exit.py's batches, loss and learning rate, drawn from all the training tasks or, given
WINDOW_ITERS, only from those a replay window of that many iterations would hold (it moves on
by --num_tasks tasks every --train_steps steps, as in a run). Every 100 steps it prints held-out
solved with one sample, and the share of 72 training tasks solved.
Run from the repository root: python docs/perfect_expert.py mix.jsonl STEPS [WINDOW_ITERS]"""

import itertools
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import exit as ex  # noqa: E402
import lmc  # noqa: E402

path, steps = sys.argv[1], int(sys.argv[2])
window = int(sys.argv[3]) if len(sys.argv) > 3 else 0
args = ex.check_args(ex.parser.parse_args(["--task", path]))
draw, heldout, about = ex.task_source(args)
stream = (task for i in itertools.count() for task in draw(i))  # round the training tasks
first = next(stream)
train = [first] + list(itertools.takewhile(lambda task: task is not first, stream))


def reference(task):
    """The task's kind's program, with the constant K that passes all of the task's pairs."""
    pairs = (task.train_inputs + task.test_inputs, task.train_outputs + task.test_outputs)
    for k in range(1, 10):
        program = tuple(lmc.MIX_KINDS[task.kind][0].replace("K", str(k)).split())
        if lmc.score(program, *pairs)[0] == "9":
            return program
    raise ValueError(f"{task.source}: no reference program of kind {task.kind} passes it")


items = [(task, reference(task), "9") for task in train]
s = ex.start(args, "cpu")  # a new run's model, optimizer and generators, as exit.py makes them
model, optimizer, gen, eval_gen = s.model, s.optimizer, s.gen, s.eval_gen
print(about)
t0 = time.time()
for step in range(1, steps + 1):
    pool = items
    if window:  # the tasks the replay window would hold at this step
        pool = items[((step // args.train_steps) * args.num_tasks) % len(items) :]
        pool = pool[: window * args.num_tasks]
    batch = [pool[k] for k in torch.randint(len(pool), (args.batch_size,), generator=gen)]
    model.train()
    ex.train_step(model, optimizer, ex.make_batch(batch, "policy", "cpu"), None)
    model.eval()
    if step % 100 == 0:
        solved, _, _, outcomes = ex.evaluate(model, heldout, args, eval_gen)
        on_train = ex.evaluate(model, train[:72], args, eval_gen)[0]
        kinds = ex.solved_by_group(heldout, outcomes)
        print(
            f"step {step} ({time.time() - t0:.0f} s, {model.flops:.2e} FLOPs): held-out "
            f"{solved:.0%}, training tasks {on_train:.0%} | "
            + ", ".join(f"{kind} {f:.0%}" for kind, (f, _) in kinds.items()),
            flush=True,
        )

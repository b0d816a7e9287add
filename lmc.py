"""
lmc.py: the machine, the tasks and the reward.

This is the world the agent in exit.py learns to program: a modified Little Man Computer, an
accumulator machine with 11 opcodes and 10 memory cells (paper appendix A), the two task families
(add-N, section 3.1; random programs, appendix B) and the reward of section 2.1. It is plain Python,
imports no torch, and reads in the order of the machine's description: constants, syntax check,
`run`, scoring, task generators.

Watch a program run, one executed step per line (line numbers are 1-based positions in the
program, and every code unit, opcode or operand, is one line):

    python lmc.py "LDL 1 STA 0 LDL 9 SUB 0 BRP 7 HLT" 3 5

Write a task file of 18 kinds of small tasks (20 each), to try exit.py on:

    python lmc.py --mix mix.jsonl

Where we depart from the paper:
- Operands are single digits 0..9 (the paper's example uses LDL 10): the agent's vocabulary has 21
  code units, so literals, addresses and jump targets are all one digit.
- BRP branches on a strictly positive accumulator, so the paper's countdown example halts at 0.
- An outcome digit d is floor(9k/n) for k of n outputs right; exit.py values it at d/9.
"""

import json
import random
import sys
from dataclasses import dataclass
from functools import lru_cache

# ----------------------------------------------------------------------------------------------
# Constants

OPCODES = ("ADD", "SUB", "ADDL", "SUBL", "LDA", "LDL", "STA", "BRA", "BRZ", "BRP", "HLT")
OPERANDS = tuple(str(d) for d in range(10))
CODE_UNITS = OPCODES + OPERANDS  # the agent's 21 actions, opcodes first
OUTCOMES = ("T", "S", "R") + OPERANDS  # truncated, syntax error, runtime error, digits 0..9
T_MAX = 100  # executed instructions allowed before a runtime error
MAX_LENGTH = 20  # code units in a program before the episode is truncated
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
REWARD = {"T": -2.0, "S": -1.0, "R": -1.0}  # error rewards; a digit d is worth d / 9

_OPCODE_SET = frozenset(OPCODES)
_OPERAND_VALUE = {d: int(d) for d in OPERANDS}


# ----------------------------------------------------------------------------------------------
# Syntax check: turn a list of code units into an instruction table, or say what is wrong


@lru_cache(maxsize=1 << 16)
def _compile(program):
    """Check a program's syntax and build its instruction table.

    Returns (code, None) where code[line] is (opcode, operand) for a line where an instruction
    starts and None for an operand line (index 0 is unused: lines are 1-based), or (None, message)
    for a syntax error. Cached, because search scores the same programs many times.
    """
    if not program:
        return None, "empty program"
    code = [None] * (len(program) + 1)
    i = 0
    while i < len(program):
        unit = program[i]
        line = i + 1
        if unit not in _OPCODE_SET:
            return None, f"line {line}: '{unit}' stands where an opcode should"
        if unit == "HLT":
            code[line] = ("HLT", 0)
            i += 1
            continue
        if i + 1 >= len(program) or program[i + 1] not in _OPERAND_VALUE:
            got = "nothing" if i + 1 >= len(program) else f"'{program[i + 1]}'"
            return None, f"line {line + 1}: {unit} needs an operand 0..9, got {got}"
        code[line] = (unit, _OPERAND_VALUE[program[i + 1]])
        i += 2
    if program[-1] != "HLT":
        return None, f"line {len(program)}: a program must end with HLT"
    return code, None


# ----------------------------------------------------------------------------------------------
# Running a program


def step(op, x, acc, mem):
    """The effect of one instruction other than HLT: (acc, mem, jump target or None). mem is a
    tuple of the 10 memory cells; STA returns a new one."""
    if op == "ADD":
        return acc + mem[x], mem, None
    if op == "SUB":
        return acc - mem[x], mem, None
    if op == "ADDL":
        return acc + x, mem, None
    if op == "SUBL":
        return acc - x, mem, None
    if op == "LDA":
        return mem[x], mem, None
    if op == "LDL":
        return x, mem, None
    if op == "STA":
        return acc, mem[:x] + (acc,) + mem[x + 1 :], None
    taken = op == "BRA" or (op == "BRZ" and acc == 0) or (op == "BRP" and acc > 0)
    return acc, mem, x if taken else None


def execute(program, inputs, trace=None):
    """Run `program` on one input list and return (result, error message or None).

    result is the accumulator at HLT (an int), "S" for a syntax error or "R" for a runtime error
    (more than T_MAX steps, a jump outside the program or onto an operand line, or an int32
    overflow). With a list as `trace`, each executed step appends (line, instruction, acc, mem).
    """
    code, error = _compile(tuple(program))
    if error:
        return "S", error
    acc = inputs[0]
    mem = tuple(inputs[1:11]) + (0,) * (11 - len(inputs))
    line = 1
    for _ in range(T_MAX):
        op, x = code[line]
        if op == "HLT":
            if trace is not None:
                trace.append((line, "HLT", acc, list(mem)))
            return acc, None
        # update acc/mem, then move to the next instruction (two lines on) or a jump target
        acc, mem, jump = step(op, x, acc, mem)
        nxt = line + 2 if jump is None else jump
        if trace is not None:
            trace.append((line, f"{op} {x}", acc, list(mem)))
        if not INT32_MIN <= acc <= INT32_MAX:
            return "R", f"line {line}: {op} {x} overflows int32 (acc = {acc})"
        if nxt < 1 or nxt >= len(code) or code[nxt] is None:
            where = "outside the program" if nxt < 1 or nxt >= len(code) else "onto an operand"
            return "R", f"line {line}: {op} {x} jumps to line {nxt}, {where}"
        line = nxt
    return "R", f"no HLT after {T_MAX} steps"


def run(program, inputs):
    """The output of `program` (a list of code units) on one input list: an int, or "S"/"R"."""
    return execute(program, inputs)[0]


# ----------------------------------------------------------------------------------------------
# Outcome and reward (paper 2.1)


def score(program, inputs_list, outputs_list):
    """(outcome, reward) of a program on a list of examples.

    No HLT at the end: "T", -2 (the episode hit the maximal length). Syntax error: "S", -1. A
    runtime error on any input: "R", -1. Otherwise k of n outputs right: digit floor(9k/n), k/n.
    """
    if not program or program[-1] != "HLT":
        return "T", REWARD["T"]
    correct = 0
    for inputs, expected in zip(inputs_list, outputs_list):
        result = run(program, inputs)
        if result in ("S", "R"):
            return result, REWARD[result]
        correct += result == expected
    n = len(outputs_list)
    return str(9 * correct // n), correct / n


def outcome_reward(outcome):
    """The reward an outcome code stands for: -2 for T, -1 for S and R, d/9 for a digit d."""
    return REWARD[outcome] if outcome in REWARD else int(outcome) / 9


# ----------------------------------------------------------------------------------------------
# Tasks: add-N (paper 3.1), random programs (appendix B), task files


@dataclass(frozen=True)
class Task:
    """Input/output examples: the train pairs are shown to the agent, the test pairs are hidden."""

    train_inputs: list
    train_outputs: list
    test_inputs: list
    test_outputs: list
    program: tuple = None  # a reference solution, None where none is known
    kind: str = None  # what kind of task it is, where known (a task file's optional "kind")
    source: str = None  # where it came from, for error messages ("mix.jsonl line 12")


def add_program(k):
    """The add-k program `ADD 0 ADD 1 ... ADD k-2 HLT`: it solves every add-j with j <= k."""
    return tuple(u for m in range(k - 1) for u in ("ADD", str(m))) + ("HLT",)


def make_add_task(max_len, rng):
    """One add-N task: k uniform in 2..N, 3 train and 3 test lists of k values in 0..9."""
    k = rng.randint(2, max_len)
    inputs = [[rng.randint(0, 9) for _ in range(k)] for _ in range(6)]
    outputs = [sum(x) for x in inputs]
    return Task(inputs[:3], outputs[:3], inputs[3:], outputs[3:], add_program(k))


def make_random_task(rng, n_max=8, n_pairs=4, x_max=9, eps=0.001):
    """One random-program task (appendix B, table 2 parameters).

    Inputs first: a length n in 2..n_max, then 2 * n_pairs lists of n values in 1..x_max. Then a
    program of alternating non-HLT opcodes and operands in 0..n-2, at least n-1 pairs, one more
    with probability eps (repeatedly), then HLT. A program that errs on any input is discarded and
    a fresh one drawn for the same inputs.
    """
    n = rng.randint(2, n_max)
    inputs = [[rng.randint(1, x_max) for _ in range(n)] for _ in range(2 * n_pairs)]
    while True:
        num_pairs = n - 1
        while rng.random() < eps:
            num_pairs += 1
        program = []
        for _ in range(num_pairs):
            program += [rng.choice(OPCODES[:-1]), str(rng.randint(0, n - 2))]
        program = tuple(program) + ("HLT",)
        outputs = [run(program, x) for x in inputs]
        if all(isinstance(y, int) for y in outputs):
            break
    return Task(inputs[:n_pairs], outputs[:n_pairs], inputs[n_pairs:], outputs[n_pairs:], program)


def _check_pairs(inputs, outputs, what):
    """Raise ValueError unless inputs/outputs are matching, non-empty lists of int32 examples."""

    def is_int(x):
        return isinstance(x, int) and not isinstance(x, bool) and INT32_MIN <= x <= INT32_MAX

    if not isinstance(inputs, list) or not isinstance(outputs, list) or not inputs:
        raise ValueError(f"{what}_inputs and {what}_outputs must be non-empty lists")
    if len(inputs) != len(outputs):
        raise ValueError(f"{len(inputs)} {what}_inputs but {len(outputs)} {what}_outputs")
    for x in inputs:
        if not isinstance(x, list) or not 1 <= len(x) <= 10 or not all(map(is_int, x)):
            raise ValueError(f"each of {what}_inputs must be a list of 1..10 int32s, got {x!r}")
    for y in outputs:
        if not is_int(y):
            raise ValueError(f"each of {what}_outputs must be an int32, got {y!r}")


def load_task_file(path):
    """Tasks from a JSON Lines file, one object a line with train_inputs, train_outputs,
    test_inputs and test_outputs, and optionally a "kind" (a name to report results by). Blank
    lines are skipped. Errors name the file and line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read task file {path}: {e}") from None
    keys = ("train_inputs", "train_outputs", "test_inputs", "test_outputs")
    tasks = []
    for lineno, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
            if not isinstance(obj, dict):
                raise ValueError("expected a JSON object")
            missing = [k for k in keys if k not in obj]
            if missing:
                raise ValueError(f"missing key(s) {', '.join(missing)}")
            _check_pairs(obj["train_inputs"], obj["train_outputs"], "train")
            _check_pairs(obj["test_inputs"], obj["test_outputs"], "test")
        except ValueError as e:  # json.JSONDecodeError is a ValueError too
            raise ValueError(f"{path} line {lineno}: {e}") from None
        kind = obj.get("kind")
        tasks.append(Task(*(obj[k] for k in keys), kind=kind, source=f"{path} line {lineno}"))
    if not tasks:
        raise ValueError(f"{path}: no tasks in the file")
    return tasks


def is_task_file(name):
    return name.endswith(".jsonl") or "/" in name


def make_tasks(name, n, seed):
    """n tasks of family `name` (add2..add9, random) from `seed`, or the tasks in a .jsonl file.

    The same arguments give the same tasks. A file gives its own tasks, its first n (all of them
    when n is None); its tasks carry no reference program.
    """
    if is_task_file(name):
        tasks = load_task_file(name)
        return tasks if n is None else tasks[:n]
    rng = random.Random(seed)
    if name == "random":
        return [make_random_task(rng) for _ in range(n)]
    if name.startswith("add") and name[3:] in [str(k) for k in range(2, 10)]:
        return [make_add_task(int(name[3:]), rng) for _ in range(n)]
    raise ValueError(f"unknown task '{name}': use add2..add9, random, or a .jsonl task file")


# ----------------------------------------------------------------------------------------------
# A task mix: small tasks of many kinds, to try a task file on (python lmc.py --mix mix.jsonl)

# kind: (reference program, number of inputs, lowest and highest input value). K stands for a
# constant drawn per task (1..9). A task's outputs are its reference program's outputs.
MIX_KINDS = {
    "first": ("HLT", 2, 0, 9),
    "second": ("LDA 0 HLT", 2, 0, 9),
    "add": ("ADD 0 HLT", 2, 0, 9),
    "subtract": ("SUB 0 HLT", 2, 0, 9),
    "subtract_reversed": ("STA 1 LDA 0 SUB 1 HLT", 2, 0, 9),
    "sum3": ("ADD 0 ADD 1 HLT", 3, 0, 9),
    "add_sub": ("ADD 0 SUB 1 HLT", 3, 0, 9),
    "double": ("STA 0 ADD 0 HLT", 1, 0, 9),
    "negate": ("STA 0 SUB 0 SUB 0 HLT", 1, 0, 9),
    "add_constant": ("ADDL K HLT", 1, 0, 9),
    "subtract_constant": ("SUBL K HLT", 1, 0, 9),
    "constant": ("LDL K HLT", 1, 0, 9),
    "max": ("SUB 0 BRP 8 LDA 0 HLT ADD 0 HLT", 2, 0, 9),
    "min": ("SUB 0 BRP 8 ADD 0 HLT LDA 0 HLT", 2, 0, 9),
    "equal": ("SUB 0 BRZ 8 LDL 0 HLT LDL 1 HLT", 2, 0, 3),
    "greater": ("SUB 0 BRP 8 LDL 0 HLT LDL 1 HLT", 2, 0, 9),
    "relu": ("BRP 5 LDL 0 HLT", 1, -9, 9),
    "abs": ("BRP 9 STA 0 SUB 0 SUB 0 HLT", 1, -9, 9),
}


def make_mix_task(kind, rng, n_train=4, n_test=3):
    """One task of a MIX_KINDS kind. Where the reference program branches, its train pairs take
    more than one path through it, and every path that a test pair takes."""
    text, n, low, high = MIX_KINDS[kind]
    program = tuple(text.replace("K", str(rng.randint(1, 9))).split())
    while True:
        inputs = [[rng.randint(low, high) for _ in range(n)] for _ in range(n_train + n_test)]
        paths = []
        for x in inputs:
            trace = []
            execute(program, x, trace)
            paths.append(tuple(line for line, *_ in trace))
        branches = any(unit.startswith("BR") for unit in program)
        if set(paths[:n_train]) == set(paths) and len(set(paths)) > branches:
            break
    outputs = [run(program, x) for x in inputs]
    train, test = slice(0, n_train), slice(n_train, None)
    return Task(inputs[train], outputs[train], inputs[test], outputs[test], program, kind)


def write_mix(path, per_kind=20, seed=0):
    """Write per_kind tasks of every MIX_KINDS kind, in a seeded random order, as JSON Lines."""
    rng = random.Random(seed)
    tasks = [make_mix_task(kind, rng) for kind in MIX_KINDS for _ in range(per_kind)]
    rng.shuffle(tasks)
    with open(path, "w") as f:
        for t in tasks:
            row = dict(kind=t.kind, train_inputs=t.train_inputs, train_outputs=t.train_outputs)
            row.update(test_inputs=t.test_inputs, test_outputs=t.test_outputs)
            f.write(json.dumps(row) + "\n")
    return tasks


# ----------------------------------------------------------------------------------------------
# Watching a program run


def show_run(program, inputs):
    """A readable trace of `program` on `inputs`: one line per executed step, then the outcome."""
    if isinstance(program, str):
        program = program.split()
    trace = []
    result, error = execute(program, inputs, trace)
    rows = [f"program: {' '.join(program)}   inputs: {inputs}", "step  line  instruction  acc  mem"]
    for step, (line, instr, acc, mem) in enumerate(trace, 1):
        rows.append(f"{step:4d}  {line:4d}  {instr:11s}  {acc:3d}  {mem}")
    if error:
        kind = "syntax error" if result == "S" else "runtime error"
        rows.append(f"outcome {result} ({kind}): {error}")
    else:
        rows.append(f"outcome: halted, output {result}")
    return "\n".join(rows)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--mix":
        tasks = write_mix(sys.argv[2])
        sys.exit(print(f"wrote {len(tasks)} tasks of {len(MIX_KINDS)} kinds to {sys.argv[2]}"))
    if len(sys.argv) < 3:
        sys.exit('usage: python lmc.py "PROGRAM" INPUT [INPUT ...]   e.g. "ADD 0 HLT" 3 5')
    try:
        values = [int(x) for x in sys.argv[2:]]
    except ValueError:
        sys.exit(f"error: inputs must be integers, got {' '.join(sys.argv[2:])}")
    if len(values) > 10:
        sys.exit("error: at most 10 inputs (the accumulator, then memory cells 0..8)")
    print(show_run(sys.argv[1], values))

"""Tests for lmc.py and exit.py: plain pytest functions, one property each, hand-computed
expectations. Run with `python -m pytest -q test_exit.py` (well under two minutes on 2 cores)."""

import json

import pytest

import lmc
from lmc import run, score


def P(text):
    """A program from its text: "ADD 0 HLT" -> ["ADD", "0", "HLT"]."""
    return text.split()


# ----------------------------------------------------------------------------------------------
# The machine: every opcode, every error class

OPCODE_CASES = [
    # program, inputs, expected output  (acc = inputs[0], mem[0..] = inputs[1..])
    ("ADD 1 HLT", [3, 4, 5], 8),
    ("SUB 0 HLT", [3, 4, 5], -1),
    ("ADDL 7 HLT", [3], 10),
    ("SUBL 7 HLT", [3], -4),
    ("LDA 1 HLT", [3, 4, 5], 5),
    ("LDA 9 HLT", [3, 4], 0),  # cells beyond the inputs hold 0
    ("LDL 6 HLT", [3], 6),
    ("STA 2 LDL 0 ADD 2 HLT", [3], 3),
    ("BRA 5 ADDL 1 HLT", [3], 3),  # jumps over ADDL 1 to line 5
    ("BRZ 5 ADDL 1 HLT", [0], 0),  # taken on zero
    ("BRZ 5 ADDL 1 HLT", [2], 3),  # not taken otherwise
    ("BRP 5 ADDL 1 HLT", [2], 2),  # taken on a positive accumulator
    ("BRP 5 ADDL 1 HLT", [0], 1),  # not taken on zero: BRP is strictly positive
    ("BRP 5 ADDL 1 HLT", [-1], 0),
    ("HLT", [7, 1], 7),
]


@pytest.mark.parametrize("text,inputs,expected", OPCODE_CASES)
def test_opcodes(text, inputs, expected):
    assert run(P(text), inputs) == expected


ERROR_CASES = [
    ("0 HLT", "S"),  # operand where an opcode should be
    ("ADD", "S"),  # missing operand at the end
    ("ADD HLT", "S"),  # missing operand before HLT
    ("HLT 0", "S"),  # HLT takes no operand
    ("ADD 0", "S"),  # does not end with HLT
    ("", "S"),  # empty
    ("ADD 0 STA HLT", "S"),
    ("BRA 0 HLT", "R"),  # jump to line 0
    ("BRA 9 HLT", "R"),  # past the end (3 lines)
    ("BRA 2 HLT", "R"),  # onto an operand line
    ("BRA 1 HLT", "R"),  # endless loop: over 100 steps
]


@pytest.mark.parametrize("text,expected", ERROR_CASES)
def test_error_classes(text, expected):
    assert run(P(text), [1, 2]) == expected


def test_int32_overflow_is_runtime_error():
    # doubling 1 thirty-one times leaves int32; thirty times stays inside (2**30)
    double = "STA 0 ADD 0 "
    assert run(P(double * 30 + "HLT"), [1]) == 2**30
    assert run(P(double * 31 + "HLT"), [1]) == "R"
    assert run(P("SUBL 1 HLT"), [lmc.INT32_MIN]) == "R"


def test_step_limit_boundary():
    # "SUBL 1 BRP 1 HLT" on input x runs x loops of 2 steps, then HLT: 2x + 1 steps in all
    loop = P("SUBL 1 BRP 1 HLT")
    assert run(loop, [49]) == 0  # 99 steps
    assert run(loop, [50]) == "R"  # 101 steps
    # exactly 100 steps is allowed: LDL 0 first, then 49 loops of 2, then HLT
    exact = P("LDA 0 SUBL 1 BRP 3 HLT")
    assert run(exact, [0, 49]) == 0  # 1 + 2*49 + 1 = 100 steps
    assert run(exact, [0, 50]) == "R"  # 102 steps


def test_paper_countdown_example():
    # appendix A (operands are single digits, so LDL 9): counts 9 down to 0, then halts
    assert run(P("LDL 1 STA 0 LDL 9 SUB 0 BRP 7 HLT"), [3, 5]) == 0


def test_paper_infinite_loop_example():
    # appendix A: loops until the accumulator reaches zero, which only a negative input does
    program = P("ADDL 1 BRZ 7 BRA 1 HLT")
    assert run(program, [5]) == "R"
    assert run(program, [-3]) == 0


def test_trace_names_steps_and_errors():
    text = lmc.show_run("ADD 0 HLT", [3, 5])
    assert "ADD 0" in text and "output 8" in text
    assert "line 1" in lmc.show_run("BRA 0 HLT", [1]) and "runtime error" in lmc.show_run(
        "BRA 0 HLT", [1]
    )
    assert "syntax error" in lmc.show_run("ADD HLT", [1])


# ----------------------------------------------------------------------------------------------
# Outcome and reward


@pytest.mark.parametrize(
    "text,outcome,reward",
    [
        ("ADD 0", "T", -2.0),  # never reached HLT: truncated
        ("ADD HLT", "S", -1.0),
        ("BRA 0 HLT", "R", -1.0),
        ("HLT", "3", 1 / 3),  # right only where the second input is 0
        ("ADD 0 ADD 1 HLT", "6", 2 / 3),  # wrong on the 4-input example
        ("ADD 0 ADD 1 ADD 2 HLT", "9", 1.0),
        ("LDL 0 HLT", "0", 0.0),
    ],
)
def test_score(text, outcome, reward):
    inputs = [[4, 0], [1, 2, 3], [1, 1, 1, 1]]
    outputs = [4, 6, 4]
    assert score(P(text), inputs, outputs) == (outcome, pytest.approx(reward))


def test_runtime_error_on_any_input_is_R():
    # SUB 0 BRZ 7 ... jumps to line 7 (past the end) only when the first two inputs are equal
    program = P("SUB 0 BRZ 7 HLT")
    assert score(program, [[3, 1]], [2]) == ("9", 1.0)
    assert score(program, [[3, 1], [2, 2]], [2, 0]) == ("R", -1.0)


def test_outcome_reward():
    assert lmc.outcome_reward("T") == -2 and lmc.outcome_reward("S") == -1
    assert lmc.outcome_reward("9") == 1.0 and lmc.outcome_reward("0") == 0.0


def test_code_units():
    assert len(lmc.CODE_UNITS) == 21 and lmc.CODE_UNITS[0] == "ADD"
    assert lmc.CODE_UNITS[10] == "HLT" and lmc.CODE_UNITS[11:] == tuple("0123456789")


# ----------------------------------------------------------------------------------------------
# Task generators


def test_add_tasks_deterministic_and_solved_by_add_k():
    tasks = lmc.make_tasks("add4", 50, seed=3)
    assert tasks == lmc.make_tasks("add4", 50, seed=3)
    assert tasks != lmc.make_tasks("add4", 50, seed=4)
    assert {len(t.train_inputs[0]) for t in tasks} == {2, 3, 4}
    for t in tasks:
        assert len(t.train_inputs) == len(t.test_inputs) == 3
        # the task's own add-k program and the add-4 program both solve it
        for program in (t.program, lmc.add_program(4)):
            assert score(program, t.test_inputs, t.test_outputs) == ("9", 1.0)
            assert score(program, t.train_inputs, t.train_outputs) == ("9", 1.0)


def test_add_program_shape():
    assert lmc.add_program(4) == ("ADD", "0", "ADD", "1", "ADD", "2", "HLT")


def test_random_tasks_deterministic_and_reproducible():
    tasks = lmc.make_tasks("random", 100, seed=0)
    assert tasks == lmc.make_tasks("random", 100, seed=0)
    for t in tasks:
        n = len(t.train_inputs[0])
        assert 2 <= n <= 8 and len(t.train_inputs) == len(t.test_inputs) == 4
        assert all(1 <= x <= 9 for xs in t.train_inputs + t.test_inputs for x in xs)
        assert len(t.program) >= 2 * (n - 1) + 1 and t.program[-1] == "HLT"
        assert all(int(u) <= n - 2 for u in t.program[1:-1:2])  # operands in 0..n-2
        # the program runs without error on all 8 inputs and reproduces every output
        for inputs, outputs in ((t.train_inputs, t.train_outputs), (t.test_inputs, t.test_outputs)):
            assert [run(t.program, x) for x in inputs] == outputs


def test_unknown_task_name():
    with pytest.raises(ValueError, match="unknown task 'add1'"):
        lmc.make_tasks("add1", 3, 0)
    with pytest.raises(ValueError, match="unknown task 'mul4'"):
        lmc.make_tasks("mul4", 3, 0)


def test_task_file_roundtrip(tmp_path):
    path = tmp_path / "tasks.jsonl"
    row = {"train_inputs": [[3, 5], [4, 8]], "train_outputs": [8, 12],
           "test_inputs": [[10, 1]], "test_outputs": [11]}
    path.write_text(json.dumps(row) + "\n\n" + json.dumps(row) + "\n")
    tasks = lmc.make_tasks(str(path), None, 0)
    assert len(tasks) == 2 and tasks[0].test_outputs == [11] and tasks[0].program is None


@pytest.mark.parametrize(
    "line,message",
    [
        ("{not json", "line 2"),
        ("[1, 2]", "expected a JSON object"),
        ('{"train_inputs": [[1]], "train_outputs": [1]}', "missing key"),
        ('{"train_inputs": [[1]], "train_outputs": [1, 2], "test_inputs": [[1]], '
         '"test_outputs": [1]}', "1 train_inputs but 2 train_outputs"),
        ('{"train_inputs": [[1.5]], "train_outputs": [1], "test_inputs": [[1]], '
         '"test_outputs": [1]}', "list of 1..10 int32s"),
        ('{"train_inputs": [[1]], "train_outputs": ["1"], "test_inputs": [[1]], '
         '"test_outputs": [1]}', "must be an int32"),
        ('{"train_inputs": [], "train_outputs": [], "test_inputs": [[1]], '
         '"test_outputs": [1]}', "non-empty"),
    ],
)
def test_task_file_errors_name_the_line(tmp_path, line, message):
    good = ('{"train_inputs": [[1]], "train_outputs": [1], "test_inputs": [[1]], '
            '"test_outputs": [1]}')
    path = tmp_path / "bad.jsonl"
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message) as info:
        lmc.make_tasks(str(path), None, 0)
    assert "line 2" in str(info.value)


def test_task_file_missing_or_empty(tmp_path):
    with pytest.raises(ValueError, match="cannot read task file"):
        lmc.make_tasks(str(tmp_path / "nope.jsonl"), None, 0)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no tasks"):
        lmc.make_tasks(str(tmp_path / "empty.jsonl"), None, 0)

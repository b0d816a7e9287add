"""Tests for lmc.py and exit.py: plain pytest functions, one property each, hand-computed
expectations. Run with `python -m pytest -q test_exit.py` (well under two minutes on 2 cores)."""

import collections
import json
import os
import sys

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
    row = {
        "train_inputs": [[3, 5], [4, 8]],
        "train_outputs": [8, 12],
        "test_inputs": [[10, 1]],
        "test_outputs": [11],
    }
    path.write_text(json.dumps(row) + "\n\n" + json.dumps(row) + "\n")
    tasks = lmc.make_tasks(str(path), None, 0)
    assert len(tasks) == 2 and tasks[0].test_outputs == [11] and tasks[0].program is None


@pytest.mark.parametrize(
    "line,message",
    [
        ("{not json", "line 2"),
        ("[1, 2]", "expected a JSON object"),
        ('{"train_inputs": [[1]], "train_outputs": [1]}', "missing key"),
        (
            '{"train_inputs": [[1]], "train_outputs": [1, 2], "test_inputs": [[1]], '
            '"test_outputs": [1]}',
            "1 train_inputs but 2 train_outputs",
        ),
        (
            '{"train_inputs": [[1.5]], "train_outputs": [1], "test_inputs": [[1]], '
            '"test_outputs": [1]}',
            "list of 1..10 int32s",
        ),
        (
            '{"train_inputs": [[1]], "train_outputs": ["1"], "test_inputs": [[1]], '
            '"test_outputs": [1]}',
            "must be an int32",
        ),
        (
            '{"train_inputs": [], "train_outputs": [], "test_inputs": [[1]], '
            '"test_outputs": [1]}',
            "non-empty",
        ),
    ],
)
def test_task_file_errors_name_the_line(tmp_path, line, message):
    good = (
        '{"train_inputs": [[1]], "train_outputs": [1], "test_inputs": [[1]], '
        '"test_outputs": [1]}'
    )
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


# ----------------------------------------------------------------------------------------------
# exit.py: tokenization, model, policy and value

import torch  # noqa: E402

import exit as ex  # noqa: E402

TASK = lmc.Task([[3, 5], [4, 8]], [8, 12], [[10, 1]], [11], None)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return ex.Transformer(dim=32, n_layers=2, n_heads=2).eval()


def full_logits(model, text):
    ids = torch.tensor([list(text)])
    return model(ids, torch.arange(ids.shape[1])[None])[0]  # (T, V)


def test_outcome_slot_does_not_leak():
    # the same program with different outcomes: identical model inputs, different targets
    x9, pol9, out9 = ex.encode_trajectory(TASK, P("ADD 0 HLT"), "9")
    xT, polT, outT = ex.encode_trajectory(TASK, P("ADD 0 HLT"), "T")
    assert x9 == xT and pol9 == polT and out9 != outT
    assert bytes(x9).endswith(b"\nO:? A:ADD O:? A:0 O:? A:HLT")


def test_encoding_targets():
    x, y_policy, y_outcome = ex.encode_trajectory(TASK, P("ADD 0 HLT"), "6")
    assert bytes(b for b in y_policy if b >= 0) == b"ADD 0 HLT "  # unit bytes and their spaces
    assert [b for b in y_outcome if b >= 0] == [ord("6")] * 3  # one outcome slot per action
    prompt = len(ex.prompt_bytes(TASK))
    assert all(t == -1 for t in y_policy[: prompt - 1] + y_outcome[: prompt - 1])  # no prompt loss
    i = y_outcome.index(ord("6"))
    # the position that reads the masked slot "?" of "O:?" predicts the outcome
    assert x[i] == ord("?") and x[i - 2 : i] == [ord("O"), ord(":")]


def test_unit_logits_hand_computation():
    # with all next-byte logits equal, each trie branch splits evenly: 15 first bytes
    # (A S L B H 0..9); after A only D; after ADD " " or L; after S: U or T; after BR: A Z P
    u = ex.unit_logits(torch.zeros(1, 1 + ex.N_TRIE, 256))[0].exp()
    p = dict(zip(lmc.CODE_UNITS, u.tolist()))
    assert p["HLT"] == pytest.approx(1 / 15) and p["7"] == pytest.approx(1 / 15)
    assert p["ADD"] == pytest.approx(1 / 30) and p["ADDL"] == pytest.approx(1 / 30)
    assert p["SUB"] == pytest.approx(1 / 60) and p["STA"] == pytest.approx(1 / 30)
    assert p["BRZ"] == pytest.approx(1 / 45) and sum(p.values()) == pytest.approx(1.0)


def test_policy_eq1_matches_full_forward():
    # eq. 1 by hand from plain forward passes over the literal strings, against the cached,
    # tree-masked batch call that search uses
    model = tiny_model()
    tasks = [TASK, lmc.Task([[1, 2, 3]], [6], [[1, 1, 1]], [3], None)]
    cache = ex.prefill(model, tasks, "cpu")
    ex.extend(model, cache, [("",), ("",)], store=True)
    prior, values, _ = ex.extend(model, cache, [("ADD",), ("7",)], store=True)
    units_by_byte = [u.encode() + b" " for u in lmc.CODE_UNITS]
    for row, (task, first) in enumerate(zip(tasks, ["ADD", "7"])):
        text = ex.prompt_bytes(task) + b"O:? A:" + first.encode() + b" O:? A:"
        for a, ub in enumerate(units_by_byte):
            logits = full_logits(model, text + ub[:-1])
            u = 0.0
            for k in range(len(ub)):  # each byte, normalised over the bytes a unit may take here
                allowed = sorted({w[k] for w in units_by_byte if w[:k] == ub[:k]})
                row_logits = logits[len(text) - 1 + k]
                u += (row_logits[ub[k]] - torch.logsumexp(row_logits[allowed], 0)).item()
            assert prior[row, a].item() == pytest.approx(u, abs=1e-4)
        value, _ = ex.outcome_value(full_logits(model, text)[len(text) - 4][None])
        assert values[row].item() == pytest.approx(value.item(), abs=1e-5)


def test_lookahead_with_padded_paths_matches_full_forward():
    model = tiny_model(1)
    cache = ex.prefill(model, [TASK, TASK], "cpu")
    ex.extend(model, cache, [("",), ("",)], store=True)
    length = cache.length
    _, values, _ = ex.extend(model, cache, [(None, "HLT"), ("LDA", "3")], store=False)
    assert cache.length == length  # looking ahead leaves the cache as it was
    for row, path in enumerate([["HLT"], ["LDA", "3"]]):
        text = ex.prompt_bytes(TASK) + b"O:? A:" + b"".join(u.encode() + b" O:? A:" for u in path)
        value, _ = ex.outcome_value(full_logits(model, text)[len(text) - 4][None])
        assert values[row].item() == pytest.approx(value.item(), abs=1e-5)


def test_tree_cache_leaves_match_reading_the_whole_path():
    # each leaf reads one step over its ancestors' stored steps; the same numbers as extend,
    # which reads the whole path below the root; two leaves a call, shallow and deep mixed,
    # rows skipped, and more leaves than the first slots hold
    model = tiny_model(2)
    cache = ex.prefill(model, [TASK, TASK], "cpu")
    ex.extend(model, cache, [("",), ("",)], store=True)
    ex.extend(model, cache, [("ADD",), ("LDA",)], store=True)
    tree = ex.TreeCache(model, cache, capacity=2)
    calls = [
        [(0, ("0",)), (1, ("3",))],
        [(0, ("0", "SUB")), (1, ("4",))],
        [(0, ("0", "SUB", "1")), (1, ("3", "HLT"))],
        [(1, ("3", "ADD"))],
    ]
    for leaves in calls:
        prior, values = tree.read(model, leaves)
        for j, (row, path) in enumerate(leaves):
            alone = ex.prefill(model, [TASK], "cpu")
            ex.extend(model, alone, [("",)], store=True)
            ex.extend(model, alone, [(["ADD", "LDA"][row],)], store=True)
            p, v, _ = ex.extend(model, alone, [path], store=False)
            assert torch.allclose(prior[j], p[0], atol=1e-4)
            assert values[j].item() == pytest.approx(v[0].item(), abs=1e-5)
    assert tree.pool[0].shape[0] > 3  # it grew
    tree.clear()
    assert not tree.nodes


def test_value_is_expected_reward():
    logits = torch.full((3, 256), -1e9)
    logits[0, ord("9")] = 0  # certain success
    logits[1, ord("T")] = 0  # certain truncation
    logits[2, ord("9")] = logits[2, ord("S")] = 0  # half success, half syntax error
    values, probs = ex.outcome_value(logits)
    assert values.tolist() == pytest.approx([1.0, -2.0, 0.0])
    assert probs.sum(-1).tolist() == pytest.approx([1.0] * 3)


def test_model_is_causal():
    model = tiny_model()
    a = torch.tensor([list(b"inputs=[[1, 2]]outputs=[3]\nO:? A:ADD ")])
    b = a.clone()
    b[0, -3:] = torch.tensor(list(b"HLT"))
    pos = torch.arange(a.shape[1])[None]
    la, lb = model(a, pos), model(b, pos)
    assert torch.allclose(la[0, :-3], lb[0, :-3], atol=1e-6)
    assert not torch.allclose(la[0, -1], lb[0, -1])


def test_rope_rotates_each_channel_pair_by_its_angle():
    torch.manual_seed(0)
    x, angles = (
        torch.randn(2, 3, 5, 8),
        torch.rand(2, 1, 5, 4) * 6,
    )  # (B, H, T, hd), (B, 1, T, hd/2)
    cos, sin = angles.cos(), angles.sin()
    y = ex.apply_rope(x, cos, sin)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    assert torch.allclose(y[..., 0::2], x1 * cos - x2 * sin, atol=1e-6)
    assert torch.allclose(y[..., 1::2], x1 * sin + x2 * cos, atol=1e-6)


def test_cache_select_keeps_rows_in_order_with_repeats():
    model = tiny_model()
    cache = ex.prefill(model, [TASK, lmc.Task([[7, 1, 5]], [13], [[2, 2, 2]], [6], None)], "cpu")
    ex.extend(model, cache, [("",), ("",)], store=True)
    before = [t.clone() for t in cache.k + cache.v] + [cache.visible, cache.next_pos]
    for rows in ([1, 0, 0, 1, 1], [4, 1]):  # grow, then shrink into the reused tensors
        cache.select(rows)
        before = [t[rows] for t in before]
        n = cache.length
        after = [t[:, :, :n] for t in cache.k + cache.v] + [cache.visible, cache.next_pos]
        assert all(
            torch.equal(a, b[:, :, :n] if b.dim() == 4 else b) for a, b in zip(after, before)
        )
    assert cache.next_pos[0] < cache.next_pos[1]  # row 0 now holds the shorter prompt


def test_parameter_count_is_papers():
    n = sum(p.numel() for p in ex.Transformer().parameters())
    assert 3.4e6 < n < 3.7e6  # paper 3.1: about 3.6M


def test_choose_units_greedy_and_epsilon():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0] * 10 + [5.0] + [0.0] * 10])
    assert ex.choose_units(logits.repeat(4, 1), 0.0, 0.0, g) == [10] * 4
    picks = ex.choose_units(logits.repeat(2000, 1), 0.0, 1.0, g)  # epsilon 1: uniform
    assert 60 < picks.count(10) < 140 and len(set(picks)) == 21


def test_choose_units_keeps_to_the_valid_units():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0] * 10 + [5.0] + [0.0] * 10]).repeat(2000, 1)
    invalid = torch.tensor(ex.syntax_errors(["ADD"])).repeat(2000, 1)  # opcodes, HLT too
    assert set(ex.choose_units(logits[:4], 0.0, 0.0, g, invalid[:4])) < set(range(11, 21))
    picks = ex.choose_units(logits, 0.0, 1.0, g, invalid)  # epsilon 1: uniform over operands
    assert set(picks) == set(range(11, 21)) and 140 < picks.count(11) < 260


def test_rollouts_are_well_formed():
    # untrained, greedy with half the units uniformly random, at temperature 3: never an S
    programs = ex.rollout(tiny_model(), [TASK] * 4, 16, 0.0, 0.5, torch.Generator().manual_seed(0))
    programs += ex.rollout(tiny_model(), [TASK] * 4, 16, 3.0, 0.0, torch.Generator().manual_seed(0))

    def well_formed(p):  # no unit is one that syntax_errors rules out after what precedes it
        return not any(ex.syntax_errors(p[:i])[ex.CODE_UNITS.index(p[i])] for i in range(len(p)))

    assert all(well_formed(p) for p in programs)
    assert all(lmc.score(p, TASK.train_inputs, TASK.train_outputs)[0] != "S" for p in programs)


# ----------------------------------------------------------------------------------------------
# Search, replay and training


def test_rollout_programs_end_at_hlt_or_max_length():
    programs = ex.rollout(tiny_model(), [TASK] * 3, 4, 1.0, 0.0, torch.Generator().manual_seed(0))
    assert len(programs) == 12
    for p in programs:
        assert p[-1] == "HLT" or len(p) == lmc.MAX_LENGTH
        assert "HLT" not in p[:-1] and len(p) <= lmc.MAX_LENGTH


def test_rollouts_in_one_state_are_read_once():
    model = tiny_model()
    one = ex.rollout(model, [TASK, TASK], 1, 0.0, 0.0, torch.Generator())  # greedy
    tokens = model.tokens
    many = ex.rollout(model, [TASK, TASK], 50, 0.0, 0.0, torch.Generator())
    assert many == [one[0]] * 50 + [one[1]] * 50
    assert model.tokens - tokens == tokens  # 50 greedy rollouts cost what one does


def test_rollout_rows_stay_with_their_states_when_others_finish():
    # greedy programs of many tasks at once, where programs end at different steps and the
    # rollout moves states from the end into the rows they free, against each task alone
    model = tiny_model()
    with torch.no_grad():  # larger weights than the init's: each prompt leads somewhere else
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 3.0 / p.shape[1] ** 0.5)
    tasks = lmc.make_tasks("add4", 24, "rows")
    together = ex.rollout(model, tasks, 1, 0.0, 0.0, torch.Generator())
    alone = [ex.rollout(model, [t], 1, 0.0, 0.0, torch.Generator())[0] for t in tasks]
    assert together == alone
    assert len({len(p) for p in alone}) > 2  # finished at several different steps


def test_rollout_draws_each_unit_from_its_states_policy(monkeypatch):
    monkeypatch.setattr(ex, "done", lambda program: len(program) == 1)  # stop after one unit
    model, n, temperature = tiny_model(), 4000, 2.0
    programs = ex.rollout(model, [TASK], n, temperature, 0.0, torch.Generator().manual_seed(0))
    prior = ex.extend(model, ex.prefill(model, [TASK], "cpu"), [("",)], store=True)[0]
    operands = torch.tensor(ex.syntax_errors([]))  # the grammar: a program starts with an opcode
    expected = (prior[0] / temperature).masked_fill(operands, float("-inf")).softmax(-1)
    first = collections.Counter(p[0] for p in programs)
    seen = torch.tensor([first[u] / n for u in ex.CODE_UNITS])
    assert (seen - expected).abs().max() < 0.02  # six standard errors at n = 4000


def test_filter_best_filters_on_train_pairs():
    # train pairs say "add"; the hidden test pair is never consulted by the filter
    task = lmc.Task([[3, 5], [4, 8]], [8, 12], [[1, 1]], [999], None)
    programs = [P("HLT"), P("ADD 0 ADDL 0 HLT"), P("ADD 0 HLT"), P("BRA 0 HLT")]
    assert ex.filter_best(task, programs) == P("ADD 0 HLT")  # the shorter of the two


def test_filter_best_ties_go_to_the_shortest_then_the_most_written():
    task = lmc.Task([[3, 5, 0]], [8], [[1, 1, 0]], [2], None)
    one, two = P("ADD 0 ADD 1 HLT"), P("ADD 1 ADD 0 HLT")
    padded = P("ADD 0 ADD 1 ADD 2 HLT")
    assert ex.filter_best(task, [padded] * 5 + [one, two, two]) == two  # written twice
    assert ex.filter_best(task, [padded] * 5 + [one, two, one]) == one
    assert ex.filter_best(task, [padded] * 5 + [two, one]) == two  # then the first written


def test_sample_and_filter_keeps_each_tasks_best():
    args = argparse_namespace(num_rollouts=6, gen_temperature=1.5)
    tasks = lmc.make_tasks("add2", 3, 0)
    generator = torch.Generator().manual_seed(1)
    best, written, executed = ex.sample_and_filter(tiny_model(), tasks, args, generator)
    assert executed == 3 * 6
    samples = ex.rollout(tiny_model(), tasks, 6, 1.5, 0.0, torch.Generator().manual_seed(1))
    assert len(best) == 3 and written == [samples[i * 6 : (i + 1) * 6] for i in range(3)]
    for i, task in enumerate(tasks):
        assert best[i] == ex.filter_best(task, written[i])


def test_solved_by_group_splits_by_number_of_inputs_or_kind():
    tasks = [lmc.Task([[1, 2]], [3], [[1, 1]], [2])] * 2 + [lmc.Task([[1, 2, 3]], [6], [[1]], [1])]
    assert ex.solved_by_group(tasks, ["9", "3", "9"]) == {2: (0.5, 2), 3: (1.0, 1)}
    kinds = [lmc.Task([[1]], [1], [[1]], [1], kind=k) for k in ("max", "min", "max")]
    assert ex.solved_by_group(kinds, ["9", "9", "0"]) == {"max": (0.5, 2), "min": (1.0, 1)}


def argparse_namespace(**kw):
    import argparse

    return argparse.Namespace(**kw)


def test_priority_is_the_reward_plus_a_little():
    # the paper's rule: the stored program's reward on the hidden test pairs, plus 0.01
    task = lmc.Task([[8, 6], [7, 2]], [14, 9], [[5, 1], [3, 1], [5, 2]], [6, 4, 7])
    reward = lambda p: lmc.score(P(p), task.test_inputs, task.test_outputs)[1]  # noqa: E731
    assert ex.priority(reward("ADD 0 HLT")) == pytest.approx(1.01)
    assert ex.priority(reward("ADDL 1 HLT")) == pytest.approx(2 / 3 + 0.01)  # 2 of 3 pairs
    assert ex.priority(reward("LDL 0 HLT")) == pytest.approx(0.01)
    assert ex.priority(reward("ADD")) == pytest.approx(0.01)  # errors too


def test_higher_priority_drawn_more_often():
    buffer = ex.ReplayBuffer()
    buffer.add("good", 9.0, 0)
    buffer.add("partial", 1.0, 0)
    draws = buffer.sample(5000, torch.Generator().manual_seed(0))
    assert 7 < draws.count("good") / draws.count("partial") < 11


def test_replay_buffer_ages_out_old_iterations():
    buffer = ex.ReplayBuffer()
    for i in range(5):  # iterations 0 0 1 1 2
        buffer.add((TASK, P(f"LDL {i} HLT"), "0"), float(i), iteration=i // 2)
    buffer.age_out(1)
    assert [p for _, p, _ in buffer.items] == [P(f"LDL {i} HLT") for i in (2, 3, 4)]
    assert buffer.priorities == [2, 3, 4]
    assert ex.restore_buffer(ex.buffer_state(buffer)).iterations == [1, 1, 2]


def test_training_pieces_give_the_loss_and_gradient_of_one_block(monkeypatch):
    # a batch cut into length-sorted pieces trains exactly as the same batch in one block
    tasks = lmc.make_tasks("add4", 5, "pieces")
    trajectories = [(t, P("ADD 0 " * (k + 1) + "HLT"), "9") for k, t in enumerate(tasks)]
    results = []
    for piece in (100, 2, 1):
        monkeypatch.setattr(ex, "PIECE", piece)
        batch = ex.make_batch(trajectories, "policy", "cpu")
        assert len(batch) == {100: 1, 2: 2, 1: 5}[piece]
        model = tiny_model().train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        loss = ex.train_step(model, optimizer, batch, batch)
        results.append((loss, [p.grad.clone() for p in model.parameters()]))
    for loss, grads in results[1:]:
        assert loss == pytest.approx(results[0][0], rel=1e-5)
        assert all(torch.allclose(g, g0, atol=1e-6) for g, g0 in zip(grads, results[0][1]))


def test_reinforce_weighs_each_sample_by_its_reward_minus_its_tasks_mean():
    solved, wrong = lmc.Task([[3, 5]], [8], [[1, 1]], [2]), lmc.Task([[3, 5]], [0], [[1, 1]], [1])
    written = [[P("ADD 0 HLT"), P("HLT")], [P("HLT"), P("HLT")]]
    items = ex.reinforce_items([solved, wrong], written)
    # solved: rewards 1 and 0 around their mean 0.5; wrong: both 0, so no signal at all
    assert [a for _, a in items] == [0.5, -0.5, 0.0, 0.0]
    assert items[0][0] == (solved, ("ADD", "0", "HLT"), "9")


def test_reinforce_step_makes_the_better_program_likelier():
    task = lmc.Task([[3, 5]], [8], [[1, 1]], [2])
    good, bad = P("ADD 0 HLT"), P("SUB 0 HLT")
    items = ex.reinforce_items([task], [[good, bad]])
    model = tiny_model().train()

    def logp(program):  # minus the policy loss of one program: its mean log-probability
        return -ex.train_step(
            model, opt0, ex.make_batch([(task, program, "9")], "policy", "cpu"), None
        )[0]

    opt0 = torch.optim.SGD(model.parameters(), lr=0.0)
    before = logp(good), logp(bad)
    batch = ex.make_batch([t for t, _ in items], "policy", "cpu", [a for _, a in items])
    ex.train_step(model, torch.optim.SGD(model.parameters(), lr=0.5), batch, None)
    assert logp(good) > before[0] and logp(bad) < before[1]


def test_enumeration_returns_the_shortest_program_and_counts_every_run():
    first = lmc.Task([[3, 5], [4, 2]], [3, 4], [[1, 1]], [1])
    assert ex.enumerate_programs(first, 10) == (P("HLT"), 1)
    add = lmc.Task([[3, 5], [4, 2]], [8, 6], [[1, 1]], [2])
    assert ex.enumerate_programs(add, 10) == (P("ADD 0 HLT"), 2)  # HLT, then ADD 0 HLT
    # HLT, ADD 0, ADD 1 (ADD 2..9 leave the same states as ADD 1: dropped), then SUB 0
    sub = lmc.Task([[3, 5], [4, 2]], [-2, 2], [[1, 1]], [0])
    assert ex.enumerate_programs(sub, 10) == (P("SUB 0 HLT"), 4)
    assert ex.enumerate_programs(sub, 3) == (P("HLT"), 3)  # out of budget: the first best
    add4 = lmc.make_tasks("add4", 20, 0)
    for task in add4:
        program, executed = ex.enumerate_programs(task, 10_000)
        assert lmc.score(program, task.train_inputs, task.train_outputs)[1] == 1.0
        assert len(program) <= len(task.program)


def test_enumeration_follows_forward_jumps_as_the_machine_does():
    relu = lmc.Task([[-3], [4], [0], [-1]], [0, 4, 0, 0], [[2]], [2])
    program, _ = ex.enumerate_programs(relu, 100_000)
    assert len(program) == 5  # BRP jumps over a literal load: BRP 5 LDL 0 HLT
    assert [lmc.run(program, x) for x in relu.train_inputs] == relu.train_outputs


def test_training_overfits_a_fixed_batch():
    model = tiny_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    other = lmc.Task([[7, 7, 7]], [0], [[1, 1, 1]], [0], None)  # a different prompt
    trajectories = [(TASK, P("ADD 0 HLT"), "9"), (other, P("LDL 5 SUB 0 HLT"), "0")]
    policy_batch = ex.make_batch(trajectories, "policy", "cpu")
    outcome_batch = ex.make_batch(trajectories, "outcome", "cpu")
    first = ex.train_step(model, optimizer, policy_batch, outcome_batch)
    for _ in range(60):
        last = ex.train_step(model, optimizer, policy_batch, outcome_batch)
    assert last[0] < first[0] / 10 and last[1] < first[1] / 10


# ----------------------------------------------------------------------------------------------
# The command line: a tiny run end to end, resume, evaluation and the error paths

TINY = [
    "--num_tasks",
    "2",
    "--num_rollouts",
    "2",
    "--num_heldout",
    "3",
    "--train_steps",
    "1",
    "--batch_size",
    "2",
    "--dim",
    "32",
    "--device",
    "cpu",
]


def read_log(path):
    return [json.loads(line) for line in open(path)]


def test_end_to_end_add2_writes_log_checkpoint_and_resumes(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "run")
    ex.main(["--task", "add2", "--max_iters", "2", "--out_dir", out] + TINY)
    rows = read_log(f"{out}/log.jsonl")
    assert [r["iter"] for r in rows] == [0, 1]
    keys = {
        "iter",
        "elapsed_s",
        "flops_search",
        "flops_train",
        "flops",
        "train_solved",
        "heldout_solved",
        "mean_reward",
        "loss_policy",
        "loss_outcome",
        "programs_per_s",
        "tokens_per_s",
    }
    assert keys <= rows[0].keys() and rows[1]["flops"] > rows[0]["flops"] > 0
    assert 0 <= rows[1]["heldout_solved"] <= 1
    assert set(rows[0]["heldout_by"]) == {"2"}  # add2: every task has 2 inputs
    assert rows[0]["heldout_by"]["2"] == rows[0]["heldout_solved"]
    # programs/s counts every program written: 2 tasks x (2 rollouts + 4 outcome episodes)
    assert rows[0]["programs_per_s"] * rows[0]["search_s"] == pytest.approx(12, rel=0.1)
    ex.main(["--task", "add2", "--max_iters", "3", "--out_dir", out, "--resume"] + TINY)
    rows = read_log(f"{out}/log.jsonl")
    assert [r["iter"] for r in rows] == [0, 1, 2] and rows[2]["flops"] > rows[1]["flops"]
    assert "resumed" in capsys.readouterr().out
    # the saved agent can be evaluated on another task family
    ex.main(["--eval", f"{out}/ckpt.pt", "--task", "add3", "--num_heldout", "4", "--device", "cpu"])
    out_eval = capsys.readouterr().out
    assert "held-out add3 tasks" in out_eval and "(by number of inputs: 2: " in out_eval
    assert "one sample at temperature 0.8" in out_eval
    ex.main(["--eval", f"{out}/ckpt.pt", "--num_heldout", "4", "--budgets", "1,4"])
    lines = capsys.readouterr().out.splitlines()
    assert "one sample" in lines[0] and "best of 4 samples" in lines[1]
    # with --search mcts the search writes the submitted programs
    calls, real_mcts = [], ex.gumbel_mcts
    monkeypatch.setattr(ex, "gumbel_mcts", lambda *a, **k: calls.append(1) or real_mcts(*a, **k))
    eval_mcts = ["--search", "mcts", "--num_simulations", "4"]
    ex.main(["--eval", f"{out}/ckpt.pt", "--num_heldout", "4"] + eval_mcts)
    assert calls and "Gumbel MCTS, 4 simulations" in capsys.readouterr().out
    monkeypatch.undo()
    # with --search enum enumeration does, and on add2 its second program is the answer
    enum = ["--task", "add2", "--search", "enum", "--budgets", "2"]
    ex.main(["--eval", f"{out}/ckpt.pt", "--num_heldout", "4"] + enum)
    assert "enumeration, at most 2 programs a task: 100% solved" in capsys.readouterr().out
    # inside the agent: every part is printed, for both searchers
    for search in ("sf", "mcts"):
        ex.main(
            [
                "--show",
                f"{out}/ckpt.pt",
                "--task",
                "add3",
                "--search",
                search,
                "--num_simulations",
                "4",
                "--device",
                "cpu",
            ]
        )
        text = capsys.readouterr().out
        assert text.count("prompt  inputs=") == 3 and text.count("verdict: outcome") == 3
        assert "policy" in text and "value" in text and "outcomes" in text
        assert "step  line  instruction" in text
        assert ("visits" in text and "weight" in text) == (search == "mcts")


def test_a_resumed_run_is_the_run_never_stopped(tmp_path):
    # 3 iterations in one go, and 2 then 1 more after --resume: the same log and the same model
    flags = ["--task", "add2"] + TINY + ["--num_rollouts", "16"]
    ex.main(flags + ["--max_iters", "3", "--out_dir", str(tmp_path / "a")])
    ex.main(flags + ["--max_iters", "2", "--out_dir", str(tmp_path / "b")])
    ex.main(flags + ["--max_iters", "3", "--out_dir", str(tmp_path / "b"), "--resume"])
    clock = {"elapsed_s", "search_s", "train_s", "programs_per_s", "tokens_per_s"}
    clock |= {"train_tokens_per_s", "simulations_per_s"}
    a, b = (read_log(tmp_path / run / "log.jsonl") for run in "ab")
    assert [{k: v for k, v in r.items() if k not in clock} for r in a] == [
        {k: v for k, v in r.items() if k not in clock} for r in b
    ]
    assert a[1]["policy_buffer"] >= 4  # what the checkpoint after iteration 1 holds
    models = [torch.load(tmp_path / run / "ckpt.pt", weights_only=False)["model"] for run in "ab"]
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])


def test_init_starts_a_fresh_run_from_a_saved_agents_weights(tmp_path, capsys):
    flags = ["--max_iters", "1"] + TINY
    ex.main(["--task", "add2", "--out_dir", str(tmp_path / "a")] + flags)
    saved = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=False)["model"]
    seen = []  # the weights the first search of the new run reads
    real = ex.SEARCHERS["sf"]

    def spy(model, *a):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return real(model, *a)

    ex.SEARCHERS["sf"] = spy
    try:
        init = ["--init", str(tmp_path / "a" / "ckpt.pt"), "--dim", "64"]  # the saved dim wins
        ex.main(["--task", "add3", "--out_dir", str(tmp_path / "b")] + flags + init)
    finally:
        ex.SEARCHERS["sf"] = real
    assert all(torch.equal(seen[0][k], saved[k]) for k in saved)
    assert "trained on add2, iteration 0" in capsys.readouterr().out
    rows = read_log(tmp_path / "b" / "log.jsonl")
    assert [r["iter"] for r in rows] == [0] and rows[0]["policy_buffer"] == 2  # a fresh run
    assert "no checkpoint at" in error_line(capsys, ["--init", str(tmp_path / "none.pt")] + flags)


def test_store_keeps_one_program_per_task_for_buffer_iters_iterations(tmp_path, monkeypatch):
    stored = []

    def solve(model, tasks, args, generator):  # ADD 0 HLT (right on add2) and HLT, each twice
        written = [[P("ADD 0 HLT"), P("HLT"), P("ADD 0 HLT"), P("HLT")]] * len(tasks)
        return [P("ADD 0 HLT")] * len(tasks), written, 4 * len(tasks)

    monkeypatch.setitem(ex.SEARCHERS, "sf", solve)
    real_add = ex.ReplayBuffer.add
    monkeypatch.setattr(
        ex.ReplayBuffer, "add", lambda self, x, p, it: stored.append(p) or real_add(self, x, p, it)
    )
    out = str(tmp_path / "store")
    flags = ["--task", "add2", "--max_iters", "3", "--buffer_iters", "2", "--no_train"]
    ex.main(flags + TINY + ["--out_dir", out])
    rows = read_log(f"{out}/log.jsonl")
    # each task's answer alone (2 tasks), kept for 2 iterations; the other samples are not stored
    assert [r["policy_buffer"] for r in rows] == [2, 4, 4]
    assert [r["train_solved"] for r in rows] == [1.0] * 3
    assert stored == pytest.approx([1.01] * 6)
    stored.clear()
    flags[flags.index("--buffer_iters") + 1] = "0"
    ex.main(flags + TINY + ["--out_dir", out + "all"])
    assert [r["policy_buffer"] for r in read_log(f"{out}all/log.jsonl")] == [2, 4, 6]  # keeps all


def same_task(a, b):
    return (a.train_inputs, a.test_inputs) == (b.train_inputs, b.test_inputs)


@pytest.mark.parametrize("task", ["add3", "mix"])
def test_no_heldout_task_ever_enters_a_buffer(tmp_path, task):
    if task == "mix":
        task = str(tmp_path / "mix.jsonl")
        lmc.write_mix(task, per_kind=2)  # 36 tasks: 7 held out, 29 trained on
    out = str(tmp_path / "run")
    ex.main(["--task", task, "--max_iters", "4", "--out_dir", out] + TINY)
    args = ex.check_args(ex.parser.parse_args(["--task", task] + TINY))
    draw, heldout, about = ex.task_source(args)
    state = torch.load(f"{out}/ckpt.pt", weights_only=False)
    buffered = [ex.restore_buffer(state[b]).items for b in ("policy_buffer", "outcome_buffer")]
    buffered = [t for items in buffered for t, _, _ in items]
    assert len(buffered) >= 4 * 2 * 2  # 4 iterations x 2 tasks, in each of the two buffers
    assert not any(same_task(t, h) for t in buffered for h in heldout)
    if task.endswith(".jsonl"):
        assert about == "29 training tasks, 3 held out"  # --num_heldout 3 of the 7 evaluated
        args.num_heldout = 100
        heldout = ex.task_source(args)[1]
        assert len(heldout) == 7 and not any(same_task(t, h) for t in buffered for h in heldout)
        trained = [t for i in range(15) for t in draw(i)]  # 30 draws go round all 29
        everything = lmc.load_task_file(task)
        assert all(any(same_task(t, x) for x in trained + heldout) for t in everything)


def test_task_file_split_is_fixed_and_heldout_file_is_used_whole(tmp_path):
    path, other = str(tmp_path / "mix.jsonl"), str(tmp_path / "other.jsonl")
    lmc.write_mix(path, per_kind=2)
    lmc.write_mix(other, per_kind=1, seed=1)
    args = lambda *more: ex.check_args(ex.parser.parse_args(["--task", path, *more]))  # noqa
    first, again = ex.task_source(args("--seed", "0"))[1], ex.task_source(args("--seed", "5"))[1]
    assert len(first) == 7 and all(same_task(a, b) for a, b in zip(first, again))
    draw, heldout, about = ex.task_source(args("--heldout", other))
    assert about == "36 training tasks, 18 held out"
    assert all(same_task(a, b) for a, b in zip(heldout, lmc.load_task_file(other)))


def test_too_long_prompt_is_a_clear_error_naming_the_line(tmp_path, capsys):
    path = tmp_path / "long.jsonl"
    short = dict(train_inputs=[[1, 2]], train_outputs=[3], test_inputs=[[1]], test_outputs=[1])
    long = dict(short, train_inputs=[[123456789] * 10] * 8, train_outputs=[1] * 8)
    path.write_text("\n".join(json.dumps(t) for t in (short, short, long)) + "\n")
    message = error_line(capsys, ["--task", str(path), "--out_dir", str(tmp_path / "r")])
    assert f"{path} line 3: the prompt is" in message and "the model reads 1024" in message


def test_mix_tasks_are_solved_by_their_reference_programs(tmp_path):
    tasks = lmc.write_mix(str(tmp_path / "mix.jsonl"), per_kind=3)
    assert len(tasks) == 3 * len(lmc.MIX_KINDS) >= 15 * 3
    loaded = lmc.load_task_file(str(tmp_path / "mix.jsonl"))
    for task, back in zip(tasks, loaded):
        assert back.kind == task.kind and same_task(task, back)
        assert len(task.train_inputs) == 4 and len(task.test_inputs) == 3
        pairs = (task.train_inputs + task.test_inputs, task.train_outputs + task.test_outputs)
        assert lmc.score(task.program, *pairs) == ("9", 1.0)
        if any(u.startswith("BR") for u in task.program):  # both sides of the branch shown
            assert len(set(task.train_outputs)) > 1 or task.kind == "max"


def error_line(capsys, argv):
    with pytest.raises(SystemExit) as info:
        ex.main(argv)
    assert info.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1]


def test_error_unknown_task(capsys, tmp_path):
    line = error_line(capsys, ["--task", "mul4", "--out_dir", str(tmp_path)] + TINY)
    assert line.startswith("error: unknown task 'mul4'")


def test_error_bad_flag_values(capsys, tmp_path):
    assert "--num_rollouts must be at least 1" in error_line(
        capsys, ["--num_rollouts", "0", "--out_dir", str(tmp_path)]
    )
    assert "--lr must be positive" in error_line(capsys, ["--lr", "0", "--out_dir", str(tmp_path)])
    assert "invalid int value" in error_line(capsys, ["--num_tasks", "many"])
    assert "--dim must be a positive multiple of 8" in error_line(
        capsys, ["--dim", "12", "--out_dir", str(tmp_path)]
    )
    assert "--buffer_iters must not be negative" in error_line(
        capsys, ["--buffer_iters", "-1", "--out_dir", str(tmp_path)]
    )
    assert "use it with --search sf" in error_line(
        capsys, ["--learner", "pg", "--search", "mcts", "--out_dir", str(tmp_path)]
    )


def test_error_checkpoints(capsys, tmp_path):
    assert "no checkpoint at" in error_line(capsys, ["--resume", "--out_dir", str(tmp_path)])
    bad = tmp_path / "ckpt.pt"
    bad.write_bytes(b"not a checkpoint")
    line = error_line(capsys, ["--eval", str(bad), "--device", "cpu"])
    assert "cannot load checkpoint" in line and "corrupt" in line
    assert "expected one argument" in error_line(capsys, ["--eval"])
    # a snapshot holds weights only: it evaluates, but a run cannot resume from it
    torch.save(dict(model={}, args={}, iteration=0), bad)
    line = error_line(capsys, ["--resume", "--out_dir", str(tmp_path), "--device", "cpu"])
    assert line == f"error: cannot resume {bad}: it has no flops_search (an older exit.py?)"


def test_error_task_file_names_the_line(capsys, tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"train_inputs": [[1]]}\n')
    line = error_line(capsys, ["--task", str(path), "--out_dir", str(tmp_path)] + TINY)
    assert "line 1" in line and "missing key" in line


# ----------------------------------------------------------------------------------------------
# Gumbel MCTS: the search core on hand-made trees (expected values worked out by hand, as mctx
# computes them)

import numpy as np  # noqa: E402


@pytest.mark.parametrize(
    "m,n,expected",
    [
        (4, 16, [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]),
        (16, 32, [0] * 16 + [1] * 8 + [2, 2, 2, 2, 3, 3, 3, 3]),
        (21, 8, [0] * 8),
        (7, 24, [0] * 7 + [1, 1, 1, 2, 2, 2] + [3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8]),
        (1, 5, [0, 1, 2, 3, 4]),
    ],
)
def test_sequential_halving_schedule(m, n, expected):
    assert ex.get_sequence_of_considered_visits(m, n) == expected


def test_sigma_worked_example():
    # every action visited, so completed Q is Q itself (mctx, qtransform_completed_by_mix_value)
    logits = np.array([1.929, 1.196, -0.064, -1.651])
    N, Q = np.array([6.0, 2, 2, 6]), np.array([0.578, -0.437, -0.287, -0.022])
    completed = ex.completed_qvalues(logits, Q, N, raw_value=0.3)
    s = ex.sigma(completed, N, c_visit=50, c_scale=0.1)
    assert s == pytest.approx([5.6, 0.0, 0.827, 2.290], abs=2e-3)
    weights = ex.softmax(logits + s)
    assert weights == pytest.approx([0.996, 0.0018, 0.0011, 0.0010], abs=5e-4)
    # final action: best score among the most-visited actions (0 and 3)
    scores = ex.root_scores(np.zeros(4), logits, s, N, N.max())
    assert np.argmax(scores) == 0 and scores[1] == -np.inf


def test_completed_q_fills_unvisited_with_v_mix():
    # pi uniform; one action visited twice with q 0.5; raw value 0.2:
    # v_mix = (0.2 + 2 * 0.5) / (1 + 2) = 0.4
    completed = ex.completed_qvalues(np.zeros(3), np.array([0.5, 0, 0]), np.array([2.0, 0, 0]), 0.2)
    assert completed == pytest.approx([0.5, 0.4, 0.4])
    s = ex.sigma(completed, np.array([2.0, 0, 0]), 50, 0.1)
    assert s == pytest.approx([5.2, 0.0, 0.0])  # (50 + max N 2) * 0.1 * rescaled
    # a fresh node: no visits, v_mix is the raw value, sigma is 0 everywhere
    fresh = ex.completed_qvalues(np.zeros(3), np.zeros(3), np.zeros(3), -0.7)
    assert fresh == pytest.approx([-0.7] * 3) and ex.sigma(
        fresh, np.zeros(3), 50, 0.1
    ).tolist() == [0, 0, 0]


def test_interior_selection_eq3():
    # softmax([2, 0, 0]) = [0.787, 0.106, 0.106]; minus N / (1 + sum N) = [0.75, 0, 0]
    assert ex.interior_action(np.array([2.0, 0, 0]), np.zeros(3), np.array([3.0, 0, 0])) == 1
    assert ex.interior_action(np.array([2.0, 0, 0]), np.zeros(3), np.zeros(3)) == 0
    # sigma can outweigh the prior
    assert ex.interior_action(np.array([2.0, 0, 0]), np.array([0, 5.0, 0]), np.zeros(3)) == 1
    # visits spread over the valid actions by the prior: 20 visits, logits 0 and -3
    floor, N = np.finfo(np.float64).min, np.zeros(4)
    for _ in range(20):
        N[ex.interior_action(np.array([floor, 0.0, -3.0, floor]), np.zeros(4), N)] += 1
    assert N[1] > N[2] > 0


def bandit_expand(rewards):
    """Every action at the root ends the episode with a fixed reward."""

    def expand(requests):
        return [(np.zeros(len(rewards)), 0.0, rewards[path[0]], True) for _, path in requests]

    return expand


def test_bandit_best_arm_found():
    # four arms, all considered (m = 4): with Gumbel-top-m, m below the number of arms would
    # leave the best arm out of the sampled set now and then, by design
    rewards = [0.1, 0.9, 0.2, 0.3]
    found = 0
    for seed in range(20):
        actions, weights, visits = ex.gumbel_search(
            np.zeros((1, 4)),
            np.zeros(1),
            bandit_expand(rewards),
            num_simulations=12,
            max_num_considered_actions=4,
            generator=torch.Generator().manual_seed(seed),
        )
        found += actions[0] == 1
        assert visits.sum() == 12
    assert found >= 18
    # deterministic search puts the most weight on the best arm
    _, weights, _ = ex.gumbel_search(
        np.zeros((1, 4)), np.zeros(1), bandit_expand(rewards), 12, gumbel_scale=0.0
    )
    assert np.argmax(weights[0]) == 1 and weights[0].sum() == pytest.approx(1.0)


def test_root_mask_rules_actions_out_and_shortens_the_schedule():
    # four arms, the best (1) and another (3) invalid: the two valid arms share the budget as
    # the schedule of m = 2 says, and the invalid ones get no visit and no weight
    rewards = [0.1, 0.9, 0.2, 0.3]
    invalid = np.array([[False, True, False, True]])
    for seed in range(5):
        actions, weights, visits = ex.gumbel_search(
            np.zeros((1, 4)),
            np.zeros(1),
            bandit_expand(rewards),
            num_simulations=8,
            generator=torch.Generator().manual_seed(seed),
            invalid_actions=invalid,
        )
        assert visits[0].tolist() == [4, 0, 4, 0]
        assert actions[0] == 2  # the better of the valid arms
        assert weights[0, 1] == weights[0, 3] == 0 and weights[0].sum() == pytest.approx(1.0)


def test_syntax_errors_follow_the_grammar():
    operand = np.array([u in lmc.OPERANDS for u in ex.CODE_UNITS])
    for program, needs_operand in [
        ([], False),
        (["ADD"], True),
        (["ADD", "0"], False),
        (["LDL", "3", "STA"], True),
        (["LDL", "3", "STA", "1", "HLT"], False),
    ]:
        expected = ~operand if needs_operand else operand
        assert ex.syntax_errors(program).tolist() == expected.tolist()
        for unit, bad in zip(ex.CODE_UNITS, expected):  # the machine agrees, once HLT ends it
            tail = [unit, "HLT"] if needs_operand else [unit] + ["0"] * (unit != "HLT") + ["HLT"]
            assert (lmc.score(program + tail, [[1, 2]], [3])[0] == "S") == bool(bad)


def chain_expand(calls, A=3):
    """An endless tree: every node's prior favours low actions; value -0.1 * depth - 0.05 * a."""

    def expand(requests):
        calls.append(len(requests))
        return [
            (-np.arange(A, dtype=float), -0.1 * len(path) - 0.05 * path[-1], 0.0, False)
            for _, path in requests
        ]

    return expand


def test_simulation_budget_and_lockstep():
    calls = []
    B = 3
    _, _, visits = ex.gumbel_search(
        np.zeros((B, 3)),
        np.zeros(B),
        chain_expand(calls),
        10,
        generator=torch.Generator().manual_seed(0),
    )
    assert calls == [B] * 10  # one expand call per simulation, covering every tree
    assert visits.sum(1).tolist() == [10] * B


def test_zero_gumbel_scale_is_deterministic():
    runs = [
        ex.gumbel_search(
            np.random.default_rng(0).normal(size=(2, 5)),
            np.zeros(2),
            chain_expand([], A=5),
            9,
            gumbel_scale=0.0,
            generator=torch.Generator().manual_seed(seed),
        )
        for seed in (1, 2)
    ]
    for a, b in zip(*runs):
        assert np.array_equal(a, b)


def test_c_scale_lets_the_prior_outweigh_small_value_gaps():
    # two actions: the prior favours action 0 by 2 nats, the values below favour action 1 by
    # 0.02. sigma stretches any gap to (c_visit + max N) * c_scale: 58 * 0.1 = 5.8 nats at mctx's
    # 0.1 outweigh the prior; 58 * C_SCALE = 1.74 do not
    def expand(requests):
        return [(np.zeros(2), 0.02 * path[0], 0.0, False) for _, path in requests]

    def action(c_scale):
        gen = torch.Generator().manual_seed(0)
        args = (np.array([[2.0, 0.0]]), np.zeros(1), expand, 16)
        return ex.gumbel_search(*args, gumbel_scale=0.0, c_scale=c_scale, generator=gen)[0][0]

    assert action(0.1) == 1 and action(ex.C_SCALE) == 0


def mcts_args(**changes):
    """The MCTS flags gumbel_mcts reads, small budgets, with `changes` on top."""
    flags = dict(
        num_simulations=2,
        gumbel_scale=1.0,
        mcts_guide="both",
    )
    return argparse_namespace(**{**flags, **changes})


def test_mcts_ablations_change_what_search_uses(monkeypatch):
    seen = {}

    def fake_search(prior, values, expand, *args, **kw):
        seen["prior"], seen["values"], seen["c_scale"] = prior, values, kw["c_scale"]
        leaf = expand([(0, (0,))])[0]
        seen["leaf_prior"], seen["leaf_value"] = leaf[0], leaf[1]
        expand([(0, (10,))])  # a search visits the unit it picks
        return np.full(len(prior), 10), None, None  # HLT everywhere

    monkeypatch.setattr(ex, "gumbel_search", fake_search)
    model = tiny_model()
    programs, _, _ = ex.gumbel_mcts(model, [TASK], mcts_args(mcts_guide="value"), torch.Generator())
    assert programs == [["HLT"]]
    assert np.all(seen["prior"] == 0) and seen["values"][0] != 0  # value only: uniform prior
    # the leaf below "ADD": a uniform prior over the operands, the opcodes ruled out
    assert np.all(seen["leaf_prior"][11:] == 0) and np.all(seen["leaf_prior"][:11] < -1e300)
    ex.gumbel_mcts(model, [TASK], mcts_args(mcts_guide="policy"), torch.Generator())
    assert np.std(seen["prior"]) > 0 and np.all(seen["values"] == 0) and seen["leaf_value"] == 0
    ex.gumbel_mcts(model, [TASK], mcts_args(), torch.Generator())
    assert np.std(seen["prior"]) > 0 and seen["values"][0] != 0
    assert seen["c_scale"] == ex.C_SCALE


def test_mask_rules_out_syntax_errors_below_the_root(monkeypatch):
    leaves = {}

    def fake_search(prior, values, expand, *args, **kw):
        for path in [(0,), (0, 11)]:  # "ADD" needs an operand; "ADD 0" needs an opcode
            leaves[path] = expand([(0, path)])[0][0]
        expand([(0, (10,))])
        return np.full(len(prior), 10), None, None

    monkeypatch.setattr(ex, "gumbel_search", fake_search)
    args = mcts_args()
    floor = np.finfo(np.float64).min
    ex.gumbel_mcts(tiny_model(), [TASK], args, torch.Generator())
    assert np.all(leaves[(0,)][:11] == floor) and np.all(leaves[(0,)][11:] > floor)
    assert np.all(leaves[(0, 11)][:11] > floor) and np.all(leaves[(0, 11)][11:] == floor)


def test_mcts_submits_the_best_program_its_trees_reached_and_stops_once_solved(monkeypatch):
    decisions = []

    def fake_search(prior, values, expand, *args, **kw):
        decisions.append(1)
        # each node after its parent: HLT and ADD 0 ADD 0 HLT pass no pair, ADD 0 HLT both
        for path in [(10,), (0,), (0, 11), (0, 11, 0), (0, 11, 0, 11), (0, 11, 0, 11, 10)]:
            expand([(0, path)])
        expand([(0, (0, 11, 10))])
        return np.array([4]), None, None  # while the decision itself is LDA

    monkeypatch.setattr(ex, "gumbel_search", fake_search)
    answers, written, executed = ex.gumbel_mcts(tiny_model(), [TASK], mcts_args(), None)
    assert answers == [["ADD", "0", "HLT"]] and executed == 3
    assert written == [[["HLT"], ["ADD", "0", "ADD", "0", "HLT"], ["ADD", "0", "HLT"]]]
    assert decisions == [1]  # solved on the train pairs: no search for the next unit


def test_submit_takes_the_best_then_the_shortest_then_the_likeliest():
    found = {  # program: (reward on the train pairs, log-probability under the policy)
        ("HLT",): (0.0, -1.0),
        ("LDA", "0", "ADD", "1", "HLT"): (1.0, -2.0),
        ("ADD", "0", "HLT"): (1.0, -9.0),
        ("ADD", "1", "HLT"): (1.0, -5.0),
    }
    assert ex.submit(found) == ["ADD", "1", "HLT"]


def test_mcts_ties_go_to_the_program_the_policy_finds_likeliest(monkeypatch):
    task = lmc.Task([[2, 5], [3, 5]], [5, 5], [[4, 5]], [5], None)  # LDA 0 and LDL 5 both pass
    model, lda, ldl = tiny_model(), (4, 11, 10), (5, 16, 10)

    def log_probability(program):  # eq. 2 at each step, reading the program from the start
        cache, total = ex.prefill(model, [task], "cpu"), 0.0
        logits = ex.extend(model, cache, [("",)], store=True)[0][0].double().numpy()
        for i, unit in enumerate(program):
            policy = ex.log_policy(ex.mask_invalid(logits, ex.syntax_errors(program[:i])))
            total += policy[ex.CODE_UNITS.index(unit)]
            logits = ex.extend(model, cache, [(unit,)], store=True)[0][0].double().numpy()
        return total

    programs = [["LDA", "0", "HLT"], ["LDL", "5", "HLT"]]
    likeliest = max(programs, key=log_probability)
    for first, second in [(lda, ldl), (ldl, lda)]:  # whichever the trees reach first

        def fake_search(prior, values, expand, *args, **kw):
            for path in [first[:1], first[:2], first, second[:1], second[:2], second]:
                expand([(0, path)])
            return np.array([4]), None, None

        monkeypatch.setattr(ex, "gumbel_search", fake_search)
        assert ex.gumbel_mcts(model, [task], mcts_args(), None)[0] == [likeliest]


def test_mcts_noise_is_its_only_randomness():
    # with gumbel_scale 0 the trees reach the same programs whatever the generator; with the
    # paper's noise they differ
    tasks = lmc.make_tasks("add4", 4, seed=0)

    def programs(seed, scale):
        generator = torch.Generator().manual_seed(seed)
        args = mcts_args(num_simulations=8, gumbel_scale=scale)
        return ex.gumbel_mcts(tiny_model(), tasks, args, generator)[1]

    assert programs(0, 0.0) == programs(1, 0.0) == programs(2, 0.0)
    assert len({str(programs(seed, 1.0)) for seed in range(3)}) > 1


def test_interior_selection_never_picks_a_masked_action():
    floor = np.finfo(np.float64).min
    logits = np.array([floor, 0.0, -3.0, floor])
    N = np.zeros(4)
    for _ in range(20):  # whatever the rule (eq. 3 or an exercise's PUCT): valid actions only
        a = ex.interior_action(logits, np.zeros(4), N)
        assert a in (1, 2)
        N[a] += 1


def test_end_to_end_add2_mcts(tmp_path, capsys):
    out = str(tmp_path / "mcts")
    ex.main(
        [
            "--task",
            "add2",
            "--search",
            "mcts",
            "--num_simulations",
            "4",
            "--max_iters",
            "1",
            "--out_dir",
            out,
        ]
        + TINY
    )
    rows = read_log(f"{out}/log.jsonl")
    assert rows[0]["simulations_per_s"] > 0 and rows[0]["flops_search"] > 0
    assert "sim/s" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# Experiments: the no-learning baseline, snapshots and the ladder, plots


def test_no_train_is_search_alone(tmp_path):
    out = str(tmp_path / "baseline")
    ex.main(["--task", "add2", "--max_iters", "2", "--no_train", "--out_dir", out] + TINY)
    rows = read_log(f"{out}/log.jsonl")
    assert all(r["flops_train"] == 0 and r["outcome_buffer"] == 0 for r in rows)
    assert rows[1]["flops_search"] > rows[0]["flops_search"] > 0
    # the weights are still the run's initial ones
    torch.manual_seed(0)
    init = ex.Transformer(32).state_dict()
    saved = torch.load(f"{out}/ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(init[k], saved[k]) for k in init)


def test_enum_and_reinforce_runs_train_and_log_programs_executed(tmp_path):
    out = str(tmp_path / "enum")
    ex.main(["--task", "add2", "--max_iters", "2", "--search", "enum", "--out_dir", out] + TINY)
    rows = read_log(f"{out}/log.jsonl")
    # the enumerator solves every add-2 task by its second program (HLT, then ADD 0 HLT), and
    # its search runs no model but the outcome sampler's
    assert [r["train_solved"] for r in rows] == [1.0, 1.0]
    assert rows[1]["executed"] <= 2 * 2 * 2 and rows[1]["flops_train"] > 0
    out = str(tmp_path / "pg")
    ex.main(["--task", "add2", "--max_iters", "2", "--learner", "pg", "--out_dir", out] + TINY)
    rows = read_log(f"{out}/log.jsonl")
    assert rows[1]["executed"] == 2 * 2 * 2 and rows[1]["loss_policy"] is not None


def test_snapshots_and_ladder(tmp_path, capsys):
    out = str(tmp_path / "run")
    ex.main(
        ["--task", "add2", "--max_iters", "3", "--snapshot_every", "2", "--out_dir", out] + TINY
    )
    assert sorted(os.listdir(f"{out}/snapshots")) == ["iter_0000.pt", "iter_0002.pt"]
    picture = str(tmp_path / "ladder.png")
    argv = ["--ladder", out, "--task", "add3", "--budgets", "1,2", "--num_heldout", "3"]
    results = ex.run(ex.parser.parse_args(argv + ["--device", "cpu", "--out", picture]))
    stages = ["untrained", "iteration 0", "iteration 2"]
    assert [(s, b) for s, b, _ in results] == [(s, b) for s in stages for b in (1, 2)]
    assert all(0 <= solved <= 1 for _, _, solved in results)
    lines = open(str(tmp_path / "ladder.csv")).read().splitlines()
    assert lines[0] == "stage,budget,solved" and len(lines) == 1 + 6
    text = capsys.readouterr().out
    assert "untrained" in text and "iteration 2" in text
    assert "no snapshots" in error_line(capsys, ["--ladder", str(tmp_path), "--device", "cpu"])
    assert "--budgets must be" in error_line(
        capsys, ["--ladder", out, "--budgets", "1,x", "--device", "cpu"]
    )
    # a run that began from a saved agent begins its ladder with that agent
    out2 = str(tmp_path / "run2")
    init = ["--init", f"{out}/snapshots/iter_0002.pt", "--snapshot_every", "1"]
    ex.main(["--task", "add3", "--max_iters", "1", "--out_dir", out2] + TINY + init)
    argv[1] = out2
    results = ex.run(ex.parser.parse_args(argv + ["--device", "cpu", "--out", picture]))
    assert [s for s, b, _ in results if b == 1] == ["add2 agent", "iteration 0"]
    # a resumed run keeps snapshots as the resuming command asks, not as the saved run did
    ex.main(
        ["--task", "add2", "--max_iters", "5", "--snapshot_every", "1", "--out_dir", out]
        + TINY
        + ["--resume"]
    )
    assert sorted(os.listdir(f"{out}/snapshots"))[2:] == ["iter_0003.pt", "iter_0004.pt"]


FAKE_LOG = [
    {"iter": 0, "flops": 1e12, "heldout_solved": 0.0, "heldout_valid": 0.1, "train_solved": 0.0},
    {"iter": 1, "flops": 3e12, "heldout_solved": 0.25, "heldout_valid": 0.5, "train_solved": 0.5},
]


def fake_run(path, search, budget_key, budget):
    os.makedirs(path)
    with open(f"{path}/log.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in FAKE_LOG)
    args = dict(task="add4", search=search, seed=0, mcts_guide="both")
    args.update({"num_rollouts": 32, "num_simulations": 16, budget_key: budget})
    json.dump(args, open(f"{path}/args.json", "w"))
    return path


def test_plot_writes_csv_and_picture(tmp_path, capsys):
    runs = [
        fake_run(str(tmp_path / "a"), "sf", "num_rollouts", 8),
        fake_run(str(tmp_path / "b"), "mcts", "num_simulations", 64),
    ]
    picture = str(tmp_path / "curves.png")
    ex.main(["--plot", *runs, "--out", picture])
    lines = open(str(tmp_path / "curves.csv")).read().splitlines()
    assert lines[0] == "run,label,iter,flops,heldout_solved,heldout_valid,train_solved"
    assert len(lines) == 1 + 4
    assert '"add4 S&F 8 rollouts seed 0"' in lines[1] and "MCTS 64 sims" in lines[3]
    assert lines[2].endswith(",3000000000000.0,0.25,0.5,0.5")
    pytest.importorskip("matplotlib")
    assert open(picture, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_gives_the_seeds_of_a_setting_one_colour(tmp_path, monkeypatch):
    matplotlib = pytest.importorskip("matplotlib")
    runs = [fake_run(str(tmp_path / n), "sf", "num_rollouts", 8) for n in "ab"]
    args = json.load(open(f"{runs[1]}/args.json"))
    json.dump({**args, "seed": 1}, open(f"{runs[1]}/args.json", "w"))
    runs.append(fake_run(str(tmp_path / "c"), "mcts", "num_simulations", 64))
    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    ex.main(["--plot", *runs, "--out", str(tmp_path / "curves.png")])
    ax = saved[0].axes[0]
    assert [line.get_color() for line in ax.get_lines()] == ["C0", "C0", "C1"]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["add4 S&F 8 rollouts", "add4 MCTS 64 sims"]


def test_run_label_names_search_and_ablations(tmp_path):
    path = fake_run(str(tmp_path / "a"), "mcts", "num_simulations", 256)
    assert ex.run_label(path) == "add4 MCTS 256 sims seed 0"
    args = json.load(open(f"{path}/args.json"))
    json.dump({**args, "mcts_guide": "policy"}, open(f"{path}/args.json", "w"))
    assert ex.run_label(path) == "add4 MCTS 256 sims policy only seed 0"
    json.dump({**args, "search": "sf", "learner": "pg"}, open(f"{path}/args.json", "w"))
    assert ex.run_label(path) == "add4 S&F 32 rollouts REINFORCE seed 0"
    json.dump({**args, "search": "sf", "buffer_iters": 0}, open(f"{path}/args.json", "w"))
    assert ex.run_label(path) == "add4 S&F 32 rollouts buffer all seed 0"
    json.dump({**args, "search": "enum", "no_train": True}, open(f"{path}/args.json", "w"))
    assert ex.run_label(path) == "add4 enumeration no training seed 0"
    json.dump({**args, "task": "data/mix.jsonl", "num_tasks": 64}, open(f"{path}/args.json", "w"))
    assert ex.run_label(path) == "mix.jsonl MCTS 256 sims 64 tasks an iteration seed 0"


def test_plot_without_matplotlib_writes_csv_only(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    run = fake_run(str(tmp_path / "a"), "sf", "num_rollouts", 8)
    ex.main(["--plot", run, "--out", str(tmp_path / "curves.png")])
    assert "pip install matplotlib" in capsys.readouterr().out
    assert os.path.exists(tmp_path / "curves.csv") and not os.path.exists(tmp_path / "curves.png")


def test_plot_errors(capsys, tmp_path):
    assert "has no log.jsonl" in error_line(capsys, ["--plot", str(tmp_path)])
    (tmp_path / "log.jsonl").write_text('{"iter": 0, "flops": 1}\nnot json\n')
    assert "log.jsonl line 2" in error_line(capsys, ["--plot", str(tmp_path)])

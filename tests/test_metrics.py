"""Benchmark metrics against hand-worked examples."""

from pathlib import Path

import pytest

from tokendrop.eval.metrics import (
    exact_match,
    mme_answer,
    mme_scores,
    normalize_answer,
    option_letter,
    pope_answer,
    pope_metrics,
    vqa_accuracy,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Two", "2"),  # number words become digits
        ("none", "0"),  # as the official table
        ("The dog", "dog"),  # articles go
        ("a red car", "red car"),
        ("Yes.", "yes"),  # a period not followed by a digit goes
        ("3.5", "3.5"),  # a decimal point stays
        ("a.m.", "am"),
        ("1,000", "1000"),  # commas go
        ("fish, chips", "fish chips"),
        ("Where?", "where"),
        ("t-shirt", "t shirt"),  # punctuation inside a word becomes a space
        ("left - right", "left right"),  # punctuation touching a space is deleted
        ("red (dark)", "red dark"),  # "(" touches a space: deleted everywhere; ")" too
        ("(red)", "red"),  # no punctuation touches a space: each becomes a space
        ("@home", "home"),
        ("dont", "don't"),  # contractions get their apostrophe back
        ("isnt it", "isn't it"),
        ("children's book", "children 's book"),  # "'s" is split off
        ("  yes\n", "yes"),
        ("Yes!\tNo", "yes no"),
        ("50%", "50%"),  # not in the punctuation list
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_vqa_accuracy_is_the_leave_one_out_mean():
    # 3 of 10 annotators said "2": each of them left out leaves 2 matches (2/3), each other one
    # leaves 3 (1): (3 * 2/3 + 7 * 1) / 10
    assert vqa_accuracy("two", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("2", ["2"] * 2 + ["x"] * 8) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)
    assert vqa_accuracy("2", ["2"] + ["x"] * 9) == pytest.approx(0.3)
    assert vqa_accuracy("2", ["2"] * 10) == 1.0
    assert vqa_accuracy("4", ["2"] * 10) == 0.0


def test_vqa_accuracy_normalises_both_sides():
    assert vqa_accuracy("The Two dogs.", ["2 dogs"] * 10) == 1.0
    assert vqa_accuracy("2 dogs", ["two DOGS!"] * 4 + ["cat"] * 6) == 1.0


def test_vqa_accuracy_needs_answers():
    with pytest.raises(ValueError, match="at least one"):
        vqa_accuracy("x", [])


def test_exact_match():
    assert exact_match("The Cat.", "cat") == 1.0
    assert exact_match("cat", ["dog", "a cat"]) == 1.0
    assert exact_match("cats", "cat") == 0.0


@pytest.mark.parametrize(
    "prediction, letter",
    [
        ("B", "B"),
        ("B.", "B"),
        ("B. cat", "B"),
        ("(A) dog", "A"),
        ("C)", "C"),
        ("cat", "B"),
        ("The cow", "C"),
        ("A cat", "B"),  # "A" is an article here: the text says "cat"
        ("A large cat", None),
        ("D", None),  # only three choices
        ("b", None),
        ("", None),
    ],
)
def test_option_letter(prediction, letter):
    assert option_letter(prediction, ["dog", "cat", "cow"]) == letter


@pytest.mark.parametrize(
    "prediction, answer",
    [
        ("Yes", "yes"),
        ("Yes, there is a cat.", "yes"),
        ("No", "no"),
        ("no.", "no"),
        ("There is no cat", "no"),
        ("I do not see one", "no"),
        ("No, there is not.", "no"),
        ("Yes. No.", "yes"),  # the first sentence only
        ("There is a dog, not a cat", "no"),
        ("NO", "yes"),
    ],  # POPE's rule knows "no", "No" and "not" only
)
def test_pope_answer(prediction, answer):
    assert pope_answer(prediction) == answer


def test_pope_metrics_by_hand():
    # pairs: TP, FP, TN, FN, TP
    metrics = pope_metrics(["yes", "yes", "no", "no", "yes"], ["yes", "no", "no", "yes", "yes"])
    assert metrics == pytest.approx(dict(accuracy=3 / 5, precision=2 / 3, recall=2 / 3, f1=2 / 3, yes_ratio=3 / 5))
    never_yes = pope_metrics(["no", "no"], ["yes", "no"])
    assert never_yes == pytest.approx(dict(accuracy=0.5, precision=0.0, recall=0.0, f1=0.0, yes_ratio=0.0))
    with pytest.raises(ValueError):
        pope_metrics(["yes"], [])


@pytest.mark.parametrize(
    "prediction, answer",
    [
        ("Yes", "yes"),
        ("no", "no"),
        ("Yes, it is.", "yes"),
        ("yes.", "yes"),
        ("No, it is not", "no"),
        ("Not sure", "no"),  # MME's tool reads "no" in the first four characters
        ("Maybe", "other"),
        ("", "other"),
    ],
)
def test_mme_answer(prediction, answer):
    assert mme_answer(prediction) == answer


def test_mme_scores_by_hand():
    results = [
        ("existence", "a.jpg", True),
        ("existence", "a.jpg", True),  # both right
        ("existence", "b.jpg", True),
        ("existence", "b.jpg", False),  # one right
        ("OCR", "c.jpg", False),
        ("OCR", "c.jpg", False),
        ("code_reasoning", "d.png", True),
        ("code_reasoning", "d.png", True),
    ]
    scores = mme_scores(results)
    assert scores["existence_acc"] == 75.0 and scores["existence_acc_plus"] == 50.0
    assert scores["existence"] == 125.0
    assert scores["OCR"] == 0.0
    assert scores["perception"] == 125.0
    assert scores["cognition"] == 200.0
    with pytest.raises(ValueError, match="unknown MME category 'colour'"):
        mme_scores([("colour", "x.jpg", True)])


# --- issue 27: our normalisation runs without lmms-eval, and agrees with lmms-eval's ---------

TRICKY_ANSWERS = [
    "Two",
    "none",
    "The dog",
    "a red car",
    "Yes.",
    "3.5",
    "a.m.",
    "1,000",
    "fish, chips",
    "Where?",
    "t-shirt",
    "left - right",
    "red (dark)",
    "(red)",
    "@home",
    "dont",
    "isnt it",
    "children's book",
    "  yes\n",
    "Yes!\tNo",
    "50%",
    "It's 10 o'clock.",
    "the man's hat; a woman's",
    "An apple, two pears and THREE plums.",
    "yall'll",
    "St. Louis",
    "e.g. 2.5 km/h",
    "<b>bold</b>",
    "it's 'quoted'",
    "",
    "   ",
    "ten-year-old",
    "version 3.10.2.",
    "u.s.a",
    "#1 = best",
    "c++ > java",
    "don't stop",
    "Nine.Ten",
]


def lmms_eval_answer_processor():
    """lmms-eval's EvalAI answer processor (what its VQAv2 and TextVQA tasks score with), loaded
    from its own file: importing lmms-eval's packages pulls in torchvision, which may not load
    beside the CPU torch of the test venvs."""
    import importlib.util

    spec = importlib.util.find_spec("lmms_eval")
    if spec is None:
        pytest.skip("lmms-eval is not installed (pip install 'tokendrop[lmms]' beside a torch it accepts)")
    path = Path(spec.submodule_search_locations[0]) / "tasks" / "_task_utils" / "vqa_eval_metric.py"
    if not path.is_file():
        pytest.skip(f"this lmms-eval has no {path.name}, where its EvalAI answer processor was")
    module_spec = importlib.util.spec_from_file_location("lmms_eval_vqa_eval_metric", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.EvalAIAnswerProcessor()


def test_normalize_answer_agrees_with_lmms_eval():
    # one difference is left out: lmms-eval strips at most 32 periods from an answer (it passes
    # re.UNICODE, 32, as re.sub's count), ours every one
    theirs = lmms_eval_answer_processor()
    assert [normalize_answer(a) for a in TRICKY_ANSWERS] == [theirs(a) for a in TRICKY_ANSWERS]

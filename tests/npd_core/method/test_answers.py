"""Answer metrics (``eval.metric``) against hand-made responses and references."""

from __future__ import annotations

import sys

import pytest

from npd_core.config import build_config
from npd_core.errors import ConfigError
from npd_core.method.answers import METRIC_NAMES, gsm8k_number, last_boxed, metric_fn
from npd_core.method.evaluate import exact_match

MATH = "We halve it: $\\frac{2}{4} = \\boxed{\\frac{1}{2}}$"
GSM = "1,000 + 234 = 1,234\n#### 1,234"

# metric → (prediction, reference, expected score) cases
CASES = {
    "exact": [
        ("  the  answer\n", "the answer", 1.0),
        ("The answer", "the answer", 0.0),
    ],
    "normalized": [
        ("The Answer!", "the answer", 1.0),
        ("  Paris.  ", "paris", 1.0),
        ("the answers", "the answer", 0.0),
    ],
    "contains": [
        ("I think it is Paris, France.", "Paris", 1.0),
        ("I think it is paris.", "Paris", 0.0),
        ("anything", "", 0.0),  # an empty reference matches nothing
    ],
    "boxed": [
        ("so \\boxed{\\frac{1}{2}}", MATH, 1.0),  # nested braces, reference a worked solution
        ("first \\boxed{3}, then \\boxed{ \\frac{1}{2} }", "\\frac{1}{2}", 1.0),  # the last
        ("\\boxed{0.5}", "\\boxed{.50}", 1.0),  # numbers compare as numbers
        ("\\boxed{\\frac{1}{3}}", MATH, 0.0),
        ("no box: 1/2", "\\frac{1}{2}", 0.0),
        ("\\boxed{\\frac{1}{2}", "\\frac{1}{2}", 0.0),  # not closed
    ],
    "gsm8k": [
        ("so 1234.\n#### 1234", GSM, 1.0),  # "#### 1,234": commas removed
        ("#### 1,234.0", "1234", 1.0),  # a bare numeric reference; compared as numbers
        ("#### 5\nwait\n#### 42", "42", 1.0),  # the last ####
        ("#### -3", "#### -3", 1.0),
        ("the answer is 1234", GSM, 0.0),  # no #### in the response
        ("#### 1,235", GSM, 0.0),
    ],
    "final_line": [
        ("steps\n\n  a b c \n", "x\na b c", 1.0),
        ("a b c\nsteps", "a b c", 0.0),
    ],
    "lines": [
        ("A aa bb\nD bb aa\n", "A aa bb\nD bb aa", 1.0),
        ("A aa bb\nD xx aa", "A aa bb\nD bb aa", 0.5),  # one line of two wrong
        ("A aa bb", "A aa bb\nD bb aa\nU aa\nW aa", 0.25),  # missing lines score nothing
        ("D bb aa\nA aa bb", "A aa bb\nD bb aa", 0.0),  # each line in its own place
    ],
}


@pytest.mark.parametrize("metric", CASES)
def test_metric_on_hand_made_answers(metric):
    fn = metric_fn(metric)
    for prediction, reference, want in CASES[metric]:
        assert fn(prediction, reference) == want, (prediction, reference)


def test_every_named_metric_is_tested():
    assert set(METRIC_NAMES) == {*CASES, "regex"}


def test_extractors():
    assert last_boxed("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{a{b{c}}d} and \\boxed{x}") == "x"
    assert last_boxed("nothing") is None
    assert gsm8k_number("#### 1,234") == 1234.0
    assert gsm8k_number("#### $1,234.50") == 1234.5
    assert gsm8k_number("1234") is None


def test_regex_takes_the_first_group_of_the_first_match():
    fn = metric_fn("regex", r"[Aa]nswer:\s*(\S+)")
    assert fn("reasoning... Answer: 17 (sure)", "17") == 1.0
    assert fn("Answer: 17", "Work. answer: 17") == 1.0  # the reference's own match
    assert fn("Answer: 18", "17") == 0.0
    assert fn("17", "17") == 0.0  # nothing extracted from the response
    assert metric_fn("regex", r"\d+")("it is 17 or 18", "17") == 1.0  # no group: the match


def test_exact_match_averages_in_points_and_records_the_metric_name():
    res = exact_match(["#### 4", "#### 5", "4", "#### 4"], ["4"] * 4, "gsm8k")
    assert res.score == 50.0 and res.metric == "gsm8k"
    assert res.correct.tolist() == [1.0, 0.0, 0.0, 1.0]
    assert exact_match(["a"], ["a"]).metric == "exact_match"  # as rows before the metrics said
    assert exact_match([], [], "boxed").score == 0.0


def test_a_users_metric_is_imported_by_module_and_function(tmp_path, monkeypatch):
    (tmp_path / "my_grader.py").write_text(
        "def close(prediction, reference):\n"
        "    return max(0.0, 1 - abs(float(prediction) - float(reference)) / 10)\n"
        "NOT_A_FUNCTION = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    res = exact_match(["10", "15", "30"], ["10", "10", "10"], "python:my_grader:close")
    assert res.score == pytest.approx(50.0) and res.metric == "python:my_grader:close"
    with pytest.raises(ConfigError, match=r"eval.metric: cannot load python:no_such_mod:f"):
        metric_fn("python:no_such_mod:f")
    with pytest.raises(ConfigError, match=r"cannot load python:my_grader:nope \(AttributeError"):
        metric_fn("python:my_grader:nope")
    with pytest.raises(ConfigError, match="my_grader.NOT_A_FUNCTION is not a function"):
        metric_fn("python:my_grader:NOT_A_FUNCTION")
    sys.modules.pop("my_grader", None)


@pytest.mark.parametrize(
    ("section", "needle"),
    [
        ({"metric": "gsm9k"}, "eval.metric': Value error, unknown metric 'gsm9k'; choose from"),
        ({"metric": "regex"}, "metric regex needs eval.answer_regex"),
        ({"metric": "regex", "answer_regex": "(unclosed"}, "'(unclosed' is not a regex"),
        ({"metric": "python:no colon"}, "unknown metric"),
    ],
)
def test_bad_metric_config_is_one_line_naming_the_field(section, needle):
    with pytest.raises(ConfigError) as e:
        build_config({"eval": section}, "my.yaml")
    assert needle in str(e.value) and str(e.value).startswith("my.yaml: field 'eval")

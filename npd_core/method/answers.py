"""Grading a response against its reference answer (``eval.metric``).

A metric is a function ``(prediction, reference) -> float``, 1.0 for a match; the evaluate stage
reports the mean in points (0–100). The extracting metrics (regex, boxed, gsm8k) take the answer
out of the response; from the reference too when it holds one (a worked solution), else the
reference is the answer itself. Plain string functions: the config validates metric names here
without importing torch.
"""

from __future__ import annotations

import importlib
import re
import unicodedata
from collections.abc import Callable
from functools import partial

from npd_core.errors import ConfigError, first_line
from npd_core.metric_names import METRIC_NAMES, PYTHON_METRIC

Metric = Callable[[str, str], float]
_BOXED = "\\boxed{"
_GSM8K = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)")


def normalize(text: str) -> str:
    """Whitespace collapsed and stripped: what ``exact`` compares."""
    return " ".join(text.strip().split())


def final_line(text: str) -> str:
    """The last non-empty line, normalized: a worked answer graded on its result."""
    lines = [x for x in text.split("\n") if x.strip()]
    return normalize(lines[-1]) if lines else ""


def loose(text: str) -> str:
    """Lower case, punctuation dropped, whitespace collapsed: what ``normalized`` compares."""
    kept = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text.lower())
    return normalize(kept)


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{…}``, nested braces kept (``\\boxed{\\frac{1}{2}}`` →
    ``\\frac{1}{2}``); None when there is none or it is not closed."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth, i = 1, start + len(_BOXED)
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def gsm8k_number(text: str) -> float | None:
    """The number after the last ``####`` (``#### 1,234`` → 1234.0); None when there is none."""
    found = _GSM8K.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def _number(text: str) -> float | None:
    try:
        return float(text.strip().replace(",", "").removeprefix("$"))
    except ValueError:
        return None


def _same(got: str, want: str) -> bool:
    """Equal as numbers when both are numbers, else equal with every space removed."""
    a, b = _number(got), _number(want)
    if a is not None and b is not None:
        return a == b
    return "".join(got.split()) == "".join(want.split())


def exact(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def normalized(prediction: str, reference: str) -> float:
    return float(loose(prediction) == loose(reference))


def contains(prediction: str, reference: str) -> float:
    want = normalize(reference)
    return float(bool(want) and want in normalize(prediction))


def final_line_match(prediction: str, reference: str) -> float:
    return float(final_line(prediction) == final_line(reference))


def lines(prediction: str, reference: str) -> float:
    """The fraction of the reference's lines the prediction has at the same place (each line
    whitespace-normalized; blank lines at either end dropped): partial credit per line, so one
    wrong line of eight scores 0.875."""
    want = reference.strip("\n").split("\n")
    got = prediction.strip("\n").split("\n")
    return sum(normalize(g) == normalize(w) for g, w in zip(got, want, strict=False)) / len(want)


def boxed(prediction: str, reference: str) -> float:
    got, want = last_boxed(prediction), last_boxed(reference)
    return float(got is not None and _same(got, reference if want is None else want))


def gsm8k(prediction: str, reference: str) -> float:
    got = gsm8k_number(prediction)
    want = gsm8k_number(reference) if "####" in reference else _number(reference)
    return float(got is not None and got == want)


def regex(pattern: re.Pattern[str], prediction: str, reference: str) -> float:
    """The first match's first group (the whole match when the pattern has no group)."""

    def extract(text: str) -> str | None:
        m = pattern.search(text)
        return None if m is None else m.group(1 if pattern.groups else 0)

    got, want = extract(prediction), extract(reference)
    return float(
        got is not None and normalize(got) == normalize(reference if want is None else want)
    )


# eval.metric → its function; "regex" and "python:module:function" are built by metric_fn
METRICS: dict[str, Metric] = {
    "exact": exact,
    "normalized": normalized,
    "contains": contains,
    "boxed": boxed,
    "gsm8k": gsm8k,
    "final_line": final_line_match,
    "lines": lines,
}
assert set(METRIC_NAMES) == {*METRICS, "regex"}, "name each metric in npd_core/metric_names.py"
# the name an eval row records, where it differs from the config's (rows written before the
# metrics existed say exact_match)
STORED_NAMES = {"exact": "exact_match"}


def metric_fn(name: str, answer_regex: str | None = None) -> Metric:
    """The metric ``eval.metric: name`` names; imports a ``python:module:function`` (a
    ConfigError when it cannot)."""
    if name == "regex":
        return partial(regex, re.compile(answer_regex or ""))
    user = PYTHON_METRIC.fullmatch(name)
    if user is None:
        return METRICS[name]
    module, function = user.groups()
    try:
        fn = getattr(importlib.import_module(module), function)
    except Exception as err:  # the user's module may raise anything on import
        raise ConfigError(
            f"eval.metric: cannot load {name} ({type(err).__name__}: {first_line(err)}); "
            "make the module importable (PYTHONPATH) and define the function in it"
        ) from None
    if not callable(fn):
        raise ConfigError(f"eval.metric: {module}.{function} is not a function")
    return fn

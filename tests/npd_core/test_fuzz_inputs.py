"""Random bytes and JSON objects as prompt files, random YAML as configs: a clean error or a
valid result, never another exception (the CLI turns NPDError into one ``error:`` line)."""

from __future__ import annotations

import json

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from npd_core.config import NPDConfig, load_config
from npd_core.data import read_prompts
from npd_core.errors import NPDError
from npd_core.pipeline.preflight import check_run

FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


def _clean(fn, *args):
    try:
        return fn(*args)
    except NPDError as e:
        assert str(e) and "\n" not in str(e)
        return None


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_as_prompts(tmp_path, data):
    p = tmp_path / "p.jsonl"
    p.write_bytes(data)
    out = _clean(read_prompts, p)
    assert out is None or all(q.text.strip() for q in out)


@FUZZ
@given(st.lists(json_values, min_size=1, max_size=4))
def test_random_json_objects_as_prompts(tmp_path, rows):
    p = tmp_path / "p.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows))
    out = _clean(read_prompts, p)
    assert out is None or len({q.id for q in out}) == len(out)


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(
            ["rounds", "seed", "filter", "train", "pack", "trian", "staleness", "score"]
        ),
        json_values,
        max_size=4,
    )
)
def test_random_yaml_as_config(tmp_path, data):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    cfg = _clean(load_config, p)
    assert cfg is None or isinstance(cfg, NPDConfig)


@FUZZ
@given(st.text(max_size=200))
def test_random_text_as_config(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text, encoding="utf-8")
    cfg = _clean(load_config, p)
    assert cfg is None or isinstance(cfg, NPDConfig)


# every real section and key, plus near misses, so values reach the field validators
KEYS = {
    name: sorted(type(section).model_fields) + ["nope"]
    for name, section in NPDConfig()
    if isinstance(section, BaseModel)
}
sections = st.sampled_from(sorted(KEYS)).flatmap(
    lambda name: st.tuples(
        st.just(name), st.dictionaries(st.sampled_from(KEYS[name]), json_values, max_size=3)
    )
)


@FUZZ
@given(st.lists(sections, max_size=4).map(dict))
@example({"models": {"teacher": "a\x00b"}})  # a NUL in a path was a bare ValueError
def test_random_values_in_real_fields(tmp_path, data):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    cfg = _clean(load_config, p)
    assert cfg is None or isinstance(cfg, NPDConfig)


prompt_rows = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {"prompt": st.text(min_size=1, max_size=40)}, optional={"id": json_values}
    ),
)


@pytest.mark.filterwarnings("ignore:.*also train prompts")
@settings(FUZZ, max_examples=25)
@given(st.lists(prompt_rows, min_size=1, max_size=4))
def test_random_prompts_through_preflight(tmp_path, tiny_world, rows):
    """Any text, emoji or control characters included, gets through the real tokenizer and
    the context checks as a clean error or as prompts (one file as both sets: overlap allowed)."""
    p = tmp_path / "p.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows))
    w = tiny_world
    cfg = NPDConfig(data={"allow_overlap": True})
    held = {"heldout": str(p)}
    out = _clean(check_run, cfg, str(w.teacher), str(w.student), str(p), held)
    assert out is None or all(q.text.strip() for q in out[0])

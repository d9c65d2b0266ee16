"""Random bytes as prompt files and random YAML as configs: a clean error or a valid result,
never another exception (the CLI turns NPDError into one ``error:`` line)."""

from __future__ import annotations

import json

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from npd_core.config import NPDConfig, load_config
from npd_core.data import read_prompts
from npd_core.errors import NPDError

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
    assert out is None or all(q.prompt.strip() for q in out)


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

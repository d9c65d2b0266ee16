"""Config of eval sets and MLflow: defaults, the primary set, paths next to the config; the
orchestration section's one-line errors."""

from __future__ import annotations

import pytest

from npd_core.config import NPDConfig, build_config, load_config
from npd_core.errors import ConfigError


def test_without_sets_the_one_set_is_heldout_and_primary():
    ev = NPDConfig().eval
    assert (ev.sets, ev.primary, ev.primary_set) == ({}, None, "heldout")
    assert NPDConfig().mlflow.register_best is None


def test_the_first_set_is_primary_by_name_and_set_paths_resolve_next_to_the_config(tmp_path):
    (tmp_path / "cfg").mkdir()
    p = tmp_path / "cfg" / "run.yaml"
    p.write_text("eval:\n  sets:\n    math: math.jsonl\n    gsm: /d/gsm.jsonl\n")
    cfg = load_config(p)
    assert cfg.eval.sets == {"math": str(tmp_path / "cfg" / "math.jsonl"), "gsm": "/d/gsm.jsonl"}
    # the stored config names the primary set, so the store's views know it
    dumped = cfg.model_dump(mode="json")
    assert dumped["eval"]["primary"] == "math" == NPDConfig.model_validate(dumped).eval.primary_set


@pytest.mark.parametrize(
    ("section", "needle"),
    [
        ({"orchestration": {"shards": 0}}, "'orchestration.shards': Input should be greater"),
        (
            {"orchestration": {"shards": 9}, "data": {"prompts_per_round": 8}},
            "orchestration.shards (9) exceeds data.prompts_per_round (8)",
        ),
        (
            {"orchestration": {"shards": 2, "generate_pool": "a", "train_pool": "b"}},
            "orchestration.shards > 1 runs in-process rounds only",
        ),
    ],
)
def test_shard_counts_that_cannot_work_are_one_line(section, needle):
    with pytest.raises(ConfigError) as e:
        build_config(section)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert build_config({"orchestration": {"shards": 8}, "data": {"prompts_per_round": 8}})


def test_ray_without_the_extra_is_one_line(monkeypatch):
    import importlib.util

    installed = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n: None if n == "prefect_ray" else installed(n)
    )
    with pytest.raises(ConfigError) as e:
        build_config({"orchestration": {"task_runner": "ray"}})
    msg = str(e.value)
    assert "task_runner 'ray' needs the ray extra" in msg and "pip install -e '.[ray]'" in msg
    assert "\n" not in msg
    assert build_config({}).orchestration.task_runner == "threads"  # the default needs nothing

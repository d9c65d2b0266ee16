"""Config of eval sets and MLflow: defaults, the primary set, paths next to the config."""

from __future__ import annotations

from npd_core.config import NPDConfig, load_config


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

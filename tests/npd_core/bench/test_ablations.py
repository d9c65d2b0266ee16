"""NPD's ablations are the settings the config does not use, and rounds of half and twice its
optimizer steps."""

from __future__ import annotations

from npd_core.bench.ablations import ablations
from npd_core.config import NPDConfig, merge


def test_ablations_of_the_default_config():
    cfg = NPDConfig.model_validate({"train": {"steps_per_round": 40, "epochs_per_round": 2.0}})
    a = ablations(cfg)
    assert list(a) == [
        "filter-band", "filter-fence", "drop-unfinished", "staleness-0", "staleness-2",
        "staleness-4", "steps-x0.5", "steps-x2", "mix-teacher", "mix-reference",
        "normalize-sequence", "rest-mass", "reverse-kl", "sampled-reverse-kl",
    ]  # fmt: skip
    for over in a.values():  # each a valid config
        NPDConfig.model_validate(merge(cfg.model_dump(mode="json"), over))
    assert a["mix-teacher"] == {"data": {"mix": {"fraction": 0.5, "source": "teacher"}}}
    assert a["sampled-reverse-kl"] == {"train": {"loss": "sampled_reverse_kl"}}
    assert a["filter-band"] == {"filter": {"rule": "band"}}
    assert a["drop-unfinished"] == {"filter": {"drop_unfinished": True}}
    assert a["steps-x0.5"] == {"train": {"steps_per_round": 20, "epochs_per_round": 1.0}}
    assert a["steps-x2"] == {"train": {"steps_per_round": 80, "epochs_per_round": 4.0}}


def test_a_config_with_a_filter_ablates_towards_the_others():
    cfg = NPDConfig.model_validate({"filter": {"rule": "band", "drop_unfinished": True}})
    a = ablations(cfg)
    assert [n for n in a if n.startswith(("filter", "drop", "keep"))] == [
        "filter-none", "filter-fence", "keep-unfinished",
    ]  # fmt: skip
    assert a["keep-unfinished"] == {"filter": {"drop_unfinished": False}}
    assert (
        ablations(NPDConfig.model_validate({"train": {"steps_per_round": 1}}))["steps-x0.5"][
            "train"
        ]["steps_per_round"]
        == 1
    )  # never below one step


def test_levers_a_config_uses_are_not_ablated():
    cfg = NPDConfig.model_validate(
        {
            "staleness": 2,
            "data": {"mix": {"fraction": 0.3}},
            "train": {"loss": "sampled_reverse_kl", "normalize": "sequence"},
        }
    )
    a = ablations(cfg)
    assert [n for n in a if n.startswith("staleness")] == ["staleness-0", "staleness-4"]
    assert not [n for n in a if n.startswith(("mix", "normalize", "rest", "sampled"))]
    assert a["reverse-kl"] == {"train": {"loss": "reverse_kl"}}
    # a world whose default loss is reverse KL ablates forward KL
    rkl = ablations(NPDConfig.model_validate({"train": {"loss": "reverse_kl"}}))
    assert [n for n in rkl if n.endswith("kl")] == ["forward-kl", "sampled-reverse-kl"]


def test_a_worlds_ablations_are_relative_to_the_worlds_own_settings():
    """The views world trains reverse KL by default, so its loss ablations are forward KL and
    the sampled-token loss (the bench applies the world's defaults before listing variants)."""
    from npd_core.pipeline.resolve import use_world

    cfg = NPDConfig()
    assert use_world(cfg, "views") is not None
    assert cfg.train.loss == "reverse_kl"
    losses = [n for n in ablations(cfg) if n.endswith("-kl")]
    assert losses == ["forward-kl", "sampled-reverse-kl"]
    named = NPDConfig.model_validate(
        {"models": {"teacher": "t", "student": "s"}, "data": {"prompts": "p", "eval_prompts": "e"}}
    )
    assert use_world(named, "views") is None and named.train.loss == "forward_kl"

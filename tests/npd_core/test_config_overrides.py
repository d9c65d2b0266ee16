"""``parse_overrides``: dotted key=value pairs as the nested dict ``load_config`` lays over a
config, YAML-typed values, the command's own options last, one error line for a bad pair."""

from __future__ import annotations

import pytest

from npd_core.config import load_config
from npd_core.config.overrides import parse_overrides
from npd_core.errors import ConfigError


def test_pairs_nest_by_section_read_as_yaml_and_the_commands_options_come_last():
    pairs = ["generate.top_p=0.5", "filter.rule=band", "train.lr=2e-5", "rounds=5"]
    got = parse_overrides(pairs, rounds=7, out=None)
    assert got["generate"] == {"top_p": 0.5} and got["rounds"] == 7 and "out" not in got
    cfg = load_config(None, got)  # "2e-5" is a YAML string; the config validates it as a float
    assert (cfg.generate.top_p, cfg.filter.rule, cfg.train.lr, cfg.rounds) == (0.5, "band", 2e-5, 7)


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        ("train.lrr=1e-4", "train.lrr=1e-4: unknown config key 'train.lrr'"),
        ("trian.lr=1e-4", "trian.lr=1e-4: unknown config key 'trian'"),
        ("train.lr", "'train.lr': an override is key=value"),
    ],
)
def test_a_bad_pair_is_one_error_naming_it(pair, message):
    with pytest.raises(ConfigError) as e:
        parse_overrides([pair])
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)

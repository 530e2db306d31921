import tomllib
from pathlib import Path

import pytest
from flwr.common.config import flatten_dict

from lordba_fl.runconfig import DEFAULTS, FlipControl, RunConfig, parse_run_config
from lordba_fl.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_mirrors_the_defaults():
    with (ROOT / "pyproject.toml").open("rb") as f:
        cfg = flatten_dict(tomllib.load(f)["tool"]["flwr"]["app"]["config"])
    assert cfg == DEFAULTS
    assert parse_run_config(cfg) == RunConfig()


def test_overrides_are_typed_and_nested():
    cfg = parse_run_config({"rank": 8, "train.local-steps": 2, "flip.stateful": True, "scales": "mid,out",
                            "server.beta": 1, "data.shakespeare.min-lines": 50})
    assert cfg.rank == 8 and cfg.train == TrainConfig(steps=2) and cfg.flip == FlipControl(stateful=True)
    assert cfg.scales == ("mid", "out") and cfg.beta == 1.0 and cfg.task_kwargs() == {"min_lines": 50, "max_clients": None, "sdist": None}
    assert cfg.task_options["gsm"]["num_clients"] == 8


@pytest.mark.parametrize(
    "override, match",
    [
        ({"rnak": 3}, "unknown run config key 'rnak'"),
        ({"rank": "abc"}, "'rank' must be a int"),
        ({"flip.stateful": "maybe"}, "true or false"),
        ({"train.optimizer": "lion"}, "optimizer must be one of"),
        ({"flip.budget": 2.0}, "flip.budget"),
        ({"server.aggregator": "median"}, "aggregator"),
        ({"train.local-steps": 0}, "steps must be a positive integer"),
        ({"data.min-lines": 5}, "data.<task>.<option>"),
    ],
)
def test_bad_config_names_the_fix(override, match):
    with pytest.raises(ValueError, match=match):
        parse_run_config(override)

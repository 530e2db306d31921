from pathlib import Path

import pytest
import tomllib
from flwr.common.config import flatten_dict

from lordba_fl.methods.lordba.budgets import FlipControl
from lordba_fl.methods import make_method
from lordba_fl.runconfig import DEFAULTS, RunConfig, parse_run_config
from lordba_fl.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_mirrors_the_defaults():
    with (ROOT / "pyproject.toml").open("rb") as f:
        cfg = flatten_dict(tomllib.load(f)["tool"]["flwr"]["app"]["config"])
    assert cfg == DEFAULTS
    assert parse_run_config(cfg) == RunConfig()


def test_overrides_are_typed_and_nested():
    cfg = parse_run_config({"rank": 8, "train.local-steps": 2, "flip.budget": 0.5, "scales": "out,in",
                            "server.beta": 1, "data.shakespeare.min-lines": 50, "client.state": "latent+optimizer",
                            "client.state-dtype": "fp16", "resume": "true"})
    lordba = make_method(cfg).cfg  # LoRDBA's own keys reach its settings
    assert cfg.rank == 8 and cfg.train == TrainConfig(steps=2) and lordba.flip == FlipControl(flip_budget=0.5)
    assert lordba.stateful and lordba.client_state_dtype == "fp16" and cfg.resume is True
    assert lordba.scales == ("in", "out") and lordba.beta == 1.0  # a LoRDBA key, in canonical order
    assert cfg.task_kwargs() == {"min_lines": 50, "max_clients": None, "sdist": None}
    assert lordba.train == cfg.train and lordba.rank == 8  # and the run's shared values
    assert cfg.task_options["gsm"]["num_clients"] == 8


@pytest.mark.parametrize(
    "override, match",
    [
        ({"rnak": 3}, "unknown run config key 'rnak'"),
        ({"rank": "abc"}, "'rank' must be a int"),
        ({"resume": "maybe"}, "true or false"),
        ({"client.state": "all"}, "'client.state' must be one of"),
        ({"client.state-dtype": "int4"}, "'client.state-dtype' must be one of"),
        ({"client.state": "latent", "method": "lora-fedavg"}, "'client.state' is a key of method lordba; method 'lora-fedavg' does not take it"),
        ({"client.state": "latent+optimizer", "train.optimizer": "sgd"}, "set train.optimizer=adamw"),
        ({"device": "tpu"}, "device must be auto, cpu, cuda"),
        ({"method": "fedprox"}, "'method' must be one of .*'lordba'"),
        ({"model": "gpt2"}, "'model' must be one of .*'smollm2-135m'"),
        ({"quant": "int3"}, "'quant' must be one of .*'q4_1'"),
        ({"task": "mnist"}, "'task' must be one of .*'shakespeare'"),
        ({"alpha": 0.0}, "'alpha' must be > 0"),
        ({"server.history": 0}, "'server.history' must be >= 1"),
        ({"codec.level": 30}, r"codec.level must be an integer in \[-7, 22\]"),
        ({"codec.level": -8}, r"codec.level must be an integer in \[-7, 22\]"),
        ({"codec.scale-encoding": "fp8"}, r"'codec.scale-encoding' must be one of \['q8', 'q4', 'q3', 'q2', 'fp16'\]"),
        ({"codec.scale-fraction": 0.0}, r"'codec.scale-fraction' must be a fraction in \(0, 1\]"),
        ({"codec.scale-fraction": 0.5, "codec.scale-error-feedback": False}, "only codec.scale-error-feedback keeps: set codec.scale-error-feedback=true"),
        ({"codec.scale-fraction": 0.5, "codec.scale-error-feedback": True, "codec.state-scale-encoding": "q4",
          "server.rebase-scales": True},
         "set server.rebase-scales=false"),
        ({"eval.examples": -1}, "'eval.examples' must be >= 0"),
        ({"seed": -3}, "'seed' must be >= 0"),
        ({"scales": "in,top"}, "'scales' must be a non-empty comma list"),
        ({"faults.fail-prob": 1.5}, "faults.fail-prob must be a probability"),
        ({"faults.attack": "nan-scales"}, "run config 'faults.attack' must be one of"),
        ({"server.scale-rule": "mode"}, "'server.scale-rule' must be one of"),
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


def test_every_key_is_declared_once_with_help_and_the_reference_page_is_current():
    from lordba_fl.options import declared_keys
    from simulations.docs import CONFIG_PAGE, configuration_page

    from lordba_fl.runconfig import builtin_method_keys, method_keys

    keys = declared_keys(RunConfig)
    own = builtin_method_keys()  # the built-in methods' own keys (LoRDBA's), declared on their settings
    assert not set(keys) & set(own)  # each key declared once: the core's or one method's
    assert sorted([*keys, *own]) == sorted(k for k in DEFAULTS if not k.startswith("data."))
    assert all(help_ for _, _, help_ in [*keys.values(), *method_keys("lordba").values()])
    assert CONFIG_PAGE.read_text() == configuration_page(), "run lordba-fl docs"


def test_one_zstd_level_range_for_the_run_and_the_codec():
    from lordba_fl.methods.lordba.codec import CodecOptions

    assert parse_run_config({"codec.level": -7}).codec_level == -7  # zstd's fast levels are accepted everywhere
    for bad in (23, -8, 2.5, True):
        with pytest.raises(ValueError, match=r"codec.level must be an integer in \[-7, 22\]"):
            CodecOptions(level=bad)

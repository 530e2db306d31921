import pytest

from lordba_fl import LoRDBAConfig


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"rank": 0}, "rank must be a positive integer"),
        ({"rank": 2.5}, "rank must be a positive integer"),
        ({"rank": True}, "rank must be a positive integer"),
        ({"alpha": -1.0}, "alpha must be a finite number > 0"),
        ({"alpha": float("nan")}, "alpha must be a finite number > 0"),
        ({"target_modules": []}, "target_modules must be a non-empty list"),
        ({"ste": "tanh"}, "ste must be one of ['clipped', 'smooth']"),
        ({"ste_k": 0}, "ste_k must be a finite number > 0"),
        ({"init": "lora"}, "init must be one of ['scratch', 'svd']"),
        ({"init_std": float("inf")}, "init_std must be a finite number > 0"),
        ({"scales": ()}, "scales must be a non-empty subset"),
        ({"scales": ("out", "out")}, "scales must be a non-empty subset"),
        ({"scales": ("left",)}, "scales must be a non-empty subset"),
        ({"svd_sweeps": -1}, "svd_sweeps must be an integer >= 0"),
        ({"seed": "1"}, "seed must be an integer or None"),
    ],
)
def test_bad_config_names_the_field_and_fix(kwargs, fragment):
    with pytest.raises(ValueError) as e:
        LoRDBAConfig(**kwargs)
    assert fragment in str(e.value)


def test_defaults_and_normalisation():
    cfg = LoRDBAConfig(rank=8, alpha=16, scales=["out", "in"], target_modules="q_proj")
    assert cfg.scaling == 2.0
    assert cfg.scales == ("in", "out")  # canonical order
    assert cfg.target_modules == ("q_proj",)
    d = LoRDBAConfig().to_dict()
    assert d["scales"] == ["in", "mid", "out"] and d["ste"] == "smooth" and d["ste_k"] == 100.0


def test_dict_round_trip_and_unknown_keys():
    cfg = LoRDBAConfig(rank=4, alpha=4, ste="clipped", scales=("mid", "out"), seed=3)
    assert LoRDBAConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"unknown LoRDBAConfig keys \['rnak'\]"):
        LoRDBAConfig.from_dict({"rnak": 4})

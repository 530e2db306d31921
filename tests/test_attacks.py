"""Byzantine attacks as a registry: each built-in's forms computed by hand, a user's attack by import
path, and the errors that name the fix."""

import numpy as np
import pytest
import torch

from lordba_fl.attacks import Attack
from lordba_fl.registry import ATTACKS
from lordba_fl.runconfig import parse_run_config


def test_every_builtin_form_by_hand():
    flips, delta = torch.tensor([True, False, False]), torch.tensor([0.5, -1.0])
    start, update = np.array([1.0, -2.0], np.float32), np.array([0.25, 0.5], np.float32)
    a, bt = torch.tensor([[1.0, -1.0]]), torch.tensor([[2.0], [3.0]])
    inv, all_, boom = ATTACKS.get("invert-flips"), ATTACKS.get("flip-all"), ATTACKS.get("explode-scales")
    assert inv.signs(flips, delta)[0].tolist() == [False, True, True]
    assert all_.signs(flips, delta)[0].tolist() == [True, True, True]
    assert boom.signs(flips, delta)[1].tolist() == [5000.0, -10000.0]
    assert inv.update(start, update).tolist() == [-0.25, -0.5]
    assert all_.update(start, update).tolist() == [-2.25, 3.5]  # -(start + u) - start: the trained values negated
    assert boom.update(start, update).tolist() == [2500.0, 5000.0]
    ia, ibt = inv.factors(a, bt)
    assert torch.equal(ia, a) and torch.equal(ibt, -bt)
    fa, fbt = all_.factors(a, bt)
    assert torch.equal(fbt @ fa, bt @ a)  # every sign flipped, the product unchanged
    assert [f.coefficient(2.0) for f in (inv, all_, boom)] == [-2.0, -2.0, 20000.0]
    assert ATTACKS.get("replay").replays and not inv.replays


def test_a_users_attack_by_import_path_and_the_errors(tmp_path, monkeypatch):
    (tmp_path / "userattacks.py").write_text(
        "from lordba_fl.attacks import Attack\n"
        "ZERO = Attack(signs=lambda f, d: (f & False, d * 0), update=lambda s, u: u * 0)\n"
        "NOT_ONE = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = parse_run_config({"faults.attack": "userattacks:ZERO", "faults.byzantine-fraction": 0.25})
    zero = ATTACKS.get(cfg.faults.attack)
    flips, delta = zero.form("signs", "userattacks:ZERO")(torch.tensor([True, False]), torch.tensor([1.5]))
    assert flips.tolist() == [False, False] and delta.tolist() == [0.0]
    with pytest.raises(ValueError, match="attack 'userattacks:ZERO' has no 'coefficient' form"):
        zero.form("coefficient", "userattacks:ZERO")
    with pytest.raises(ValueError, match="is not a lordba_fl.attacks.Attack"):
        parse_run_config({"faults.attack": "userattacks:NOT_ONE"})
    with pytest.raises(ValueError, match=r"must be one of \['explode-scales', 'flip-all', 'invert-flips', 'replay'\]"):
        parse_run_config({"faults.attack": "nope"})
    assert isinstance(zero, Attack)

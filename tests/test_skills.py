"""The skills task: one reasoning-gym family per group of clients, held-out problems disjoint from training."""

import pytest

from lordba_fl.data.skills import load
from lordba_fl.data.tasks import load_task
from lordba_fl.scoring import first_line

FAMILIES = "spell_backward,chain_sum"


def test_each_client_owns_one_family_and_eval_is_disjoint():
    task = load(families=FAMILIES, clients_per_family=2, per_client=10, eval_per_family=6)
    assert task.clients == ["spell_backward:0", "spell_backward:1", "chain_sum:0", "chain_sum:1"]
    assert [len(t) for t in task.train] == [9] * 4 and [len(t) for t in task.test] == [1] * 4
    spell = [ex for part in task.train[:2] + task.test[:2] for ex in part]
    assert all("backward" in ex.prompt for ex in spell)
    assert not any("backward" in ex.prompt for part in task.train[2:] for ex in part)
    heldout = task.server_eval["heldout"]
    assert len(heldout) == 12
    # interleaved: every even position is the first family, every odd one the second
    assert all(("backward" in ex.prompt) == (i % 2 == 0) for i, ex in enumerate(heldout))
    train_prompts = {ex.prompt for part in task.train + task.test for ex in part}
    assert not train_prompts & {ex.prompt for ex in heldout}
    assert len({ex.prompt for ex in heldout}) == 12
    # the target is the answer on one line, which is what exact match extracts from a generation
    assert all(ex.target == ex.answer + "\n" and first_line(ex.target) == ex.answer for ex in heldout)
    assert task.metric == "exact-match"


def test_same_options_same_problems():
    a = load(families=FAMILIES, per_client=6, eval_per_family=3)
    b = load_task("skills", families=FAMILIES, per_client=6, eval_per_family=3)
    assert [[e.prompt for e in p] for p in a.train] == [[e.prompt for e in p] for p in b.train]
    c = load(families=FAMILIES, per_client=6, eval_per_family=3, seed=1)
    assert [e.prompt for e in c.train[0]] != [e.prompt for e in a.train[0]]


@pytest.mark.parametrize("options, message", [
    ({"families": "no_such_family"}, "not a reasoning-gym dataset"),
    ({"families": "chain_sum,chain_sum"}, "distinct"),
    ({"families": ""}, "comma list"),
    ({"per_client": 1}, "per-client >= 2"),
    ({"clients_per_family": 0}, "clients-per-family >= 1"),
    ({"test_fraction": 1.0}, "test-fraction"),
])
def test_bad_options_name_the_fix(options, message):
    with pytest.raises(ValueError, match=message):
        load(**{"families": FAMILIES, "per_client": 4, "eval_per_family": 2, **options})

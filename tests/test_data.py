import pytest

from lordba_fl.data import load_task
from lordba_fl.data.gsm import extract_answer
from lordba_fl.data.shakespeare import parse_play

PLAY = """THE TEMPEST

ACT I.

SCENE I. On a ship at sea.

[Enter a Master and a Boatswain.]

MASTER.
Boatswain!

BOATSWAIN.
Here, master: what cheer?
[Exit.]

Ham.
To be, or not to be,
that is the question.

EGEUS
Happy be Theseus!
"""


def test_parse_play_by_hand():
    assert parse_play(PLAY) == [
        ("MASTER", ["Boatswain!"]),
        ("BOATSWAIN", ["Here, master: what cheer?"]),
        ("Ham", ["To be, or not to be,", "that is the question."]),
        ("EGEUS", ["Happy be Theseus!"]),
    ]


@pytest.mark.parametrize(
    "text, want", [("so 3 + 4 = 7\n#### 7", "7"), ("#### 1,234.5", "1234.5"), ("#### -12 apples", "-12"), ("no answer", None)]
)
def test_extract_answer(text, want):
    assert extract_answer(text) == want


def test_gsm_templates_split_naturally():
    task = load_task("gsm", num_clients=4, per_template=3, eval_per_template=1, progress=False)
    owned = [set(name.split(":")[1].split(",")) for name in task.clients]
    assert all(a.isdisjoint(b) for i, a in enumerate(owned) for b in owned[i + 1 :])  # each client its own templates
    assert sum(len(o) for o in owned) == task.info["seen_templates"] == 85 - 15
    assert len(task.server_eval["unseen"]) == 15 and len(task.server_eval["seen"]) == 70
    for ex in task.train[0] + task.server_eval["unseen"]:
        assert extract_answer(ex.target) == ex.answer  # the worked solution ends in #### N
    # evaluation problems are not training problems
    train_q = {ex.prompt for part in task.train + task.test for ex in part}
    assert not train_q & {ex.prompt for ex in task.server_eval["seen"]}
    mixed = load_task("gsm", num_clients=4, per_template=3, dirichlet_alpha=0.3, progress=False)
    assert sum(len(a) + len(b) for a, b in zip(mixed.train, mixed.test)) == 70 * 3


@pytest.mark.real_model
def test_shakespeare_roles_from_the_gutenberg_texts():
    task = load_task("shakespeare", progress=False)
    # LEAF reports 1,333 (play, role) pairs and 296 with >= 100 lines on its own parse of the complete works
    assert 1200 < task.info["pairs"] < 1600 and 250 < task.num_partitions < 330
    assert task.clients[0] == "hamlet/Ham"  # the largest part
    assert all(len(tr) and len(te) for tr, te in zip(task.train, task.test))
    with pytest.raises(ValueError, match="num-supernodes"):
        task.check_partition(task.num_partitions)
    with pytest.raises(ValueError, match="unknown task"):
        load_task("mnist")
    with pytest.raises(ValueError, match="has no option"):
        load_task("shakespeare", num_clients=3)

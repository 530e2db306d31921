"""``skills``: procedural skills from ``reasoning-gym``'s generators, one family per group of clients.

Each family (a reasoning-gym dataset name, e.g. ``spell_backward``) is a skill with a single correct
short answer. ``clients_per_family`` clients own each family (the natural non-IID split: a client
never sees another family's problems), each with ``per_client`` training problems and a held-out
tenth. The server evaluates on ``eval_per_family`` held-out problems of *every* family, drawn from a
seed disjoint from the training seeds and de-duplicated against every training question; the metric
is the exact match of the first generated line with the answer.

Why these default families: a 135M model gets each of them partly right after a few hundred
fine-tuning examples, they differ enough that one rank-1 direction cannot serve all four (string
reversal at character and at word level, small-integer arithmetic, counting), and their answers are
short (under 40 tokens), so exact match is cheap to generate.
"""

from __future__ import annotations

from random import Random

from lordba_fl.data.tasks import Example, FederatedTask

DEFAULT_FAMILIES = ("spell_backward", "word_sequence_reversal", "chain_sum", "letter_counting")
# eval problems come from this seed offset: disjoint from every training seed (seed * 1000 + family index)
_EVAL_SEED_OFFSET = 500


def _examples(name: str, seed: int, size: int) -> list[Example]:
    import reasoning_gym

    try:
        ds = reasoning_gym.create_dataset(name, seed=seed, size=size)
    except (KeyError, ValueError) as e:
        known = ", ".join(sorted(reasoning_gym.factory.DATASETS))
        raise ValueError(f"skills family {name!r} is not a reasoning-gym dataset ({e}); known: {known}") from None
    out = []
    for i in range(size):
        ex = ds[i]
        answer = str(ex["answer"]).strip()
        if "\n" in answer or not answer:
            raise ValueError(f"skills family {name!r} has a multi-line or empty answer; exact match scores one "
                             "line: choose a family with short single-line answers")
        out.append(Example(f"Question: {ex['question'].strip()}\nAnswer: ", answer + "\n", answer))
    return out


def load(families: str = ",".join(DEFAULT_FAMILIES), clients_per_family: int = 2, per_client: int = 64,
         eval_per_family: int = 50, seed: int = 0, test_fraction: float = 0.1) -> FederatedTask:
    """The skills task: ``len(families) * clients_per_family`` clients, ``eval_per_family`` held-out
    problems per family for the server (one ``heldout`` set, families interleaved).

    Parameters
    ----------
    families : str
        Comma list of reasoning-gym dataset names; each becomes the skill of ``clients_per_family`` clients.
    clients_per_family : int
        Clients owning each family (client ``c`` owns family ``c // clients_per_family``).
    per_client : int
        Problems generated per client (a tenth, at least one, is its own held-out set).
    eval_per_family : int
        Server-side held-out problems per family (``eval.examples`` takes the first ones; interleaved,
        so any prefix covers every family evenly).
    seed : int
        Generator seed; training and evaluation seeds are disjoint.
    test_fraction : float
        Share of each client's problems held out for the client's own evaluation.
    """
    names = [f.strip() for f in families.split(",") if f.strip()]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"data.skills.families must be a comma list of distinct reasoning-gym datasets; got {families!r}")
    if clients_per_family < 1 or per_client < 2 or eval_per_family < 1:
        raise ValueError("data.skills needs clients-per-family >= 1, per-client >= 2 (one to train, one held out) and "
                         f"eval-per-family >= 1; got {clients_per_family}, {per_client}, {eval_per_family}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"data.skills.test-fraction must be in (0, 1); got {test_fraction}")
    clients, train, test, heldout = [], [], [], []
    for f, name in enumerate(names):
        pool = _examples(name, seed * 1000 + f, clients_per_family * per_client)
        seen = {ex.prompt for ex in pool}
        candidates = _examples(name, seed * 1000 + _EVAL_SEED_OFFSET + f, 4 * eval_per_family)
        fresh = [ex for ex in candidates if ex.prompt not in seen]
        fresh = list({ex.prompt: ex for ex in fresh}.values())[:eval_per_family]
        if len(fresh) < eval_per_family:
            raise ValueError(f"skills family {name!r} yields only {len(fresh)} held-out problems unlike every training "
                             f"one (asked {eval_per_family}): lower data.skills.eval-per-family or per-client")
        heldout.append(fresh)
        for c in range(clients_per_family):
            mine = pool[c * per_client : (c + 1) * per_client]
            Random(seed * 7919 + f * 31 + c).shuffle(mine)
            n_test = max(1, int(round(len(mine) * test_fraction)))
            clients.append(f"{name}:{c}")
            train.append(mine[:-n_test])
            test.append(mine[-n_test:])
    interleaved = [ex for group in zip(*heldout) for ex in group]  # family 0, 1, ..., 0, 1, ...
    return FederatedTask("skills", clients, train, test, {"heldout": interleaved}, metric="exact-match",
                         max_new_tokens=40, info={"families": names, "eval_per_family": eval_per_family})

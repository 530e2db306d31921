"""``gsm``: GSM8K-style word problems generated offline by ``reasoning-gym`` (``gsm_symbolic``).

The 85 templates are split into *seen* templates, dealt to clients (each client draws from its own
templates: the natural non-IID split; ``dirichlet_alpha`` mixes them across clients instead, via
``flwr-datasets``' ``DirichletPartitioner``), and *unseen* templates kept for evaluation. Clients
train on the worked solution (``metadata["answer_cot"]``, ending in ``#### N``); the metric is the
exact match of the final number on fixed held-out sets of unseen and of seen templates.
"""

from __future__ import annotations

import re
from random import Random

from lordba_fl.data.tasks import Example, FederatedTask

_ANSWER = re.compile(r"####\s*(-?[\d,]*\.?\d+)")


def extract_answer(text: str) -> str | None:
    """The number after the first ``####`` (commas removed), or None."""
    m = _ANSWER.search(text)
    return m.group(1).replace(",", "") if m else None


def _problem(gen, seed: int) -> Example:
    ex = gen(Random(seed), 1.0)
    cot = ex["metadata"]["answer_cot"].strip()
    return Example(f"Question: {ex['question']}\nAnswer: ", cot + "\n", str(ex["answer"]))


def load(num_clients: int = 8, per_template: int = 24, unseen_templates: int = 15, eval_per_template: int = 2,
         dirichlet_alpha: float | None = None, seed: int = 0, test_fraction: float = 0.1,
         progress: bool = True) -> FederatedTask:
    from reasoning_gym.arithmetic.gsm_symbolic import gsm_symbolic
    from reasoning_gym.arithmetic.gsm_symbolic.gsm_symbolic import GSMSymbolicDataset, GSMSymbolicDatasetConfig

    templates = sorted(set(gsm_symbolic.tasks_ok))
    rng = Random(seed)
    rng.shuffle(templates)
    unseen, seen = templates[:unseen_templates], templates[unseen_templates:]
    if num_clients < 1 or num_clients > len(seen):
        raise ValueError(f"num_clients must be in [1, {len(seen)}] (one seen template at least each); got {num_clients}")
    gens = GSMSymbolicDataset(GSMSymbolicDatasetConfig(seed=seed, size=1)).generators
    from tqdm.auto import tqdm

    base = 10_000 * (seed + 1)
    pool = {t: [_problem(gens[t], base + 1000 * t + i) for i in range(per_template)]
            for t in tqdm(seen, desc="gsm: generating problems", disable=not progress)}
    # evaluation problems use seeds disjoint from the training ones
    server_eval = {
        "unseen": [_problem(gens[t], base + 1000 * t + 500 + i) for t in unseen for i in range(eval_per_template)],
        "seen": [_problem(gens[t], base + 1000 * t + 500 + i) for t in seen for i in range(eval_per_template)],
    }
    if dirichlet_alpha is None:
        owners = {t: i % num_clients for i, t in enumerate(seen)}  # each client owns whole templates
        parts = [[ex for t in seen if owners[t] == c for ex in pool[t]] for c in range(num_clients)]
        names = [f"templates:{','.join(str(t) for t in seen if owners[t] == c)}" for c in range(num_clients)]
    else:
        import datasets
        from flwr_datasets.partitioner import DirichletPartitioner

        flat = [(t, ex) for t in seen for ex in pool[t]]
        table = datasets.Dataset.from_dict({"template": [t for t, _ in flat], "idx": list(range(len(flat)))})
        part = DirichletPartitioner(num_partitions=num_clients, partition_by="template", alpha=dirichlet_alpha,
                                    min_partition_size=2, seed=seed)
        part.dataset = table
        parts = [[flat[i][1] for i in part.load_partition(c)["idx"]] for c in range(num_clients)]
        names = [f"dirichlet{dirichlet_alpha}:{c}" for c in range(num_clients)]
    train, test = [], []
    for ex in parts:
        Random(seed).shuffle(ex)
        n_test = max(1, int(round(len(ex) * test_fraction)))
        train.append(ex[:-n_test])
        test.append(ex[-n_test:])
    return FederatedTask("gsm", names, train, test, server_eval, metric="exact-match", answer_of=extract_answer,
                         info={"seen_templates": len(seen), "unseen_templates": len(unseen)})

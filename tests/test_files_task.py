"""task='files': local JSON Lines / CSV / Parquet / save_to_disk data, each partitioning and metric,
and the errors that name the fix."""

import json

import pandas as pd
import pytest
import torch

from lordba_fl.data import Example, FederatedTask, load_client_data, load_task
from lordba_fl.data.files import load
from lordba_fl.runconfig import parse_run_config
from lordba_fl.scoring import label_accuracy, target_logprobs
from lordba_fl.train import evaluate_loss


@pytest.fixture(scope="module")
def tiny_model_and_tok():
    from lordba_fl.base.models import load_model

    return load_model("tiny-llama")


def _rows(n_users=5, per_user=6):
    return [{"user": f"u{u}", "question": f"What is {u} plus {i}?", "answer": str(u + i),
             "sentiment": "pos" if (u + i) % 2 else "neg", "text": f"user {u} line {i}"}
            for u in range(n_users) for i in range(per_user)]


def _write(tmp_path, rows, fmt):
    df = pd.DataFrame(rows)
    if fmt == "jsonl":
        p = tmp_path / "data.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "csv":
        p = tmp_path / "data.csv"
        df.to_csv(p, index=False)
    elif fmt == "parquet":
        p = tmp_path / "data.parquet"
        df.to_parquet(p)
    else:
        import datasets

        p = tmp_path / "saved"
        datasets.Dataset.from_pandas(df).save_to_disk(str(p))
    return str(p)


def _all(task: FederatedTask) -> list[tuple[str, str]]:
    return sorted((e.prompt, e.target) for part in task.train + task.test for e in part)


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet", "disk"])
def test_every_format_reads_the_same_rows(tmp_path, fmt):
    rows = _rows()
    task = load(path=_write(tmp_path, rows, fmt), prompt_column="question", target_column="answer", num_clients=3)
    assert _all(task) == sorted((r["question"], r["answer"]) for r in rows)  # every row exactly once
    assert task.num_partitions == 3 and all(len(t) >= 1 for t in task.test)
    assert all(e.answer == e.target for part in task.train for e in part)


def test_partition_by_packs_whole_ids_into_clients(tmp_path):
    rows = _rows(n_users=5, per_user=6)
    path = _write(tmp_path, rows, "jsonl")
    task = load(path=path, prompt_column="question", target_column="answer", partition_by="user", num_clients=2)
    owner = {r["question"]: r["user"] for r in rows}
    users = [{owner[e.prompt] for e in tr + te} for tr, te in zip(task.train, task.test)]
    assert sorted(len(u) for u in users) == [2, 3] and not users[0] & users[1]  # 5 ids, none split
    one_each = load(path=path, prompt_column="question", target_column="answer", partition_by="user", num_clients=0)
    assert one_each.num_partitions == 5 and one_each.clients == [f"user=u{i}" for i in range(5)]
    # 6 rows, test-fraction 0.1 -> round(0.6) = 1 held out per client
    assert [len(t) for t in one_each.test] == [1] * 5 and [len(t) for t in one_each.train] == [5] * 5


def test_dirichlet_split_by_label_keeps_every_row(tmp_path):
    rows = _rows(n_users=10, per_user=10)
    task = load(path=_write(tmp_path, rows, "parquet"), prompt_column="question", target_column="sentiment",
                label_column="sentiment", dirichlet_alpha=0.5, num_clients=4, metric="label-accuracy")
    assert _all(task) == sorted((r["question"], r["sentiment"]) for r in rows)
    assert task.labels == ["neg", "pos"] and task.metric == "label-accuracy"


def test_text_column_is_plain_language_modelling(tmp_path):
    rows = _rows(n_users=2, per_user=4)
    task = load(path=_write(tmp_path, rows, "csv"), text_column="text", num_clients=2)
    assert all(e.prompt == "" for part in task.train for e in part)
    assert sorted(e.target for part in task.train + task.test for e in part) == sorted(r["text"] for r in rows)


def test_run_config_reaches_the_files_task_and_the_client_cache_follows_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("LORDBA_FL_CACHE", str(tmp_path / "cache"))
    path = _write(tmp_path, _rows(n_users=3, per_user=4), "jsonl")
    cfg = parse_run_config({"task": "files", "data.files.path": path, "data.files.prompt-column": "question",
                            "data.files.target-column": "answer", "data.files.partition-by": "user",
                            "data.files.num-clients": 0})
    first = load_client_data(cfg.task, 0, **cfg.task_kwargs())
    assert first.num_partitions == 3 and len(first.train) + len(first.test) == 4
    # the same options on a changed file are a new cache entry, not stale partitions
    _write(tmp_path, _rows(n_users=4, per_user=4), "jsonl")
    assert load_client_data(cfg.task, 0, **cfg.task_kwargs()).num_partitions == 4


@pytest.mark.parametrize(
    "options, match",
    [
        ({"path": "/nonexistent/data.jsonl", "target_column": "answer"}, "does not exist"),
        ({"path": "", "target_column": "answer"}, "needs data.files.path"),
        ({"target_column": "nope"}, r"'nope' is not a column of the data; its columns are \['user'"),
        ({"prompt_column": "q", "target_column": "answer"}, "data.files.prompt-column='q' is not a column"),
        ({"target_column": "answer", "partition_by": "user", "num_clients": 9}, "has 5 distinct ids, fewer than"),
        ({"target_column": "answer", "num_clients": 16}, "each client needs >= 2"),
        ({"target_column": "answer", "text_column": "text"}, "not both"),
        ({}, "needs either data.files.target-column"),
        ({"target_column": "answer", "metric": "bleu"}, "metric must be one of"),
        ({"target_column": "answer", "dirichlet_alpha": 0.3}, "set data.files.label-column too"),
        ({"text_column": "text", "metric": "exact-match"}, "scores a target"),
        ({"target_column": "answer", "test_fraction": 1.0}, r"test-fraction must be in \(0, 1\)"),
    ],
)
def test_bad_files_options_name_the_fix(tmp_path, options, match):
    path = _write(tmp_path, _rows(n_users=5, per_user=6), "jsonl")
    with pytest.raises(ValueError, match=match):
        load(**{"path": path, **options})


def test_unknown_format_and_empty_targets_are_refused(tmp_path):
    bad = tmp_path / "data.txt"
    bad.write_text("hello")
    with pytest.raises(ValueError, match="unknown format '.txt'"):
        load(path=str(bad), target_column="a")
    rows = _rows(n_users=2, per_user=3)
    rows[2]["answer"] = ""
    with pytest.raises(ValueError, match="1 rows have an empty 'answer' .first: row 2."):
        load(path=_write(tmp_path, rows, "jsonl"), target_column="answer", num_clients=2)


@pytest.mark.real_model
def test_label_scores_are_target_log_likelihoods(tiny_model_and_tok):
    model, tok = tiny_model_and_tok
    ex = Example("Review: fine.\nSentiment:", " pos")
    # one example's summed log-likelihood is minus its token-weighted loss times its token count
    ref = evaluate_loss(model, tok, [ex], seq_len=64)
    assert target_logprobs(model, tok, [ex], seq_len=64)[0] == pytest.approx(-ref["eval_loss"] * ref["eval_tokens"],
                                                                            rel=1e-5)
    examples = [Example("a:", "x", answer="x"), Example("b:", "y", answer="y"), Example("c:", "x", answer="y")]
    task = FederatedTask("t", ["c0"], [examples], [examples], metric="label-accuracy", labels=["x", "y"])
    scores = torch.tensor(target_logprobs(model, tok, [Example(e.prompt, lab) for e in examples for lab in "xy"],
                                          seq_len=64)).view(3, 2)
    expected = sum("xy"[int(s.argmax())] == e.answer for s, e in zip(scores, examples)) / 3
    assert label_accuracy(model, tok, task, examples, seq_len=64) == expected


def test_a_task_returning_something_else_is_refused(tmp_path, monkeypatch):
    (tmp_path / "badtask.py").write_text("def load():\n    return [1, 2]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="returned list, not a lordba_fl.data.FederatedTask"):
        load_task("badtask:load")

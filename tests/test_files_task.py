"""task='files': local JSON Lines / CSV / Parquet / save_to_disk data, each partitioning and metric,
and the errors that name the fix."""

import json
import math

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


class WordTok:
    """One id per whitespace-separated word (ids from 10), EOS = 2: lengths are countable by eye."""

    eos_token_id = 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [10 + len(w) for w in text.split()]}


def test_a_long_prompt_loses_its_first_tokens_and_the_target_stays_whole():
    from lordba_fl.train import IGNORE, encode_example

    tok = WordTok()
    ex = Example("a bb ccc dddd eeeee ffffff", "x yy", whole_target=True)  # 6 prompt + 2 target + EOS
    ids, labels = encode_example(tok, ex, seq_len=5)
    assert ids == [15, 16, 11, 12, 2]  # the prompt's last 2 words, the whole target and EOS
    assert labels == [IGNORE, IGNORE, 11, 12, 2]
    assert encode_example(tok, ex, seq_len=9) == ([11, 12, 13, 14, 15, 16, 11, 12, 2], [IGNORE] * 6 + [11, 12, 2])


def test_a_target_that_cannot_fit_is_an_error_when_scored_and_cut_when_language_modelling():
    from lordba_fl.train import IGNORE, TargetTooLongError, check_targets_fit, encode_example

    tok = WordTok()
    scored = Example("p q", "a b c d", whole_target=True)  # 4 target + EOS, plus >= 1 prompt token: needs 6
    with pytest.raises(TargetTooLongError, match="raise train.seq-len to >= 6"):
        encode_example(tok, scored, seq_len=5)
    assert encode_example(tok, scored, seq_len=6)[0] == [10 + 1, 11, 11, 11, 11, 2]
    with pytest.raises(TargetTooLongError, match=r"1 of 2 examples .* \(longest needs 6"):
        check_targets_fit(tok, [scored, Example("p", "a", whole_target=True)], seq_len=5)
    check_targets_fit(tok, [scored], seq_len=6)
    lm = Example("", "a b c d e f")  # plain text: its first seq_len tokens are learned
    assert encode_example(tok, lm, seq_len=4) == ([11] * 4, [11] * 4)
    cue = Example("ROLE:", "a b c d e f")  # a cue and a long speech: the cue and the speech's head
    assert encode_example(tok, cue, seq_len=4) == ([15, 11, 11, 11], [IGNORE, 11, 11, 11])


def test_label_accuracy_scores_labels_as_they_are_trained(tmp_path):
    rows = [{"text": f"headline {i}", "topic": [" business", " sports"][i % 2]} for i in range(12)]
    task = load(path=_write(tmp_path, rows, "jsonl"), prompt_column="text", target_column="topic", num_clients=2,
                metric="label-accuracy")
    assert task.labels == [" business", " sports"]  # not stripped: the tokens training teaches
    assert all(e.answer == e.target and e.whole_target for part in task.train + task.test for e in part)


@pytest.mark.real_model
def test_the_launcher_runs_every_files_check_before_any_process(tmp_path):
    from simulations.run import _check_nodes

    rows = [{"q": "w " * 200, "a": "short", "u": f"u{i % 3}"} for i in range(9)]
    rows[4]["a"] = "long " * 150
    path = _write(tmp_path, rows, "jsonl")
    cfg = {"task": "files", "data.files.path": path, "data.files.prompt-column": "q", "data.files.target-column": "a",
           "data.files.partition-by": "u", "data.files.num-clients": 0, "train.seq-len": 64, "clients-per-round": 2}
    with pytest.raises(ValueError, match=r"1 of 9 examples have a target .* raise train.seq-len to >= 15\d"):
        _check_nodes(cfg, 3)
    rows[4]["a"] = "short"
    _write(tmp_path, rows, "jsonl")
    assert _check_nodes(cfg, 3) == 3  # 200-token prompts beside a 64-token window are fine: cut from the left
    with pytest.raises(ValueError, match="4 SuperNodes but the data gives 3 clients"):
        _check_nodes(cfg, 4)
    with pytest.raises(ValueError, match="does not exist"):
        _check_nodes({**cfg, "data.files.path": str(tmp_path / "gone.jsonl")}, 3)


@pytest.mark.real_model
def test_a_files_run_with_prompts_longer_than_seq_len_trains_and_scores_every_round(tmp_path, monkeypatch):
    from test_federation import _run

    monkeypatch.setenv("LORDBA_FL_CACHE", str(tmp_path / "cache"))
    words = "the market rallied as shares of the team rose after the match".split()
    rows = [{"text": " ".join(words[(i + j) % len(words)] for j in range(90)), "topic": [" business", " sports"][i % 2],
             "src": f"s{i % 4}"} for i in range(24)]
    path = _write(tmp_path, rows, "jsonl")
    _, run_dir, rows_out = _run(tmp_path, method="lora-fedavg", task="files", **{
        "data.files.path": path, "data.files.prompt-column": "text", "data.files.target-column": "topic",
        "data.files.partition-by": "src", "data.files.num-clients": 4, "data.files.metric": "label-accuracy",
        "train.seq-len": 32, "eval.examples": 8, "eval.generate": 0})
    assert [r["round"] for r in rows_out] == [0, 1, 2]
    n_eval = 4  # 1 held-out row of each of the 4 clients (test-fraction 0.1 of 6 rows)
    for r in rows_out:  # the metric in every round's record, without generation
        assert r["accuracy_pooled"] * n_eval == pytest.approx(round(r["accuracy_pooled"] * n_eval))
        assert math.isfinite(r["eval_loss"])
    assert rows_out[-1]["metric"] == "label-accuracy"

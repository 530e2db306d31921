"""Extending from a user's own package, with no edit to lordba_fl: a task, a method and an aggregator
named by import path, in process and on Flower's simulation engine; task='files' in a federation;
unknown names and bad import paths fail at start with the accepted names."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from localgrid import LocalGrid
from safetensors.torch import load_file

from clients.app import make_client_app
from lordba_fl.federation.apps import run_server
from lordba_fl.registry import AGGREGATORS, METHODS, TASKS, Registry
from lordba_fl.runconfig import DEFAULTS, method_keys, parse_run_config

ROOT = Path(__file__).resolve().parents[1]

USER_PACKAGE = {
    "__init__.py": "",
    "news.py": '''
        from lordba_fl.data import Example, FederatedTask

        def load(num_clients: int = 4, per_client: int = 6):
            """Desks of a newsroom; each writes its own kind of headline."""
            train = [[Example(f"Desk {c} headline {i}:", f" story number {c * 10 + i}\\n") for i in range(per_client)]
                     for c in range(num_clients)]
            test = [[Example(f"Desk {c} headline x:", f" story number {c}\\n", answer=f"story number {c}")]
                    for c in range(num_clients)]
            return FederatedTask("news", [f"desk{c}" for c in range(num_clients)], train, test, metric="exact-match")
    ''',
    "methods.py": '''
        from lordba_fl.methods.lora import LoRAFedAvg

        class MarkedFedAvg(LoRAFedAvg):
            """LoRA FedAvg that marks every aggregation (so a test can see it ran)."""
            name = "marked-fedavg"

            def aggregate(self, server_round, replies):
                metrics, rejected = super().aggregate(server_round, replies)
                metrics["user_method_rounds"] = float(server_round)
                return metrics, rejected
    ''',
    "damped.py": '''
        from dataclasses import dataclass

        from lordba_fl.methods import MethodSettings
        from lordba_fl.methods.lora import LoRAFedAvg
        from lordba_fl.options import option

        @dataclass(frozen=True)
        class DampedSettings(MethodSettings):
            step: float = option(0.5, "damped.step", "fraction of the averaged update the server applies")

            def __post_init__(self):
                if not 0.0 < self.step <= 1.0:
                    raise ValueError(f"damped.step must be in (0, 1]; got {self.step}")

        class DampedFedAvg(LoRAFedAvg):
            """FedAvg whose server takes a damped step: its own key, damped.step."""
            name = "damped-fedavg"
            settings_type = DampedSettings

            def aggregate(self, server_round, replies):
                before = self.global_values.clone()
                metrics, rejected = super().aggregate(server_round, replies)
                self.global_values = before + self.cfg.step * (self.global_values - before)
                return metrics, rejected
    ''',
    "agg2.py": '''
        from lordba_fl.methods.lordba.aggregation import make_refit

        BUDGETS = []

        def make_recording(spec, cfg):
            refit = make_refit(spec, cfg)
            def recording(server, updates, budget):
                BUDGETS.append(budget)
                return refit(server, updates, budget)
            return recording

        def make_old(spec, cfg):
            return lambda server, updates: server
    ''',
    "agg.py": '''
        from lordba_fl.methods.lordba.aggregation import ServerState
        from lordba_fl.methods.lordba.layout import AdapterState

        def make_keep(spec, cfg):
            """An aggregator that keeps the global adapter and only advances its version."""
            def keep(server, updates, budget):
                s = server.state
                return ServerState(AdapterState(s.version + 1, s.negative.clone(), s.scales.clone()), server.latent.clone())
            return keep
    ''',
}


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "userpkg"
    pkg.mkdir(parents=True)
    for name, text in USER_PACKAGE.items():
        (pkg / name).write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(pkg.parent))
    monkeypatch.setenv("LORDBA_FL_CACHE", str(tmp_path / "cache"))
    return pkg.parent


BASE = {
    "model": "tiny-llama", "rounds": 2, "clients-per-round": 4, "rank": 4, "alpha": 8.0, "train.local-steps": 1,
    "train.batch-size": 2, "train.seq-len": 48, "eval.examples": 4, "eval.generate": 2,
}


def _run(tmp_path: Path, **overrides) -> list[dict]:
    cfg = dict(DEFAULTS)
    cfg.update(BASE)
    cfg.update({"out-dir": str(tmp_path / "out")})
    cfg.update(overrides)
    grid = LocalGrid(make_client_app(), 4, cfg)
    for ctx in grid.contexts.values():
        ctx.run_config.update(cfg)
    run_server(grid, cfg)
    run_dir = next(d for d in (tmp_path / "out").iterdir() if d.is_dir())
    return run_dir, [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]


@pytest.mark.real_model
def test_user_task_and_method_by_import_path(tmp_path, user_package):
    run_dir, rows = _run(tmp_path, task="userpkg.news:load", method="userpkg.methods:MarkedFedAvg",
                         **{"data.userpkg.news:load.per-client": 5})
    assert run_dir.name == "userpkg.methods-MarkedFedAvg"
    assert [r.get("user_method_rounds") for r in rows] == [None, 1.0, 2.0]  # the user's aggregate ran
    assert rows[-1]["clients_succeeded"] == 4
    # the task declared exact-match: the report scores it on the pooled held-out sets (4 desks, 2 kept)
    assert rows[-1]["metric"] == "exact-match" and 0.0 <= rows[-1]["accuracy_pooled"] <= 1.0
    assert (run_dir / "peft_lora" / "adapter_config.json").is_file()


@pytest.mark.real_model
def test_user_aggregator_by_import_path_owns_the_global_state(tmp_path, user_package):
    run_dir, rows = _run(tmp_path, task="userpkg.news:load", method="lordba",
                         **{"server.aggregator": "userpkg.agg:make_keep", "flip.m0": 0.001, "flip.latent-lr": 0.05,
                            "flip.budget": 0.05, "train.local-steps": 2})
    first, last = load_file(str(run_dir / "ckpt-1.safetensors")), load_file(str(run_dir / "ckpt-2.safetensors"))
    assert rows[2]["accepted"] == 4 and rows[2]["client_flip_rate"] > 0  # the clients did move ...
    assert torch.equal(first["negative"], last["negative"]) and torch.equal(first["scales"], last["scales"])  # ... kept
    assert rows[2]["global_flip_rate"] == 0.0
    assert json.loads((run_dir / "ckpt-2.json").read_text())["method_state"]["version"] == 2  # and versioned


@pytest.mark.real_model
def test_files_task_in_a_federation(tmp_path, monkeypatch):
    monkeypatch.setenv("LORDBA_FL_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps({"shop": f"s{i % 4}", "review": f"Review {i}: {'great' if i % 2 else 'awful'}.",
                                        "label": "pos" if i % 2 else "neg"}) + "\n" for i in range(40)))
    run_dir, rows = _run(tmp_path, task="files", method="lora-fedavg", **{
        "data.files.path": str(data), "data.files.prompt-column": "review", "data.files.target-column": "label",
        "data.files.partition-by": "shop", "data.files.num-clients": 0, "data.files.metric": "label-accuracy"})
    assert rows[-1]["clients_succeeded"] == 4 and rows[-1]["metric"] == "label-accuracy"
    # 40 rows over 4 shops, 10 each, 1 held out each: 4 pooled held-out reviews, every one scored every
    # round (label accuracy generates nothing, so eval.generate does not limit it)
    assert all(r["accuracy_pooled"] in (0.0, 0.25, 0.5, 0.75, 1.0) for r in rows)


@pytest.mark.real_model
def test_user_task_and_method_on_the_simulation_engine(tmp_path, user_package):
    overrides = (f"task='userpkg.news:load' method='userpkg.methods:MarkedFedAvg' out-dir='{tmp_path / 'out'}' "
                 "rank=4 alpha=8.0 train.local-steps=1 eval.examples=4 eval.generate=0")
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               PYTHONPATH=os.pathsep.join([str(user_package), str(ROOT)]))
    proc = subprocess.run(
        [sys.executable, "-m", "simulations.run", "--quick", "--supernodes", "4", "--run-config", overrides],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "out" / "userpkg.methods-MarkedFedAvg" / "rounds.jsonl").open()]
    assert [r.get("user_method_rounds") for r in rows] == [None, 1.0, 2.0] and rows[-1]["clients_succeeded"] == 4


@pytest.mark.parametrize(
    "override, match",
    [
        ({"method": "lordbaa"}, r"unknown method 'lordbaa': run config 'method' must be one of \['fed-sb', 'fedkseed', 'ffa-lora', "
                                 r"'lora-fedavg'"),
        ({"task": "shakespear"}, r"unknown task 'shakespear': run config 'task' must be one of \['files', 'gsm', 'shakespeare', 'skills'\]"),
        ({"server.aggregator": "mean"}, r"must be one of \['refit', 'vote'\] or an import path"),
        ({"task": "no_such_pkg.tasks:load"}, "cannot import module 'no_such_pkg.tasks'"),
        ({"method": "lordba_fl.methods.lora:NoSuchMethod"}, "has no attribute 'NoSuchMethod'"),
        ({"method": "lordba_fl.methods.lora:"}, "must look like 'package.module:attribute'"),
    ],
)
def test_unknown_names_and_bad_import_paths_fail_at_start(override, match):
    with pytest.raises(ValueError, match=match):
        parse_run_config(override)


def test_a_method_path_must_name_a_method_class():
    from lordba_fl.methods import make_method

    cfg = parse_run_config({"method": "lordba_fl.data.gsm:load"})
    with pytest.raises(ValueError, match="not a subclass of lordba_fl.methods.Method"):
        make_method(cfg)


def test_registering_a_name():
    reg = Registry("widget", "widget", {"builtin": "os.path:join"})
    reg.register("mine", len)
    assert reg.get("mine") is len and reg.get("builtin") is os.path.join and reg.names() == ["builtin", "mine"]
    with pytest.raises(ValueError, match="'builtin' is built in"):
        reg.register("builtin", len)
    assert {"lordba", "lora-fedavg", "lora-q2", "ffa-lora"} <= set(METHODS.names())
    assert {"shakespeare", "gsm", "files"} <= set(TASKS.names()) and set(AGGREGATORS.names()) == {"refit", "vote"}


def test_a_method_receives_only_its_own_settings():
    from dataclasses import dataclass, fields

    from lordba_fl.methods import MethodSettings, make_method, settings_for
    from lordba_fl.methods.lordba import LoRDBASettings

    run = parse_run_config({"method": "lora-fedavg", "rank": 8, "lr": 0.002})
    lora = make_method(run)
    assert type(lora.cfg) is MethodSettings and lora.cfg == MethodSettings(8, 32.0, 0.002, 0, run.train, 3)
    assert not hasattr(lora.cfg, "task") and not hasattr(lora.cfg, "faults")
    lordba = make_method(parse_run_config({"server.flip-budget": 0.01}))
    assert type(lordba.cfg) is LoRDBASettings and lordba.cfg.server_flip_budget == 0.01
    assert not hasattr(lordba.cfg, "task")
    own = {path.split(".")[0] for path, _, _ in method_keys("lordba").values()}  # flip, dp, aggregator, ...
    run_fields = {f.name for f in fields(type(run))}
    assert {"flip", "dp", "aggregator", "client_state"} <= own and not own & run_fields  # LoRDBA's keys are its own
    assert {f.name for f in fields(LoRDBASettings)} - own < run_fields  # the rest: the run's shared values

    @dataclass(frozen=True)
    class Wants(MethodSettings):
        temperature: float

    with pytest.raises(ValueError, match=r"Wants asks for \['temperature'\], which the run config does not have"):
        settings_for(Wants, run)


@pytest.mark.real_model
def test_a_user_method_declares_its_own_key_and_uses_it(tmp_path, user_package):
    from lordba_fl.methods import make_method
    from simulations.docs import configuration_page

    method = "userpkg.damped:DampedFedAvg"
    assert make_method(parse_run_config({"method": method, "damped.step": 0.25})).cfg.step == 0.25
    assert make_method(parse_run_config({"method": method})).cfg.step == 0.5  # its declared default
    with pytest.raises(ValueError, match=r"damped.step must be in \(0, 1\]; got 0.0"):  # its own check, at start
        parse_run_config({"method": method, "damped.step": 0.0})
    with pytest.raises(ValueError, match="'damped.step' must be a float"):
        parse_run_config({"method": method, "damped.step": "half"})
    with pytest.raises(ValueError, match="unknown run config key 'damped.step'"):  # another method does not take it
        parse_run_config({"method": "lora-fedavg", "damped.step": 0.25})
    assert "| `damped.step` | `0.5` | fraction of the averaged update the server applies |" in configuration_page((method,))
    # it changes what the server does: a damped step of 0.25 moves the global adapter 1/4 as far as FedAvg
    start, moved = None, {}
    for step in (1.0, 0.25):
        run_dir, rows = _run(tmp_path / f"s{step}", task="userpkg.news:load", method=method, rounds=1,
                             **{"damped.step": step})
        assert rows[-1]["clients_succeeded"] == 4
        start = load_file(str(run_dir / "ckpt-0.safetensors"))["values"]  # the same seeded start in both
        moved[step] = load_file(str(run_dir / "ckpt-1.safetensors"))["values"] - start
    assert float(moved[1.0].abs().max()) > 0
    torch.testing.assert_close(moved[0.25], 0.25 * moved[1.0], rtol=0, atol=1e-3 * float(moved[1.0].abs().max()))


@pytest.mark.real_model
def test_a_user_aggregator_gets_the_rounds_budget_and_a_wrong_signature_is_refused_at_start(tmp_path, user_package):
    from userpkg.agg2 import BUDGETS

    BUDGETS.clear()
    _run(tmp_path / "a", task="userpkg.news:load", method="lordba", rounds=2,
         **{"server.aggregator": "userpkg.agg2:make_recording", "server.flip-budget": 0.01,
            "server.flip-budget-start": 0.04})
    assert BUDGETS == [0.04, 0.02]  # the halving schedule (down to 0.01) reaches a user's aggregator too
    with pytest.raises(ValueError, match="does not take .server_state, updates, budget."):
        _run(tmp_path / "b", task="userpkg.news:load", method="lordba", **{"server.aggregator": "userpkg.agg2:make_old"})

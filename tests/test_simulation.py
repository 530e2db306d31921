"""The apps on Flower's simulation engine (Ray), through the main job's launcher."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.real_model
@pytest.mark.parametrize("method", ["lordba", "lora-q2"])
def test_simulation_engine_runs_four_clients_two_rounds(tmp_path, method):
    overrides = (
        f"method='{method}' out-dir='{tmp_path}' data.shakespeare.max-clients=4 rank=4 alpha=8.0 train.local-steps=1 "
        "eval.examples=4 eval.generate=1" + (" flip.m0=0.001 flip.latent-lr=0.05 flip.budget=0.05" if method == "lordba" else "")
    )
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    proc = subprocess.run(
        [sys.executable, "-m", "simulations.run", "--quick", "--supernodes", "4", "--run-config", overrides],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = next(tmp_path.glob(f"{method}*"))
    rows = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert r["clients_sampled"] == r["clients_succeeded"] == 4
        # 4 uplink frames, each wrapped by Flower: wire > payload, and the per-client mean is the sum / 4
        assert r["up_wire_sum"] > r["up_payload_sum"] > 0 and r["up_payload_mean"] == r["up_payload_sum"] / 4
        assert r["down_payload_sum"] > 0 and r["fp16_lora_bytes"] > 0
    assert rows[2]["total_up_wire"] > rows[1]["total_up_wire"]
    # every Ray worker process loaded the frozen base exactly once and served several clients
    workers = rows[2]["workers"]
    assert workers and all(w["base_loads"] == 1 for w in workers.values())
    assert sum(w["clients_served"] for w in workers.values()) >= 8
    assert "--- sample ---" in proc.stdout and (run_dir / "rounds.csv").is_file()
    # a quiet run: no warning from a dependency, one line per round, a table that fits 100 columns
    out = (proc.stdout + proc.stderr).splitlines()
    assert not [line for line in out if re.search("warn", line, re.IGNORECASE)], "\n".join(out)
    assert [line.split()[1] for line in out if line.startswith("round ")] == ["0/2", "1/2", "2/2"]
    head = proc.stdout.split("--- sample ---")[0].splitlines()
    assert [line for line in head if len(line) > 100] == [] and sum(" per round" in line for line in head) == 1
    if method == "lordba":  # the in-process replay computes the same rounds as the simulation engine
        import torch
        from flwr.common.config import parse_config_args

        from simulations.replay import replay
        from simulations.run import QUICK, project_run_config

        threads = torch.get_num_threads()
        try:
            rec = replay({**project_run_config(), **QUICK, **parse_config_args([overrides])}, supernodes=4)
        finally:
            torch.set_num_threads(threads)
        got = [rec["eval_loss_by_round"][str(r["round"])] for r in rows[1:]]
        assert got == pytest.approx([r["eval_loss"] for r in rows[1:]], rel=1e-6)
        assert rec["up_payload_per_client_round"] == rows[2]["total_up_payload"] / 8

"""The frontier benchmark's arithmetic on hand-built round rows: bytes, ratios, the Pareto front and
the learning-rate file (no federation is run)."""

import json

import pytest

from simulations.frontier import (
    BASELINES,
    DEFAULT_VARIANTS,
    LORDBA_VARIANTS,
    add_ratios,
    bytes_per_client,
    load_records,
    map_lrs,
    pareto_front,
    pareto_record,
    plan_runs,
    read_chosen_lrs,
    run_config_for,
    summarize,
)


def row(rnd, up_sum=0, up_n=0, down_sum=0, down_n=0, loss=None, **extra):
    """A rounds.jsonl row as lordba_fl.federation.report.round_row writes it (only the fields the frontier reads)."""
    r = {"round": rnd, "up_wire_sum": up_sum, "up_wire_mean": up_sum / up_n if up_n else 0,
         "down_wire_sum": down_sum, "down_wire_mean": down_sum / down_n if down_n else 0,
         "up_payload_sum": up_sum - 100 * up_n, "down_payload_sum": down_sum - 100 * down_n,
         "clients_sampled": down_n, "clients_succeeded": up_n}
    if loss is not None:
        r["eval_loss"] = loss
    r.update(extra)
    return r


def spec(variant="lora-fedavg", rank=16, task="shakespeare", seed=0, family=None):
    return {"task": task, "variant": variant, "family": family or ("lordba" if variant in LORDBA_VARIANTS else variant),
            "rank": rank, "seed": seed, "overrides": {"method": "lordba" if variant in LORDBA_VARIANTS else variant}}


# 3 rounds; round 2 lost one uplink (2 sampled, 1 replied)
ROWS = [
    row(0, loss=4.7),
    row(1, up_sum=2000, up_n=2, down_sum=6000, down_n=2, loss=4.2),
    row(2, up_sum=1000, up_n=1, down_sum=6000, down_n=2, loss=4.0),
    row(3, up_sum=2000, up_n=2, down_sum=6000, down_n=2, loss=4.1),
]


def test_bytes_per_client_round_and_cumulative_per_client():
    b = bytes_per_client(ROWS)
    assert b["rounds_completed"] == 3
    assert b["up_client_rounds"] == 5 and b["down_client_rounds"] == 6
    assert b["up_bytes_per_client_round"] == 5000 / 5 == 1000
    assert b["down_bytes_per_client_round"] == 18000 / 6 == 3000
    assert b["up_payload_per_client_round"] == (5000 - 500) / 5
    # what one client taking part in all 3 rounds sends / receives
    assert b["up_bytes_per_client"] == 3000 and b["down_bytes_per_client"] == 9000
    assert b["total_bytes_per_client"] == 12000


def test_client_rounds_fall_back_to_counts_when_means_are_missing():
    rows = [{"round": 1, "up_wire_sum": 900, "down_wire_sum": 1200, "clients_succeeded": 3, "clients_sampled": 4}]
    b = bytes_per_client(rows)
    assert (b["up_bytes_per_client_round"], b["down_bytes_per_client_round"]) == (300, 300)


def test_summary_losses_flips_and_metric():
    rows = [dict(r, perplexity=2.0 ** r["round"], client_flip_rate=0.01 * r["round"], global_flip_rate=0.0) for r in ROWS]
    rec = summarize(spec("lordba-vote-flips"), rows, exit_code=0, wall_s=12.34,
                    run_config={"method": "lordba", "rank": 16, "alpha": 32.0, "lr": 1e-3, "seed": 0, "rounds": 3})
    assert rec["eval_losses"] == [4.7, 4.2, 4.0, 4.1]
    assert (rec["initial_eval_loss"], rec["final_eval_loss"], rec["best_eval_loss"], rec["best_round"]) == (4.7, 4.1, 4.0, 2)
    assert rec["metric_name"] == "perplexity" and rec["final_metric"] == 8.0
    assert rec["client_flip_rate"] == [0.01, 0.02, 0.03] and rec["global_flip_rate"] == [0.0] * 3
    assert rec["total_bytes_per_client"] == 12000 and rec["wall_s"] == 12.3 and rec["run"] == "lordba-vote-flips-r16-s0"
    base = summarize(spec(), ROWS)
    assert base["client_flip_rate"] is None  # not a LoRDBA run
    gsm = summarize(spec(task="gsm"), [dict(r, accuracy_unseen=0.25) for r in ROWS])
    assert gsm["metric_name"] == "accuracy_unseen" and gsm["final_metric"] == 0.25


def test_ratios_to_lora_fedavg_r16():
    ref = summarize(spec(), ROWS)  # 1000 up, 3000 down per client-round, 12000 per client, loss 4.1
    cheap = [row(0, loss=4.7)] + [row(t, up_sum=100, up_n=2, down_sum=300, down_n=2, loss=4.51) for t in (1, 2, 3)]
    rec = add_ratios(summarize(spec("lordba-vote-flips"), cheap), ref)
    assert rec["ref_run"] == "lora-fedavg-r16-s0"
    assert rec["up_bytes_per_client_round_ratio_to_ref"] == pytest.approx(50 / 1000)
    assert rec["down_bytes_per_client_round_ratio_to_ref"] == pytest.approx(150 / 3000)
    assert rec["total_bytes_per_client_ratio_to_ref"] == pytest.approx((3 * 200) / 12000)
    assert rec["final_eval_loss_ratio_to_ref"] == pytest.approx(4.51 / 4.1)
    assert add_ratios(dict(ref), ref)["final_eval_loss_ratio_to_ref"] == 1.0
    assert add_ratios(summarize(spec("lordba-vote-flips"), cheap), None)["total_bytes_per_client_ratio_to_ref"] is None


def test_pareto_front_with_ties_and_dominated_points():
    points = {  # name: (loss, bytes)
        "a": (4.0, 100.0),
        "b": (3.5, 1000.0),
        "c": (4.0, 100.0),   # identical to a: both stay
        "d": (4.0, 200.0),   # same loss as a, more bytes: dominated
        "e": (3.5, 5000.0),  # same loss as b, more bytes: dominated
        "f": (3.0, 10000.0),
        "g": (4.5, 50.0),
        "h": (4.6, 60.0),    # dominated by g
    }
    assert pareto_front(points) == ["g", "a", "c", "b", "f"]


def _rec(variant, rank, loss, total, seed=0, code=0):
    fam = "lordba" if variant in LORDBA_VARIANTS else variant
    return {"kind": "run", "task": "shakespeare", "variant": variant, "family": fam, "rank": rank, "seed": seed,
            "run": f"{variant}-r{rank}-s{seed}", "final_eval_loss": loss, "total_bytes_per_client": total,
            "exit_code": code}


def test_pareto_record_detects_a_dominated_lordba_run():
    recs = [
        _rec("lora-fedavg", 16, 3.90, 2e8), _rec("lora-fedavg", 1, 4.10, 1.2e7),
        _rec("lordba-vote-flips", 16, 4.20, 2e7),   # lora r1 has fewer bytes and a lower loss
        _rec("lordba-refit", 16, 4.15, 2.5e7), _rec("lordba-refit", 32, 4.12, 4e7),  # best lordba: beaten by lora r1
        _rec("lora-q2", 16, 3.95, 3e8, code=1),  # failed: left out
    ]
    p = pareto_record("shakespeare", recs)
    assert p["kind"] == "pareto" and p["front"] == ["lora-fedavg-r1", "lora-fedavg-r16"]
    assert p["best_lordba"] == "lordba-refit-r32" and p["best_lordba_on_front"] is False
    assert p["best_lordba_beaten_by"] == ["lora-fedavg-r1"] and p["lordba_on_front"] == []
    assert p["excluded"] == ["lora-q2-r16-s0"] and not p["points"]["lordba-vote-flips-r16"]["on_front"]


def test_pareto_record_lordba_on_the_front_and_seed_means():
    recs = [
        _rec("lora-fedavg", 16, 3.90, 2e8), _rec("lora-fedavg", 1, 4.10, 1.2e7),
        _rec("lordba-vote-flips", 16, 4.00, 2e7, seed=0), _rec("lordba-vote-flips", 16, 4.10, 2e7, seed=1),  # mean 4.05
        _rec("lora-q2", 4, 4.05, 3e7),  # equal loss, more bytes: does not beat it
    ]
    p = pareto_record("shakespeare", recs)
    assert p["points"]["lordba-vote-flips-r16"]["final_eval_loss"] == pytest.approx(4.05)
    assert p["points"]["lordba-vote-flips-r16"]["seeds"] == [0, 1] and p["seeds"] == [0, 1]
    assert p["front"] == ["lora-fedavg-r1", "lordba-vote-flips-r16", "lora-fedavg-r16"]
    assert p["best_lordba_on_front"] is True and p["lordba_on_front"] == ["lordba-vote-flips-r16"]


def test_pareto_record_compares_runs_on_the_seeds_they_share_with_the_reference():
    """A run measured on a hard seed only is not dominated by one measured on an easy seed: losses
    are compared as ratios to the reference's loss on the same seed."""
    recs = [
        _rec("lora-fedavg", 16, 3.90, 2e8, seed=0), _rec("lora-fedavg", 16, 4.30, 2e8, seed=1),
        _rec("lordba-vote-flips", 16, 4.00, 2e7, seed=0), _rec("lordba-vote-flips", 16, 4.40, 2e7, seed=1),
        _rec("lora-q2", 4, 4.20, 1e7, seed=0),  # seed 0 only: 7.7% behind, lordba 2.4% (mean loss 4.20 vs 4.20)
    ]
    p = pareto_record("shakespeare", recs)
    assert p["compared_on"] == "loss_vs_ref"
    pt = p["points"]["lordba-vote-flips-r16"]
    assert pt["paired_seeds"] == [0, 1] and pt["loss_vs_ref"] == pytest.approx((4.0 / 3.9 + 4.4 / 4.3) / 2 - 1)
    assert p["points"]["lora-q2-r4"]["loss_vs_ref"] == pytest.approx(4.2 / 3.9 - 1)
    assert p["front"] == ["lora-q2-r4", "lordba-vote-flips-r16", "lora-fedavg-r16"]
    assert p["best_lordba_on_front"] is True
    # a run with no seed in common with the reference: mean losses instead
    p = pareto_record("shakespeare", recs + [_rec("lora-fedavg", 1, 4.5, 1e7, seed=7)])
    assert p["compared_on"] == "final_eval_loss" and p["points"]["lora-fedavg-r1"]["loss_vs_ref"] is None


def test_a_lower_or_equal_bytes_baseline_with_equal_loss_does_not_beat_lordba():
    recs = [_rec("lordba-vote-flips", 16, 4.0, 2e7), _rec("lora-fedavg", 1, 4.0, 2e7)]
    p = pareto_record("shakespeare", recs)
    assert p["best_lordba_on_front"] is True and p["front"] == ["lora-fedavg-r1", "lordba-vote-flips-r16"]


def test_lr_file_takes_the_last_chosen_lr_line_of_the_task_and_maps_names(tmp_path):
    f = tmp_path / "centralized.jsonl"
    lines = [
        {"kind": "chosen_lr", "task": "shakespeare", "lrs": {"lora": 1e-2, "lordba-scratch": 1e-2}},
        {"kind": "step", "task": "shakespeare", "lr": 5.0},
        {"kind": "chosen_lr", "task": "shakespeare", "lrs": {"lora": 3e-4, "lordba-scratch": 1e-4, "lora-q2": 2e-4}},
        {"kind": "chosen_lr", "task": "gsm", "lrs": {"lora": 7e-4, "lordba-scratch": 6e-4}},
        {"kind": "result", "task": "shakespeare"},
        {"kind": "chosen_lr", "task": "shakespeare", "model": "tiny-llama", "lrs": {"lora": 9.0}},  # another model
    ]
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    chosen = read_chosen_lrs(f, "shakespeare", model="smollm2-135m")
    assert chosen == {"lora": 3e-4, "lordba-scratch": 1e-4, "lora-q2": 2e-4}
    lrs = map_lrs(chosen)
    # a method's own name wins over its group's
    assert lrs == {"lordba": 1e-4, "lora-fedavg": 3e-4, "ffa-lora": 3e-4, "lora-q2": 2e-4, "lora-hetlora": 3e-4,
                   "lora-flexlora": 3e-4, "lora-flora": 3e-4, "fed-sb": 1e-3, "fedkseed": 1e-4,
                   "lora-q2-both": 3e-4}
    assert map_lrs(read_chosen_lrs(f, "gsm"))["lordba"] == 6e-4
    assert read_chosen_lrs(tmp_path / "missing.jsonl", "gsm") is None
    assert map_lrs(None) == {**{m: 1e-3 for m in ("lordba", "lora-fedavg", "lora-q2", "ffa-lora", "lora-hetlora",
                                                  "lora-flexlora", "lora-flora", "fed-sb", "lora-q2-both")},
                             "fedkseed": 1e-4}
    assert read_chosen_lrs(f, "shakespeare", model="tiny-llama") == {"lora": 9.0}
    # a sweep where every lr diverged (None) keeps the default; methods the frontier does not run are ignored
    assert map_lrs({"lora": None, "lordba-scratch": 2e-4, "frozen-signs": 1e-2}) == {
        "lordba": 2e-4, "lora-fedavg": 1e-3, "lora-q2": 1e-3, "ffa-lora": 1e-3, "lora-hetlora": 1e-3,
        "lora-flexlora": 1e-3, "lora-flora": 1e-3, "fed-sb": 1e-3, "fedkseed": 1e-4, "lora-q2-both": 1e-3}


def test_plan_and_run_config():
    runs = plan_runs("gsm")
    assert len(runs) == 2 * len(DEFAULT_VARIANTS) + sum(len(r) for _, r in BASELINES.values())  # ablations: --only
    assert (runs[0]["variant"], runs[0]["rank"]) == ("lora-fedavg", 16)  # the reference first
    assert [r["rank"] for r in plan_runs("gsm", only=["lora-fedavg"])] == [16, 1, 2, 4]
    assert [(r["variant"], r["rank"]) for r in plan_runs("gsm", only=["lordba-vote-flips-r32"])] == [("lordba-vote-flips", 32)]
    assert len(plan_runs("gsm", quick=True, seeds=(0, 1))) == 6
    with pytest.raises(ValueError, match="known"):
        plan_runs("gsm", only=["lora-fedavg-r3"])
    lrs = map_lrs({"lora": 2e-3, "lordba-scratch": 5e-4})
    cfg = run_config_for(plan_runs("gsm", lordba_ranks=(32,), only=["lordba-refit"])[0], lrs, user={"rounds": 12},
                         out_dir="/tmp/f")
    assert (cfg["rank"], cfg["alpha"], cfg["lr"], cfg["rounds"]) == (32, 64.0, 5e-4, 12)
    assert cfg["server.aggregator"] == "refit" and cfg["train.seq-len"] == 192
    assert (cfg["out-dir"], cfg["name"]) == ("/tmp/f/gsm", "lordba-refit-r32-s0")
    tuned = plan_runs("skills", only=["fed-sb-lr10x"])
    assert [(r["family"], r["rank"]) for r in tuned] == [("fed-sb", 16)]  # plotted as Fed-SB
    tuned_cfg = run_config_for(tuned[0], {**lrs, "fed-sb": 1e-3})
    assert (tuned_cfg["lr"], tuned_cfg["fed-sb.init-step"]) == (1e-2, 1e-3)  # its own lr, whatever the file says
    quick = run_config_for(plan_runs("gsm", quick=True)[0], lrs, quick=True)
    assert quick["model"] == "tiny-llama" and quick["train.seq-len"] == 192  # gsm keeps what a problem needs


def test_load_records_keeps_the_last_record_of_each_run(tmp_path):
    f = tmp_path / "frontier.jsonl"
    lines = [_rec("lora-fedavg", 16, 4.0, 1.0), {"kind": "pareto", "task": "shakespeare"}, _rec("lora-fedavg", 16, 3.0, 1.0)]
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert [r["final_eval_loss"] for r in load_records(f)] == [3.0]


def test_every_variant_on_a_chart_gets_its_own_colour():
    from simulations.frontier import BASELINES, LORDBA_VARIANTS, variant_colors

    names = [*list(LORDBA_VARIANTS)[-8:], *BASELINES, "user-variant"]  # 15: beyond tab10's 10
    colors = variant_colors([{"variant": v} for v in names])
    assert set(colors) == set(names) and len(set(colors.values())) == len(names)
    few = variant_colors([{"variant": "lordba-step-decay"}, {"variant": "lordba-lean-ef-hot"}])
    assert len(set(few.values())) == 2  # were the same green when colours cycled over every declared variant


def test_the_default_variant_is_the_librarys_defaults():
    """The frontier's default LoRDBA variant is what a run with no overrides does (the README's claims
    rest on it); every other variant states its flip settings, so it keeps its meaning when they change."""
    from lordba_fl.methods import make_method
    from lordba_fl.runconfig import parse_run_config
    from simulations.frontier import DEFAULT_VARIANTS, LORDBA_VARIANTS

    default = make_method(parse_run_config({})).cfg  # the LoRDBA settings, every option resolved
    for name in DEFAULT_VARIANTS:
        assert make_method(parse_run_config(dict(LORDBA_VARIANTS[name]))).cfg == default
    assert make_method(parse_run_config(dict(LORDBA_VARIANTS["lordba-step"]))).cfg != default
    assert all("flip.every-step" in over for over in LORDBA_VARIANTS.values())


def test_a_failed_launch_does_not_report_an_earlier_runs_rows(tmp_path):
    # a run refused before it starts leaves the folder's rounds.jsonl from an earlier run untouched:
    # those rows are not this run's
    from simulations.common import launch

    stale = tmp_path / "r" / "rounds.jsonl"
    stale.parent.mkdir()
    stale.write_text('{"round": 0, "eval_loss": 15.7}\n')
    rows, code, _ = launch({"out-dir": str(tmp_path), "name": "r", "no.such-key": 1}, 2)
    assert code != 0 and rows == []
    assert stale.read_text() == '{"round": 0, "eval_loss": 15.7}\n'

"""A quiet run: known third-party noise silenced at the app boundary only, one line a round, a
table that fits 100 columns."""

import json
import subprocess
import sys
import warnings
from pathlib import Path


from lordba_fl.federation.quiet import KNOWN_WARNINGS, is_noise, quiet_dependencies
from lordba_fl.federation.report import RunRecorder, progress_line

ROOT = Path(__file__).resolve().parents[1]

# lines of a real `flwr run --stream` of the main job (Flower 1.42, Ray, bitsandbytes, torch)
NOISE_LINES = [
    "Using SuperLink: local (127.0.0.1:48673)",
    "Successfully started run 15040367972343326268",
    "\x1b[92mINFO \x1b[0m:      Starting logstream for run_id `15040367972343326268`",
    "\x1b[93mWARNING \x1b[0m:   Since flwr 1.32, default simulated SuperNodes changed from 10 to 2.",
    "\x1b[92mINFO \x1b[0m:      Federation `@none/default` (4 simulated SuperNodes)",
    "Successfully installed lordba-fl to /tmp/lordba-flwr-home-k67gqkd5/apps/lordba-fl.lordba-fl.0.1.0.b816009a.",
    "/x/ray/_private/worker.py:2051: FutureWarning: Tip: In future versions of Ray, Ray will no longer override",
    "  warnings.warn(",
    "\x1b[36m(ClientAppActor pid=31450)\x1b[0m Failed to load CPU gemm_4bit_forward from kernels-community: No module",
    "\x1b[36m(ClientAppActor pid=31450)\x1b[0m \x1b[93mWARNING \x1b[0m:   Manually terminating ClientAppActor",
    "\x1b[92mINFO \x1b[0m:      ",
]
KEPT_LINES = [
    "round 2/3  eval loss 4.3360  up 325.1 KB  down 301.2 KB  clients 4/4  61.0 s",
    "\x1b[91mERROR \x1b[0m:     ServerApp thread raised an exception: out of memory",
    "Traceback (most recent call last):",
    "\x1b[36m(ClientAppActor pid=31450)\x1b[0m RuntimeError: partition 7 does not exist",
    "\x1b[93mWARNING \x1b[0m:   Node 3 did not reply in time",
]


def test_known_lines_are_dropped_and_everything_else_is_kept():
    assert [line for line in NOISE_LINES if not is_noise(line)] == []
    assert [line for line in KEPT_LINES if is_noise(line)] == []


def test_only_the_known_warnings_are_silenced_and_verbose_keeps_them(monkeypatch):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_dependencies()
        warnings.warn("`torch.jit.script_method` is deprecated. Please switch", DeprecationWarning)
        warnings.warn("Unsupported layer type '<class 'lordba_fl.base.quant.Q41Linear'>' encountered", UserWarning)
        warnings.warn("`torch.jit.script_method` is deprecated", UserWarning)  # another category: kept
        warnings.warn("Unsupported layer type '<class 'mypkg.Layer'>' encountered", UserWarning)  # not ours: kept
    assert [str(w.message)[:30] for w in caught] == ["`torch.jit.script_method` is d", "Unsupported layer type '<class"]
    monkeypatch.setenv("LORDBA_FL_VERBOSE", "1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_dependencies()
        for category, _, _ in KNOWN_WARNINGS:
            warnings.warn("`is_gradient_checkpointing` is deprecated", category)
    assert len(caught) == len(KNOWN_WARNINGS)


def test_importing_the_library_changes_no_warning_filter_or_logger():
    code = ("import logging, warnings, torch, numpy, transformers, flwr.serverapp, flwr.clientapp; "  # their own filters
            "before = list(warnings.filters); "
            "import lordba_fl, lordba_fl.federation.apps, lordba_fl.federation.strategy; "
            "assert warnings.filters == before, 'filters changed'; "
            "assert logging.getLogger('flwr').level == logging.NOTSET or logging.getLogger('flwr').level < 30; "
            "assert not logging.getLogger('bitsandbytes.backends.cpu.ops').filters; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


def _row(rnd: int, **extra) -> dict:
    row = {"round": rnd, "method": "lordba-refit", "clients_sampled": 4, "clients_succeeded": 3, "up_wire_mean": 325_100.0,
           "down_wire_mean": 301_249.0, "total_up_wire": 3_900_000, "total_down_wire": 3_600_000, "train_loss": 4.25,
           "eval_loss": 4.33604, "global_flip_rate": 0.005, "wall_s": 61.04, "client_flip_rate": 0.02,
           "fit_error_median": 0.5, "flip_agreement": 0.1, "fp16_lora_bytes": 9_770_000}
    row.update(extra)
    return row


def test_the_progress_line_and_the_table(tmp_path):
    assert progress_line(_row(2), 10) == \
        "round  2/10  eval loss 4.3360  up 325.1 KB  down 301.2 KB  clients 3/4  61.0 s"
    assert progress_line(_row(0, accuracy_heldout=0.125), 3) == "round 0/3  eval loss 4.3360  accuracy 0.125  61.0 s"
    # every message of the round when the row has it (client-side evaluation broadcasts the new adapter)
    assert progress_line(_row(1, up_wire_per_client=330_000.0, down_wire_per_client=356_000.0), 3) == \
        "round 1/3  eval loss 4.3360  up 330.0 KB  down 356.0 KB  clients 3/4  61.0 s"
    rows = [_row(r, accuracy_heldout=0.5) for r in range(16)]
    table = RunRecorder(tmp_path, rows).table()
    lines = table.splitlines()
    assert max(len(line) for line in lines) <= 100
    head = lines[1].split()
    assert head == ["round", "clients", "up", "KB", "down", "KB", "total", "MB", "train", "loss", "eval", "loss",
                    "accuracy", "flips", "s"]
    assert lines[2].split() == ["0", "3/4", "325.1", "301.2", "7.5", "4.2500", "4.3360", "0.5", "0.005", "61"]
    # the full record stays in the JSON lines
    assert json.loads((tmp_path / "rounds.jsonl").read_text().splitlines()[3]) == rows[3]


def test_a_narrow_table_still_fits(tmp_path):
    table = RunRecorder(tmp_path, [_row(1)]).table(width=60)
    assert max(len(line) for line in table.splitlines()) <= 60

"""The ``lordba-fl`` command.

::

    lordba-fl run [--quick] [--run-config "..."]    # a federated run (Flower's simulation engine)
    lordba-fl frontier [--task skills] [--only ...]  # quality against bytes, every method
    lordba-fl bench NAME [...]                       # codec | scale_codes | edge | chaos | faults | privacy | adapter | scale | batched
    lordba-fl replay [--run-config "..."]           # the same run replayed in one process, no Flower: fast sweeps
    lordba-fl centralized | hetero | compare | tables [...]
    lordba-fl export ADAPTER --peft DIR | --merged DIR   # a packed LoRDBA adapter for PEFT / plain transformers

``run``, ``frontier``, ``bench`` and the other experiment commands drive the Flower app of a
lordba-fl project (the folder with ``pyproject.toml``'s ``[tool.flwr.app]``, ``clients/``,
``server/`` and ``simulations/``: a clone of the repository): the current folder or one above it,
or ``--project DIR``. Each passes its arguments on unchanged (``lordba-fl run --help``).
``export`` needs only the installed library.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

BENCHES = ("adapter", "batched", "chaos", "codec", "edge", "faults", "privacy", "scale", "scale_codes")
EXPERIMENTS = {"run": "run", "frontier": "frontier", "replay": "replay", "centralized": "centralized", "hetero": "hetero",
               "compare": "compare", "tables": "tables", "docs": "docs"}


def find_project(start: Path | None = None) -> Path:
    """The lordba-fl project at or above ``start`` (default: the current folder)."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "simulations" / "run.py").is_file() and (folder / "pyproject.toml").is_file() \
                and "[tool.flwr.app]" in (folder / "pyproject.toml").read_text():
            return folder
    raise SystemExit(f"no lordba-fl project at or above {here}: run this inside a clone of the lordba-fl "
                     "repository (it holds the Flower app and the experiments), or pass --project DIR")


def _experiment(module: str, args: list[str], project: Path | None) -> int:
    root = find_project(project)
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED=os.environ.get("FLWR_TELEMETRY_ENABLED", "0"),
               PYTHONPATH=os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p))
    return subprocess.call([sys.executable, "-m", f"simulations.{module}", *args], cwd=root, env=env)


def export(adapter: str, peft: str | None, merged: str | None, model: str = "smollm2-135m") -> Path:
    """Load the packed LoRDBA ``adapter`` onto ``model``'s base and write it as a PEFT LoRA folder
    (``peft``: exact; on the quantized base it loads with ``PeftModel.from_pretrained(base, DIR,
    config=lordba_fl.peft_lora_config(DIR))``) or as a plain transformers model with
    the adapter merged into the dequantized base (``merged``: ``AutoModelForCausalLM.from_pretrained``)."""
    from lordba_fl.adapter import export_peft_lora, load_lordba_
    from lordba_fl.base.models import load_model

    if bool(peft) == bool(merged):
        raise SystemExit("export writes one thing: give --peft DIR or --merged DIR")
    path = Path(adapter).expanduser()
    if path.is_dir():  # a run folder
        path = path / "adapter.lordba.safetensors"
    if not path.is_file():
        raise SystemExit(f"{path} does not exist: give a packed LoRDBA adapter (adapter.lordba.safetensors) or the "
                         "run folder that holds one")
    from lordba_fl.adapter import LoRDBAFileError
    from lordba_fl.base.models import MODELS

    base, tok = load_model(model)
    try:
        load_lordba_(base, path)
    except LoRDBAFileError as e:
        raise SystemExit(f"{e}\n(--model picks the base the adapter was trained on: one of {sorted(MODELS)})") from None
    if peft:
        return export_peft_lora(base, peft)
    from lordba_fl.adapter import merge_dense_

    merge_dense_(base)
    out = Path(merged)
    base.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="lordba-fl", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="commands: " + ", ".join([*EXPERIMENTS, "bench", "export"]))
    p.add_argument("--project", type=Path, help="the lordba-fl project folder (default: found from here)")
    p.add_argument("command", choices=[*EXPERIMENTS, "bench", "export"])
    p.add_argument("args", nargs=argparse.REMAINDER)
    ns = p.parse_args(argv)
    if ns.command in EXPERIMENTS:
        return _experiment(EXPERIMENTS[ns.command], ns.args, ns.project)
    if ns.command == "bench":
        if not ns.args or ns.args[0] not in BENCHES:
            p.error(f"bench takes a benchmark name: one of {', '.join(BENCHES)}")
        return _experiment(f"bench_{ns.args[0]}", ns.args[1:], ns.project)
    e = argparse.ArgumentParser(prog="lordba-fl export")
    e.add_argument("adapter", help="adapter.lordba.safetensors, or a run folder holding one")
    e.add_argument("--peft", help="write a PEFT LoRA folder here")
    e.add_argument("--merged", help="write a transformers model with the adapter merged into the dequantized base here")
    e.add_argument("--model", default="smollm2-135m", help="the base the adapter was trained on")
    a = e.parse_args(ns.args)
    print(export(a.adapter, a.peft, a.merged, a.model))
    return 0


if __name__ == "__main__":
    sys.exit(main())

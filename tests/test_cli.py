"""The `lordba-fl` command and the package: one installed package, experiments found in the project,
exports that load in PEFT and plain transformers and compute what the adapted model computes."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from lordba_fl.cli import BENCHES, find_project, main

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_installs_only_the_library(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
                    str(ROOT)], check=True, capture_output=True, timeout=600)
    wheel = next(tmp_path.glob("lordba_fl-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"lordba_fl"}
    assert "lordba_fl/edge_memory.jsonl" in names  # its data file travels with it
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "lordba-fl = lordba_fl.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_the_project_is_found_from_inside_it_and_refused_outside(tmp_path):
    assert find_project(ROOT / "lordba_fl" / "methods") == ROOT
    with pytest.raises(SystemExit, match="no lordba-fl project at or above .* pass --project DIR"):
        find_project(tmp_path)


def test_commands_pass_their_arguments_to_the_experiment(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "nope"])
    assert f"one of {', '.join(BENCHES)}" in capsys.readouterr().err
    out = subprocess.run([sys.executable, "-m", "lordba_fl.cli", "--project", str(ROOT), "run", "--help"],
                         capture_output=True, text=True, timeout=300, cwd="/")
    assert out.returncode == 0 and "--run-config" in out.stdout and "--supernodes" in out.stdout


@pytest.mark.real_model
def test_export_writes_peft_and_a_merged_model_that_compute_the_same(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lordba_fl import LoRDBAConfig, attach_lordba_, peft_lora_config, save_lordba
    from lordba_fl.base.models import load_model
    from lordba_fl.cli import export
    from conftest import randomize_adapter_

    model, tok = load_model("tiny-llama")
    attach_lordba_(model, LoRDBAConfig(rank=4, alpha=8.0, seed=0))
    randomize_adapter_(model, seed=1)
    save_lordba(model, tmp_path / "adapter.lordba.safetensors", scale_dtype="float32")
    ids = torch.tensor([[1, 50, 300, 7000, 12]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
    export(str(tmp_path), None, str(tmp_path / "merged"), model="tiny-llama")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not [m for m in merged.modules() if type(m).__name__ in ("Q41Linear", "LoRDBALinear")]
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
    export(str(tmp_path / "adapter.lordba.safetensors"), str(tmp_path / "peft"), None, model="tiny-llama")
    base, _ = load_model("tiny-llama")
    with torch.no_grad():
        peft = PeftModel.from_pretrained(base, str(tmp_path / "peft"), config=peft_lora_config(tmp_path / "peft"))
        got = peft.eval()(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(SystemExit, match="give --peft DIR or --merged DIR"):
        export(str(tmp_path), None, None)
    with pytest.raises(SystemExit, match="does not exist"):
        export(str(tmp_path / "nothing"), str(tmp_path / "p"), None)

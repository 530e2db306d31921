"""What a fresh client process on a small device relies on: the memory-mapped quantized base, the
per-partition data cache, gradient checkpointing and the edge profile."""

import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lordba_fl.data import load_client_data, load_task
from lordba_fl.runconfig import PROFILES, parse_run_config
from lordba_fl.train import TrainConfig, train_local

pytestmark = pytest.mark.real_model


def test_cached_quantized_base_is_the_same_model(tmp_path, monkeypatch):
    from lordba_fl.base import models

    monkeypatch.setenv("LORDBA_FL_CACHE", str(tmp_path))  # a fresh cache: fp32 copy, then the q4_1 base
    monkeypatch.setattr(models, "_build_cache", _copy_fp32_cache(models))
    slow, tok = models.load_default_model("q4_1")
    cached = models.default_model_dir() / "base-q4_1.safetensors"
    assert cached.is_file()
    fast, _ = models.load_default_model("q4_1")  # memory-maps the file written above
    assert type(fast.model.layers[0].self_attn.q_proj).__name__ == "Q41Linear"
    assert fast.lm_head.weight.data_ptr() == fast.model.embed_tokens.weight.data_ptr()  # tied again
    ids = tok("Shall I compare thee to a summer's day?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(slow(ids).logits, fast(ids).logits)
    assert not any(t.is_meta for t in list(fast.parameters()) + list(fast.buffers()))


def _copy_fp32_cache(models):
    """Reuse the machine's fp32 cache instead of re-reading the GGUF (tens of seconds)."""
    import os
    import shutil

    src = models._cache_dir(models.default_gguf_path()).name
    home = os.path.join(os.path.expanduser("~"), ".cache", "lordba_fl", src)
    original = models._build_cache

    def build(gguf, target):
        if not os.path.isfile(os.path.join(home, "lordba_cache.json")):
            return original(gguf, target)
        shutil.copytree(home, target, ignore=shutil.ignore_patterns("base-*.safetensors"))

    return build


def test_client_data_cache_holds_exactly_the_partition(tmp_path, monkeypatch):
    monkeypatch.setenv("LORDBA_FL_CACHE", str(tmp_path))
    opts = {"num_clients": 4, "per_template": 2, "dirichlet_alpha": None}
    task = load_task("gsm", **opts)
    for pid in (0, 3):
        data = load_client_data("gsm", pid, **opts)
        assert data.num_partitions == task.num_partitions == 4
        assert data.train == task.train[pid] and data.test == task.test[pid]
    assert len(list((tmp_path / "data" / "clients").iterdir())) == 1  # one folder per (task, options)
    with pytest.raises(ValueError, match="partition 4 does not exist: task 'gsm' has 4 clients"):
        load_client_data("gsm", 4, **opts)


def test_gradient_checkpointing_gives_the_same_training():
    from lordba_fl.base.models import load_model
    from lordba_fl.methods import make_method

    model, tok = load_model("tiny-llama")
    method = make_method(parse_run_config({"model": "tiny-llama", "rank": 4}))
    model = method.adapt(model)
    from lordba_fl.data import Example
    from lordba_fl.methods.lordba import train_groups
    from lordba_fl.methods.lordba.layout import read_scales, read_state, write_state_

    start = read_state(model, method.spec)
    examples = [Example("Q: one two", " three four five"), Example("Q: six", " seven eight")]
    out = []
    for gc in (False, True):
        write_state_(model, method.spec, start, latent_magnitude=0.01)
        groups = train_groups(model, method.spec, 1e-3, 1e-3)
        cfg = TrainConfig(steps=2, batch_size=1, seq_len=32, gradient_checkpointing=gc)
        m = train_local(model, groups, tok, examples, cfg, seed=3)
        out.append((m["train_loss"], read_scales(model, method.spec)))
        assert model.is_activation_checkpointing == gc
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-6)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("gc", [False, True])
def test_stepping_inside_backward_trains_exactly_like_stepping_after_it(gc):
    """One backward a step on CPU: train_local steps each parameter from its gradient hook and drops the
    gradient (no step holds every gradient at once). Against torch's AdamW stepped after backward (the
    plain path), every parameter and moment after 3 steps is bit-identical, with and without checkpointing."""
    from lordba_fl.base.models import load_model
    from lordba_fl.data import Example
    from lordba_fl.methods import make_method
    from lordba_fl.methods.lordba import train_groups
    from lordba_fl.methods.lordba.layout import read_latents, read_scales, read_state, write_state_
    from lordba_fl.train import PlainAdamW, make_optimizer

    model, tok = load_model("tiny-llama")
    method = make_method(parse_run_config({"model": "tiny-llama", "rank": 4}))
    model = method.adapt(model)
    start = read_state(model, method.spec)
    examples = [Example("Q: one two", " three four five"), Example("Q: six", " seven eight nine ten")]
    cfg = TrainConfig(steps=3, batch_size=1, seq_len=32, gradient_checkpointing=gc)
    out = []
    for plain in (False, True):
        write_state_(model, method.spec, start, latent_magnitude=0.002)
        groups = train_groups(model, method.spec, 1e-3, 1e-3)
        opt = torch.optim.AdamW(groups, weight_decay=0.0) if plain else make_optimizer(groups, cfg)
        assert isinstance(opt, PlainAdamW) != plain
        m = train_local(model, groups, tok, examples, cfg, seed=3, optimizer=opt)
        params = [p for g in groups for p in g["params"]]
        assert all(p.grad is None for p in params) != plain  # the hooks dropped every gradient
        out.append((m["train_loss"], read_latents(model, method.spec), read_scales(model, method.spec),
                    [opt.state[p]["exp_avg_sq"].clone() for p in params]))
        assert not any(p._post_accumulate_grad_hooks for p in params)  # removed when training returns
    assert out[0][0] == out[1][0]
    assert torch.equal(out[0][1], out[1][1]) and torch.equal(out[0][2], out[1][2])
    assert all(torch.equal(a, b) for a, b in zip(out[0][3], out[1][3]))
    assert not torch.equal(out[0][2], start.scales)  # it trained


def test_edge_profile_is_a_valid_low_memory_config():
    cfg = parse_run_config(PROFILES["edge"])
    assert cfg.train.batch_size == 1 and cfg.train.gradient_checkpointing and cfg.train.return_memory
    assert cfg.torch_compute_dtype() == torch.float32  # bf16 only where a CUDA device has it
    with pytest.raises(ValueError, match="compute-dtype must be one of"):
        parse_run_config({"compute-dtype": "fp8"})
    with pytest.raises(ValueError, match="server.round-timeout must be > 0"):
        parse_run_config({"server.round-timeout": 0})


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_return_memory_hands_freed_tensors_back_to_the_os():
    """``train.return-memory``: after a large block is freed glibc serves blocks of that size from its
    heap and keeps them resident once freed (RSS climbs step after step); with the fixed mmap threshold
    freed tensors leave RSS at once, even with small live tensors between them."""
    code = """
import os, sys, torch
from lordba_fl.train import return_freed_memory
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
fixed = sys.argv[1] == "1" and return_freed_memory()
x = torch.ones(4 << 20); del x  # a freed 16 MB block: glibc's threshold rises to 16 MB
base = rss()
xs = [t for _ in range(16) for t in (torch.ones(2 << 20), torch.ones(64 << 10))]  # 8 MB blocks, 256 KB between
keep = xs[1::2]
grown = rss()
del xs
print(fixed, base, grown, rss())
"""
    for flag in ("0", "1"):
        out = subprocess.run([sys.executable, "-c", code, flag], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parents[1]).stdout.split()
        fixed, base, grown, after = out[0] == "True", *map(float, out[1:])
        assert fixed == (flag == "1") and grown - base > 120  # 16 x 8 MB live
        if fixed:
            assert after - base < 16  # the 8 MB blocks are unmapped when freed


_CLIENT_PROCESS = """
import json, sys
from flwr.app import Context, RecordDict
from flwr.common.serde import message_from_proto
from flwr.proto.message_pb2 import Message as ProtoMessage

proto = ProtoMessage()
proto.ParseFromString(open(sys.argv[1], "rb").read())
request = message_from_proto(proto)
run_config = json.loads(open(sys.argv[2]).read())
from clients.app import app

node = request.metadata.dst_node_id
context = Context(run_id=1, node_id=node, node_config={"partition-id": node - 100, "num-partitions": 4},
                  state=RecordDict(), run_config=run_config)
reply = app(request, context)
heavy = sorted(m for m in ("peft", "bitsandbytes", "datasets", "pandas", "matplotlib", "transformers.modeling_utils",
                           "torch._dynamo") if m in sys.modules)
print(json.dumps({"error": reply.error.reason if reply.has_error() else None,
                  "train_loss": reply.content["metrics"]["train_loss"] if not reply.has_error() else None,
                  "heavy": heavy}))
"""


@pytest.mark.parametrize("method, model, runtime", [("lordba", "smollm2-135m", "lean"), ("lordba", "tiny-llama", "transformers"),
                                                   ("lora-fedavg", "tiny-llama", "transformers")])
def test_a_client_process_imports_only_what_its_method_uses(tmp_path, method, model, runtime):
    """A fresh ClientApp process answering a real train message of a q4_1 federation: a LoRDBA client
    never imports PEFT, bitsandbytes or the data-set stack (its partition comes from the client cache),
    and on the lean runtime (the edge profile's) not transformers' modelling stack or torch's compiler
    either; a LoRA client needs PEFT (which shows the check sees an import when there is one)."""
    import json

    from flwr.common.serde import message_to_proto
    from localgrid import LocalGrid

    from clients.app import make_client_app
    from lordba_fl.federation.apps import run_server
    from lordba_fl.runconfig import DEFAULTS, builtin_method_keys, method_keys

    cfg = {**DEFAULTS, "model": model, "quant": "q4_1", "model-runtime": runtime, "task": "shakespeare",
           "data.shakespeare.max-clients": 4, "rounds": 1, "clients-per-round": 1, "rank": 4, "alpha": 8.0,
           "train.local-steps": 1, "train.batch-size": 1, "train.seq-len": 32, "eval.examples": 2, "eval.generate": 0,
           "eval.client-side": False, "method": method, "out-dir": str(tmp_path)}
    cfg.update({k: d for k, (_, d, _) in builtin_method_keys().items() if k not in method_keys(method)})
    grid = LocalGrid(make_client_app(), 4, cfg)
    run_server(grid, cfg)  # fills the client data cache, as a deployed node keeps it
    request = next(m for m in grid.sent if m.metadata.message_type == "train")
    (tmp_path / "request.bin").write_bytes(message_to_proto(request).SerializeToString())
    (tmp_path / "run_config.json").write_text(json.dumps(cfg))
    proc = subprocess.run([sys.executable, "-c", _CLIENT_PROCESS, str(tmp_path / "request.bin"),
                           str(tmp_path / "run_config.json")], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["error"] is None and out["train_loss"] > 0
    if method == "lordba":
        assert out["heavy"] == ([] if runtime == "lean" else ["torch._dynamo", "transformers.modeling_utils"])
    else:
        assert "peft" in out["heavy"]  # (PEFT itself imports bitsandbytes where it is installed)

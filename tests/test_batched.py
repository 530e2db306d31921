"""Batched multi-client training: K adapters over one shared base match K sequential clients."""

import pytest
import torch

from lordba_fl.base.models import load_model
from lordba_fl.data import Example
from lordba_fl.methods import make_method
from lordba_fl.methods.lordba import budget_flips
from lordba_fl.runconfig import parse_run_config
from lordba_fl.train import TrainConfig
from lordba_fl.methods.lordba.layout import AdapterState, write_latents_, write_state_
from simulations.batched import ClientJob, StackedAdapters, train_batched, train_sequential

pytestmark = pytest.mark.real_model  # the tiny model uses the embedded tokenizer

LR = LATENT_LR = 1e-3


@pytest.fixture(scope="module")
def adapted():
    model, tok = load_model("tiny-llama", "q4_1")
    method = make_method(parse_run_config({"model": "tiny-llama", "rank": 4}))
    return method.adapt(model), tok, method.spec


def _jobs(spec, k: int) -> list[ClientJob]:
    g = torch.Generator().manual_seed(7)
    jobs = []
    for i in range(k):
        latent = torch.randn(spec.n_bits, generator=g) * 0.01  # (n_bits,)
        scales = 1.0 + 0.1 * torch.randn(spec.n_scales, generator=g)  # (n_scales,)
        # clients of different sizes and lengths: the batch pads to the longest of all of them
        examples = [Example(f"Speaker {i}, line {j}:", " " + "word " * (3 + 5 * ((i + j) % 4)))
                    for j in range(3 + 2 * i)]
        jobs.append(ClientJob(latent, scales, examples, seed=100 + i))
    return jobs


def _load(model, spec, latent, scales):
    write_latents_(model, spec, latent)
    write_state_(model, spec, AdapterState(0, latent < 0, scales), latent_magnitude=None)


@torch.no_grad()
def test_each_row_block_sees_only_its_clients_adapter(adapted):
    model, _, spec = adapted
    jobs = _jobs(spec, 3)
    ids = torch.randint(0, 1000, (6, 9))  # (K B, T) with B = 2
    stack = StackedAdapters(model, spec, [j.latent for j in jobs], [j.scales for j in jobs])
    try:
        batched = model(input_ids=ids).logits  # (6, 9, V)
    finally:
        stack.unstack_()
    for k, j in enumerate(jobs):
        _load(model, spec, j.latent, j.scales)
        alone = model(input_ids=ids[2 * k : 2 * k + 2]).logits
        torch.testing.assert_close(batched[2 * k : 2 * k + 2], alone, rtol=1e-5, atol=1e-5)


def test_batched_training_matches_sequential_clients(adapted):
    model, tok, spec = adapted
    cfg = TrainConfig(steps=3, batch_size=2, seq_len=32)
    jobs = _jobs(spec, 3)
    seq = train_sequential(model, spec, tok, jobs, cfg, LR, LATENT_LR)
    bat = train_batched(model, spec, tok, jobs, cfg, LR, LATENT_LR)
    step = cfg.steps * LR  # how far Adam moves a parameter in 3 steps, at most ~lr per step
    for (l1, s1, m1), (l2, s2, m2), job in zip(seq, bat, jobs):
        assert float((s1 - job.scales).abs().max()) > 0.5 * step  # both really trained
        assert m1["train_loss"] == pytest.approx(m2["train_loss"], rel=1e-5)
        # scales: within 1% of what 3 steps move them
        assert float((s1 - s2).abs().max()) <= 0.01 * step
        # latents: the same, except where the gradient is at float-noise level and Adam's
        # normalization turns its sign into a full step (at most 2 lr per step, on few elements)
        diff = (l1 - l2).abs()
        assert float(diff.max()) <= 2 * step and float((diff > 0.01 * step).float().mean()) < 0.01
        # so the client updates agree: the same flips within the budget, the same scale deltas
        state = job.latent < 0
        f1, f2 = budget_flips(l1, state, 0.05), budget_flips(l2, state, 0.05)
        assert float((f1 ^ f2).float().mean()) < 1e-3
    # the stacked tensors are gone: the model runs its own single adapter again
    assert all(m.stack is None for m in model.modules() if hasattr(m, "stack"))


def test_batched_training_refuses_bad_input(adapted):
    model, tok, spec = adapted
    cfg = TrainConfig(steps=1, batch_size=2, seq_len=32)
    with pytest.raises(ValueError, match="at least one client job"):
        train_batched(model, spec, tok, [], cfg, LR, LATENT_LR)
    jobs = _jobs(spec, 2)
    stack = StackedAdapters(model, spec, [j.latent for j in jobs], [j.scales for j in jobs])
    try:
        with pytest.raises(ValueError, match="call unstack_"):
            StackedAdapters(model, spec, [j.latent for j in jobs], [j.scales for j in jobs])
        with pytest.raises(ValueError, match="does not split into 2 equal client blocks"):
            model(input_ids=torch.zeros(3, 4, dtype=torch.long))
    finally:
        stack.unstack_()
    bad = ClientJob(torch.zeros(spec.n_bits + 1), jobs[0].scales, jobs[0].examples, 0)
    with pytest.raises(ValueError, match="carrier stream must have shape"):
        train_batched(model, spec, tok, [bad], cfg, LR, LATENT_LR)
    nan = ClientJob(jobs[0].latent, jobs[0].scales * float("nan"), jobs[0].examples, 0)
    with pytest.raises(FloatingPointError, match=r"client\(s\) \[1\]"):
        train_batched(model, spec, tok, [jobs[1], nan], cfg, LR, LATENT_LR)
    assert all(m.stack is None for m in model.modules() if hasattr(m, "stack"))  # unstacked after an error

"""simulations/centralized.py: the pooled data split, lr selection, the qat-full import and sign tracking."""

import json
import statistics

import pytest
import torch

from lordba_fl.adapter.layer import lordba_layers
from lordba_fl.data import Example
from lordba_fl.methods.lora import lora_layers
from lordba_fl.runconfig import RunConfig
from lordba_fl.methods.lordba.layout import AdapterSpec, read_latents, read_scales
from simulations import centralized as C


class WordTok:
    """A whitespace tokenizer: one id per word, enough for encode_examples' length rule."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1] * len(text.split())}


def _parts(kind: str, clients: int, n: int) -> list[list[Example]]:
    return [[Example(f"{kind} c{c} e{i}:", f"words of {kind} {c} {i}") for i in range(n)] for c in range(clients)]


def test_validation_split_is_disjoint_from_training_pool_and_eval_set():
    train, test = _parts("train", 3, 20), _parts("test", 3, 5)
    # a target longer than seq_len behind a longer prompt: no target token fits, train_local would drop it
    long = Example("w " * 40, "x " * 20)
    train[1].append(long)
    split = C.pooled_split(train, test, WordTok(), seq_len=16, eval_examples=7)
    ids = lambda xs: {id(x) for x in xs}  # noqa: E731
    pool = [ex for part in train for ex in part if ex is not long]
    assert len(split.val) == 16  # max(16, round(0.1 * 60))
    assert not ids(split.val) & ids(split.train)
    assert ids(split.val) | ids(split.train) == ids(pool) and split.dropped == 1
    eval_set = split.eval_sets["clients"]
    assert not ids(eval_set) & (ids(split.val) | ids(split.train))
    # the clients' held-out examples, one from each client in turn (the federation's pooling)
    assert eval_set == [test[0][0], test[1][0], test[2][0], test[0][1], test[1][1], test[2][1], test[0][2]]
    again = C.pooled_split(train, test, WordTok(), seq_len=16, eval_examples=7)
    assert again.val == split.val  # seeded: every seed's sweep is scored on the same validation set


def test_validation_split_refuses_a_pool_it_would_empty():
    with pytest.raises(ValueError, match="too few"):
        C.carve_validation(_parts("train", 1, 16)[0], 0.1, 16)


@pytest.mark.parametrize("scores, expected", [
    ({3e-4: [2.0], 1e-3: [1.5], 3e-3: [1.7]}, 1e-3),
    ({3e-4: [1.0, 3.0], 1e-3: [1.9, 2.0]}, 1e-3),  # mean over seeds, not the best seed
    ({3e-4: [2.0, 2.0], 1e-3: [1.0, None]}, 3e-4),  # a diverged seed disqualifies its lr
    ({3e-4: [1.5], 1e-3: [1.5]}, 3e-4),  # ties go to the smaller lr
    ({3e-4: [None], 1e-3: [float("nan")]}, None),
])
def test_select_lr_takes_lowest_validation_loss(scores, expected):
    assert C.select_lr(scores) == expected


def test_sweep_reports_the_chosen_lrs_curve(monkeypatch, tmp_path):
    val = {3e-4: 2.5, 1e-3: 2.1, 3e-3: None}

    def fake_run(name, bench, lr, seed):
        return {"method": name, "lr": lr, "seed": seed, "val_loss": val[lr], "diverged": val[lr] is None,
                "steps": [1], "eval_loss": [10 * lr], "wall_s": 0.0}, None

    monkeypatch.setattr(C, "run_method", fake_run)
    out = tmp_path / "c.jsonl"
    chosen = C.sweep_method("lora", None, list(val), [0], {"task": "t", "initial_eval_loss": 3.0}, out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert chosen == 1e-3
    assert [r["lr"] for r in rows if r["kind"] == "sweep"] == list(val)
    (curve,) = [r for r in rows if r["kind"] == "curve"]
    assert curve["lr"] == 1e-3 and curve["eval_loss"] == [10 * 1e-3]


def test_batch_plan_never_replays_a_batch_across_chunks():
    examples = _parts("train", 1, 12)[0]
    plan = C.BatchPlan(examples, steps=6, batch_size=2, seed=5)
    chunks = plan.span(0, 2) + plan.span(2, 3) + plan.span(3, 6)
    assert sorted(map(id, chunks)) == sorted(map(id, examples))  # one pass: each example exactly once
    assert C.BatchPlan(examples, 6, 2, seed=5).batches == plan.batches  # every method sees this stream


# ---- with the tiny model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bench():
    from lordba_fl.base.models import load_model

    _, tok = load_model("tiny-llama")
    text = lambda i: f"line {i} of a short play, spoken twice and then once more\n"  # noqa: E731
    data = C.Split(train=[Example(f"R{i}:\n", text(i)) for i in range(24)],
                   val=[Example(f"V{i}:\n", text(100 + i)) for i in range(4)],
                   eval_sets={"clients": [Example(f"E{i}:\n", text(200 + i)) for i in range(4)]})
    return C.Bench("tiny-llama", tok, data, RunConfig(model="tiny-llama", device="cpu"), steps=3, eval_every=2,
                   batch_size=2, seq_len=32, rank=4, alpha=8.0)


def _hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@torch.no_grad()
def _set_lora_(model, fn):
    for _, a, b in lora_layers(model):
        new_a, new_b = fn(a.shape, b.shape)
        a.copy_(new_a)
        b.copy_(new_b)


def test_qat_import_reproduces_a_representable_warmup_update_exactly(bench):
    lora, _ = C.lora_model(bench, 1e-3, seed=0)
    m = torch.tensor([4.0, 3.0, 2.0, 1.0]) * 0.01  # distinct: the SVD is unique up to sign

    def factors(a_shape, b_shape):  # rank-4 product of orthogonal sign vectors
        (r, n_in), (n_out, _) = a_shape, b_shape
        return _hadamard(n_in)[1 : r + 1], _hadamard(n_out)[:, 1 : r + 1] * m

    _set_lora_(lora, factors)
    deltas = C.lora_dense_updates(lora)
    model, errors = C.import_warmup(bench, lora, seed=0)
    layers = lordba_layers(model)
    assert set(errors) == set(layers) == set(deltas) and len(layers) == 14
    for name, layer in layers.items():
        assert errors[name] < 1e-6
        torch.testing.assert_close(layer.delta_weight(), deltas[name], rtol=0, atol=1e-6 * deltas[name].abs().max())


def test_qat_import_fit_error_is_the_relative_error_of_the_imported_update(bench):
    lora, _ = C.lora_model(bench, 1e-3, seed=0)
    g = torch.Generator().manual_seed(0)
    _set_lora_(lora, lambda sa, sb: (torch.randn(sa, generator=g), torch.randn(sb, generator=g) * 0.01))
    deltas = C.lora_dense_updates(lora)
    model, errors = C.import_warmup(bench, lora, seed=0)
    for name, layer in lordba_layers(model).items():
        dw = deltas[name]
        recomputed = float((dw - layer.delta_weight()).norm() / dw.norm())
        assert 0.05 < errors[name] < 1.0  # random factors: not representable, not hopeless
        assert errors[name] == pytest.approx(recomputed, abs=1e-5)


def test_frozen_signs_keep_every_sign_while_scratch_flips_some(bench):
    lr, seed = 0.05, 3
    start = C.lordba_model(bench, seed)  # the run's adapter before training (same seed, same signs)
    spec = AdapterSpec.from_model(start)
    signs0, scales0 = read_latents(start, spec) < 0, read_scales(start, spec)

    rec, model = C.run_method("frozen-signs", bench, lr, seed)
    assert torch.equal(read_latents(model, spec) < 0, signs0)
    assert not torch.equal(read_scales(model, spec), scales0)  # it did train
    assert rec["signs_flipped_by_step"] == [0.0, 0.0] and rec["steps"] == [2, 3]

    rec, model = C.run_method("lordba-scratch", bench, lr, seed)
    flipped = float(((read_latents(model, spec) < 0) ^ signs0).float().mean())
    assert flipped > 0 and rec["signs_flipped"] == pytest.approx(flipped)


def test_qat_full_curve_spans_warmup_and_ste_and_reports_median_fit_error(bench, monkeypatch):
    seen = {}
    real = C.import_warmup

    def spy(*args, **kwargs):
        model, errors = real(*args, **kwargs)
        seen.update(errors)
        return model, errors

    monkeypatch.setattr(C, "import_warmup", spy)
    rec, _ = C.run_method("lordba-qat-full", bench, 1e-3, seed=0)
    assert rec["warmup_steps"] == 1 and rec["steps"] == [2, 3] and len(rec["eval_loss"]) == 2
    assert rec["svd_fit_error_median"] == pytest.approx(statistics.median(seen.values()))
    assert rec["signs_flipped_by_step"][0] is not None  # tracked from the start of STE training


def test_a_diverged_run_scores_none_instead_of_crashing_the_sweep(bench, monkeypatch):
    def diverge(bench, plan, lr, seed, curve):
        raise FloatingPointError("training loss is nan at step 0; lower the learning rate")

    monkeypatch.setitem(C.METHODS, "lora", diverge)
    rec, model = C.run_method("lora", bench, 10.0, seed=0)
    assert model is None and rec["diverged"] and rec["val_loss"] is None

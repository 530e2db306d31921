"""Batched multi-client training: K clients' LoRDBA adapters trained in one pass over a shared base.

Each sampled client normally runs its own forward/backward through the frozen base. Here the K
clients' micro-batches are stacked along the batch axis (client k owns rows ``[k B, (k+1) B)``),
the base matmuls run once on all ``K B`` rows, and every LoRDBA layer applies client k's adapter
to client k's rows only (one batched autograd function, ``(K, N, in) @ (K, in, r)``). The loss is
the sum of the K clients' own mean token losses, so client k's parameters get exactly client k's
gradient; AdamW is elementwise, so one optimizer over the stacked ``(K, ...)`` tensors is K
independent optimizers.

Differences from K sequential clients are floating-point only: the base matmuls see another batch
shape, and rows are right-padded to the longest of all K clients (causal attention never looks at
the padding). ``tests/test_batched.py`` states the tolerance; ``simulations/bench_batched.py``
measures client-steps per second against the sequential loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lordba_fl.adapter.layer import lordba_layers
from lordba_fl.data import Example
from lordba_fl.methods.lordba import train_groups
from lordba_fl.train import (
    IGNORE,
    TrainConfig,
    pad_id_of,
    batch_to,
    collate,
    encode_examples,
    make_optimizer,
    micro_batches,
    model_device,
    train_local,
)
from lordba_fl.methods.lordba.layout import (
    AdapterSpec,
    AdapterState,
    checked_layers,
    read_latents,
    read_scales,
    split_carriers,
    split_scales,
    write_latents_,
    write_state_,
)


@dataclass
class ClientJob:
    """One client's starting point and data: its carrier-stream latents, scale stream, examples, seed."""

    latent: torch.Tensor  # (n_bits,)
    scales: torch.Tensor  # (n_scales,)
    examples: list[Example]
    seed: int


class StackedAdapters:
    """K adapters stacked over the LoRDBA layers of one model (``layer.stack``); remove with :meth:`unstack_`."""

    def __init__(self, model: nn.Module, spec: AdapterSpec, latents: list[torch.Tensor], scales: list[torch.Tensor]):
        self.model, self.spec, self.k = model, spec, len(latents)
        self.layers = checked_layers(model, spec)
        if any(m.stack is not None for m in self.layers):
            raise ValueError("model already carries stacked adapters; call unstack_() first")
        device = model_device(model)
        carriers = [split_carriers(spec, lat) for lat in latents]
        scale_views = [split_scales(spec, s) for s in scales]
        for layer, m in zip(spec.layers, self.layers):
            la = torch.stack([c[layer.name][0] for c in carriers]).to(device)  # (K, r, in)
            lb = torch.stack([c[layer.name][1] for c in carriers]).to(device)  # (K, out, r)
            sc = {kind: torch.stack([v[layer.name][kind] for v in scale_views]).to(device) for kind in spec.scales}
            m.stack = tuple(t.clone().requires_grad_(True) if t is not None else None
                            for t in (la, lb, sc.get("in"), sc.get("mid"), sc.get("out")))

    def latent_params(self) -> list[torch.Tensor]:
        return [t for m in self.layers for t in m.stack[:2]]

    def scale_params(self) -> list[torch.Tensor]:
        return [t for m in self.layers for t in m.stack[2:] if t is not None]

    @torch.no_grad()
    def read(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Client ``k``'s (latent stream (n_bits,), scale stream (n_scales,)) as CPU fp32 copies."""
        lat = torch.cat([t[k].reshape(-1) for m in self.layers for t in m.stack[:2]])
        order = {"in": 2, "mid": 3, "out": 4}
        sc = torch.cat([m.stack[order[kind]][k].reshape(-1) for m in self.layers for kind in self.spec.scales])
        return lat.float().cpu(), sc.float().cpu()

    def unstack_(self) -> None:
        for m in self.layers:
            m.stack = None


def _client_losses(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Each client's mean next-token loss over its own rows, as the model's own loss computes it; (K,).

    One cross-entropy over all rows, summed per client block: slicing the logits per client would
    make every client's backward materialize a zero gradient of the whole (K B, T, V) logits.
    """
    v = logits.shape[-1]
    shifted = nn.functional.pad(labels, (0, 1), value=IGNORE)[:, 1:]  # (K B, T): next token, none past the end
    nll = nn.functional.cross_entropy(
        logits.float().reshape(-1, v), shifted.reshape(-1), ignore_index=IGNORE, reduction="none"
    ).view(k, -1)  # (K, B T)
    counts = (shifted != IGNORE).view(k, -1).sum(1)  # (K,)
    return nll.sum(1) / counts


def train_batched(
    model: nn.Module,
    spec: AdapterSpec,
    tok,
    jobs: list[ClientJob],
    cfg: TrainConfig,
    lr: float,
    latent_lr: float,
) -> list[tuple[torch.Tensor, torch.Tensor, dict[str, float]]]:
    """Train ``len(jobs)`` clients' adapters together; per client ``(latent, scales, metrics)``.

    Equivalent to, for each job, loading its latents and scales into ``model`` and running
    :func:`lordba_fl.train.train_local` with groups ``[scales @ lr, latents @ latent_lr]`` and the
    same seed (up to floating point).
    """
    if not jobs:
        raise ValueError("train_batched needs at least one client job")
    if not lordba_layers(model):
        raise ValueError("model has no LoRDBA adapters; attach_lordba_ first")
    k = len(jobs)
    stack = StackedAdapters(model, spec, [j.latent for j in jobs], [j.scales for j in jobs])
    try:
        groups = [{"params": stack.scale_params(), "lr": lr}]
        if latent_lr > 0:
            groups.append({"params": stack.latent_params(), "lr": latent_lr})
        else:
            for t in stack.latent_params():
                t.requires_grad_(False)
        opt = make_optimizer(groups, cfg)
        streams = [micro_batches(encode_examples(tok, j.examples, cfg.seq_len), cfg, j.seed) for j in jobs]
        device, pad = model_device(model), pad_id_of(tok)
        losses = torch.zeros(k)
        model.train()
        for step in range(cfg.steps):
            opt.zero_grad(set_to_none=True)
            for _ in range(cfg.grad_accum):
                batch = batch_to(collate([item for s in streams for item in next(s)], pad), device)  # (K B, T)
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                per_client = _client_losses(logits, batch["labels"], k)  # (K,)
                bad = [i for i in range(k) if not torch.isfinite(per_client[i])]
                if bad:
                    raise FloatingPointError(f"training loss of client(s) {bad} is not finite at step {step}; lower the learning rate")
                (per_client.sum() / cfg.grad_accum).backward()
                losses += per_client.detach().cpu()
            opt.step()
        model.eval()
        n = cfg.steps * cfg.grad_accum
        metrics = {"train_examples": float(n * cfg.batch_size), "steps": float(cfg.steps)}
        return [(*stack.read(i), {"train_loss": float(losses[i]) / n, **metrics}) for i in range(k)]
    finally:
        stack.unstack_()


def train_sequential(
    model: nn.Module,
    spec: AdapterSpec,
    tok,
    jobs: list[ClientJob],
    cfg: TrainConfig,
    lr: float,
    latent_lr: float,
) -> list[tuple[torch.Tensor, torch.Tensor, dict[str, float]]]:
    """The reference :func:`train_batched` matches: one client after another, as a LoRDBA client trains."""

    out = []
    for j in jobs:
        write_latents_(model, spec, j.latent)
        write_state_(model, spec, AdapterState(0, j.latent < 0, j.scales), latent_magnitude=None)
        metrics = train_local(model, train_groups(model, spec, lr, latent_lr), tok, j.examples, cfg, j.seed)
        out.append((read_latents(model, spec), read_scales(model, spec), metrics))
    return out

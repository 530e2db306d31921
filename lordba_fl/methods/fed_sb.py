"""``fed-sb``: Fed-SB (Singhal et al. 2025, arXiv 2502.15436), the LoRA-SB adapter averaged exactly.

Each adapted layer is ``y = W0 x + B R A x`` with ``A`` (r x in) and ``B`` (out x r) frozen and
shared, and only the r x r core ``R`` trained. Because every client holds the same ``A`` and ``B``,
the mean of the clients' cores is exactly the mean of their updates ``B R_k A`` (plain FedAvg of
``R``), and a client-round moves ``r^2`` numbers per layer instead of LoRA's ``r (in + out)``.

Initialisation, as in the authors' code (``estimate_and_process_grads_torch`` and
``find_and_initialize_grad``): the server sums the full weight gradient ``G`` of every adapted
layer over ``init_examples`` pooled training examples, takes one simulated Adam step
``-lr * sign(G)``, and sets ``B R A`` to its rank-r truncated SVD: ``B = U_r``, ``R = diag(s_r)``,
``A = V_rᵀ`` (a seeded ``svd_lowrank``, as the authors use). The scaling is 1 (LoRA-SB sets
``alpha = r``), so ``alpha`` is ignored. As in the reference, the server reads these training
examples; LoRDBA and the LoRA baselines never do. The simulated step is the training ``lr``, as in
the reference, unless ``fed-sb.init-step`` sets it apart: the initial core's size is ``init-step``
times the top singular values of ``sign(G)``, so a higher training lr would otherwise also scale up
the starting adapter.

Bytes, all counted: a node's first downlink carries the basis (``A`` and ``Bᵀ`` in fp16, the size
of an fp16 LoRA of the same rank) with the core; it keeps the basis in its ``context.state``, and
every later message either way is the fp16 core alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lordba_fl.methods.lora import (
    LORA_CONTAINER,
    LoRAFedAvg,
    decode_lora,
    encode_lora,
    fp16_values,
    lora_modules,
    save_peft_factors,
)
from lordba_fl.methods.base import MethodSettings
from lordba_fl.options import option
from lordba_fl.train import batch_to, collate, encode_examples, model_device, pad_id_of, train_local
from lordba_fl.errors import MalformedFrameError

_CORE, _BASIS = 0, 3  # LORA frame kinds: the core alone (fp16), or the basis then the core (fp16)
BASIS_KEY = "fed-sb.basis"  # context.state: this node's copy of the basis frame
INIT_EXAMPLES = 48  # pooled training examples summed into the initial gradient (the authors use 50)


@dataclass(frozen=True)
class FedSBSettings(MethodSettings):
    """Fed-SB's settings: the run's shared values and the size of its simulated initial step."""

    init_step: float = option(0.0, "fed-sb.init-step",
        "the initial core is the rank-r SVD of -init_step * sign(G) (G: the pooled weight gradient; 0: lr, as the authors)")

    def __post_init__(self):
        if not (math.isfinite(self.init_step) and self.init_step >= 0):
            raise ValueError(f"fed-sb.init-step must be a finite number >= 0 (0: the training lr); got {self.init_step!r}")

    @property
    def init_step_size(self) -> float:
        """The simulated step the basis is cut from: ``init_step``, or the training ``lr`` when 0."""
        return self.init_step or self.lr


class StaleBasisError(ValueError):
    """A core arrived without the basis, and this node does not hold one (its state was lost)."""


class CoreLinear(nn.Linear):
    """Fed-SB's frozen ``A`` followed by the trained core: ``x -> R (A x)``. It stands in PEFT's
    ``lora_A`` slot (PEFT reads ``lora_A.weight`` for the dtype), so PEFT's forward adds ``B R A x``."""

    def __init__(self, in_features: int, rank: int):
        super().__init__(in_features, rank, bias=False)
        self.weight.requires_grad_(False)
        self.core = nn.Parameter(torch.eye(rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.weight), self.core)  # (.., in) -> (.., r) -> (.., r)


def fed_sb_layers(model: nn.Module) -> list[tuple[str, CoreLinear, nn.Linear]]:
    """``(name, A-and-core module, B module)`` of every Fed-SB layer, in module order."""
    out = []
    for name, m in lora_modules(model):
        a = m.lora_A["default"]
        if not isinstance(a, CoreLinear):
            raise ValueError(f"layer {name} has no Fed-SB core; build the model with FedSB.adapt")
        out.append((name, a, m.lora_B["default"]))
    return out


@torch.no_grad()
def weight_gradients(model: nn.Module, tok, examples, seq_len: int, batch_size: int) -> list[torch.Tensor]:
    """Per Fed-SB layer, the gradient of the loss with respect to its frozen base weight (out, in),
    summed over the batches of ``examples`` (``G = sum gᵀ x``, read at each layer's output, so a
    quantized base that has no weight tensor to differentiate still gets it)."""
    layers = fed_sb_layers(model)
    grads = [torch.zeros(b.weight.shape[0], a.weight.shape[1]) for _, a, b in layers]  # (out, in) each
    hooks = []

    def capture(i):
        def hook(module, inputs, output):
            x = inputs[0].detach()

            def accumulate(g):  # dL/dy of the layer's output is dL/dy of its base: G += gᵀ x
                grads[i].add_(g.reshape(-1, g.shape[-1]).float().t().cpu() @ x.reshape(-1, x.shape[-1]).float().cpu())
            if output.requires_grad:
                output.register_hook(accumulate)
        return hook

    for i, (name, _, _) in enumerate(layers):
        hooks.append(model.get_submodule(name).register_forward_hook(capture(i)))
    items = encode_examples(tok, examples, seq_len)
    pad, device = pad_id_of(tok), model_device(model)
    was_training = model.training
    model.train()
    try:
        with torch.enable_grad():
            for i in range(0, len(items), batch_size):
                batch = batch_to(collate(items[i : i + batch_size], pad), device)
                model(**batch).loss.backward()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    return grads


def sign_step_basis(grad: torch.Tensor, rank: int, step: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A (r, in), R (r, r), B (out, r))`` with ``B R A`` the rank-``r`` truncated SVD of
    ``-step * sign(grad)``: one Adam step from zero moments (``lr * sign(gradient)``, descending).
    A seeded randomized SVD (``svd_lowrank``, as the authors use; 8 extra columns, 10 power
    iterations): an exact SVD of every 1536 x 576 layer takes minutes on a CPU."""
    target = -step * torch.sign(grad)  # (out, in)
    with torch.random.fork_rng():
        torch.manual_seed(42)
        u, s, v = torch.svd_lowrank(target, q=min(rank + 8, *target.shape), niter=10)  # (out, q), (q,), (in, q)
    return v[:, :rank].t().contiguous(), torch.diag(s[:rank]), u[:, :rank].contiguous()


class FedSB(LoRAFedAvg):
    name = "fed-sb"
    settings_type = FedSBSettings

    def __init__(self, cfg):
        super().__init__(cfg)
        self.basis: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer (A, B), fp16-exact
        self.with_basis: set[int] = set()  # nodes that hold the basis

    # ---- layout ---------------------------------------------------------------------------------
    def adapt(self, model: nn.Module) -> nn.Module:
        model = super().adapt(model)  # PEFT LoRA at this rank, A seeded, B = 0
        r = self.cfg.rank
        for _, m in lora_modules(model):
            in_features = m.lora_A["default"].weight.shape[1]
            m.lora_A["default"] = CoreLinear(in_features, r).to(m.lora_A["default"].weight.device)
            m.lora_B["default"].weight.requires_grad_(False)
            m.scaling["default"] = 1.0  # LoRA-SB: alpha = r
        self.segments = np.full(len(self.layers_shapes) * r, r, dtype=np.int64)  # per layer r rows of R
        self.basis_segments = LoRAFedAvg.segments_at(self, r)  # per layer r rows of A, then r rows of Bᵀ
        return model

    def segments_at(self, rank: int) -> np.ndarray:
        return np.full(len(self.layers_shapes) * rank, rank, dtype=np.int64)

    def read_values(self, model) -> torch.Tensor:
        return torch.cat([a.core.detach().reshape(-1) for _, a, _ in fed_sb_layers(model)]).float().cpu()

    @torch.no_grad()
    def write_values_(self, model, values: torch.Tensor) -> None:
        pos = 0
        for _, a, _ in fed_sb_layers(model):
            a.core.copy_(values[pos : pos + a.core.numel()].view_as(a.core))
            pos += a.core.numel()

    @torch.no_grad()
    def _write_basis_(self, model, basis) -> None:
        for (_, a, b), (a_w, b_w) in zip(fed_sb_layers(model), basis):
            a.weight.copy_(a_w)
            b.weight.copy_(b_w)

    def _basis_values(self) -> np.ndarray:
        parts = []
        for a_w, b_w in self.basis:
            parts += [a_w.reshape(-1), b_w.t().reshape(-1)]
        return torch.cat(parts).numpy().astype(np.float16)

    def _basis_from(self, values: np.ndarray) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out, pos, r = [], 0, self.cfg.rank
        for _, n_in, n_out in self.layers_shapes:
            a = torch.from_numpy(values[pos : pos + r * n_in].reshape(r, n_in).copy())
            pos += r * n_in
            b = torch.from_numpy(values[pos : pos + r * n_out].reshape(r, n_out).T.copy())
            pos += r * n_out
            out.append((a, b))
        return out

    # ---- server ---------------------------------------------------------------------------------
    def init_from_data(self, model, tok, task) -> None:
        """The gradient basis from the first :data:`INIT_EXAMPLES` training examples, dealt round-robin
        from every client (the authors compute it once, centrally, on the pooled training data)."""
        pooled, i = [], 0
        while len(pooled) < INIT_EXAMPLES and any(i < len(t) for t in task.train):
            pooled += [t[i] for t in task.train if i < len(t)]
            i += 1
        grads = weight_gradients(model, tok, pooled[:INIT_EXAMPLES], self.cfg.train.seq_len, self.cfg.train.batch_size)
        fits = [sign_step_basis(g, self.cfg.rank, self.cfg.init_step_size) for g in grads]
        # the basis travels in fp16: the server uses exactly what the clients will hold
        self.basis = [(a.half().float(), b.half().float()) for a, _, b in fits]
        self._write_basis_(model, self.basis)
        cores = torch.cat([r_.reshape(-1) for _, r_, _ in fits])
        self.write_values_(model, cores.half().float())

    def init_server(self, model) -> None:
        if self.basis is None:
            raise ValueError("fed-sb needs its gradient basis before init_server: call init_from_data(model, tok, task)")
        super().init_server(model)
        self.with_basis = set()

    def note_held(self, node_id: int, version: int | None) -> None:
        if version is None:
            self.with_basis.discard(node_id)
        else:
            self.with_basis.add(node_id)

    def downlink(self, node_id: int, server_round: int) -> bytes:
        if node_id in self.with_basis:
            return self._full_frame(server_round)
        core = self.global_values.numpy().astype(np.float16)
        payload = np.concatenate([self._basis_values(), core])
        return encode_lora(_BASIS, 0, server_round, self._version, payload.tobytes(), compress=False)

    def load_global_(self, model) -> None:
        self._write_basis_(model, self.basis)
        self.write_values_(model, self.global_values)

    def export(self, model, folder) -> None:
        """A plain PEFT LoRA (``lora_A = R A``, ``lora_B = B``, ``alpha = r``): the same product."""
        factors = [(a.core.detach() @ a.weight.detach(), b.weight.detach()) for _, a, b in fed_sb_layers(model)]
        save_peft_factors(folder / "peft_lora", [n for n, _, _ in fed_sb_layers(model)], factors, alpha=self.cfg.rank)

    def server_state(self):
        tensors, meta = super().server_state()
        tensors["basis"] = torch.from_numpy(self._basis_values().astype(np.float32))
        return tensors, {**meta, "with_basis": sorted(self.with_basis)}

    def load_server_state(self, tensors, meta) -> None:
        super().load_server_state(tensors, meta)
        self.basis = self._basis_from(tensors["basis"].numpy())
        self.with_basis = {int(n) for n in meta.get("with_basis", [])}

    # ---- client ---------------------------------------------------------------------------------
    def client_load_(self, model, frame: bytes, state) -> int:
        (kind, *_), _ = LORA_CONTAINER.open(frame)
        if kind == _BASIS:
            segments = np.concatenate([self.basis_segments, self.segments])
            _, _, _, version, raw = decode_lora(frame, segments, (_BASIS,))
            values = fp16_values(raw)
            n_basis = int(self.basis_segments.sum())
            basis, core = values[:n_basis], values[n_basis:]
            if state is not None:
                from flwr.app import ConfigRecord

                state[BASIS_KEY] = ConfigRecord({"values": values[:n_basis].astype(np.float16).tobytes()})
        elif kind == _CORE:
            _, _, _, version, raw = decode_lora(frame, self.segments, (_CORE,))
            core = fp16_values(raw)
            if state is None or BASIS_KEY not in state:
                raise StaleBasisError("fed-sb: a core arrived but this node holds no basis (its state was lost); "
                                      "the server sends the basis again after this error")
            basis = np.frombuffer(state[BASIS_KEY]["values"], np.float16).astype(np.float32)
            if basis.size != int(self.basis_segments.sum()):
                raise StaleBasisError(f"fed-sb: the stored basis has {basis.size} values; this adapter needs "
                                      f"{int(self.basis_segments.sum())}")
        else:
            raise MalformedFrameError(f"LoRA frame kind {kind} is not what fed-sb sends ({_CORE} or {_BASIS})")
        self._write_basis_(model, self._basis_from(basis))
        self.write_values_(model, torch.from_numpy(core.copy()))
        return version

    def client_train(self, model, tok, frame, state, examples, server_round, seed):
        version = self.client_load_(model, frame, state)
        cores = [a.core for _, a, _ in fed_sb_layers(model)]
        for _, a, b in fed_sb_layers(model):
            a.weight.requires_grad_(False)
            b.weight.requires_grad_(False)
        metrics = train_local(model, [{"params": cores, "lr": self.cfg.lr}], tok, examples, self.cfg.train, seed)
        payload = self.read_values(model).numpy().astype(np.float16)
        metrics["held_version"] = float(version)
        return encode_lora(_CORE, 0, server_round, version, payload.tobytes(), compress=False), metrics

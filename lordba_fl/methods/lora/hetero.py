"""LoRA baselines for heterogeneous devices: each node trains the rank its device affords.

The server holds LoRA factors at the run's rank ``R`` in the flat layout of
:mod:`lordba_fl.methods.lora` (per layer ``A (R, in)`` then ``Bᵀ (R, out)``); a node of rank ``r``
(``rank`` in its node config, or its ``hetero.tiers`` draw; ``alpha`` scaled so ``alpha / r`` is the
run's) receives the leading ``r`` components, trains them like ``lora-fedavg`` and replies with its
fp16 factors at rank ``r``. A reply whose size is not its node's rank is rejected. The two differ in
how the server combines replies of different ranks:

* ``lora-hetlora`` (HetLoRA's zero-padding, Cho et al. 2024, its "uniform" aggregation): every reply
  is padded with zeros to rank ``R`` and the server takes the example-weighted mean, so a component
  only high-rank nodes train is averaged towards zero by the low-rank ones.
* ``lora-flexlora`` (FlexLoRA, Bai et al. 2024): the server averages the full-size products
  ``B_k A_k`` (each at its own rank, example-weighted), takes the SVD of the mean and keeps its top
  ``R`` components as ``B = U_R diag(sigma_R)``, ``A = V_Rᵀ``; a rank-``r`` node gets the leading
  ``r`` of them, the best rank-``r`` approximation of the mean product.

Both are nested (a rank-``r`` broadcast is exactly the leading ``r`` components of the global
factors), so the per-tier metering and the ``hetero.tiers`` settings of LoRDBA apply unchanged.
"""

from __future__ import annotations

import numpy as np
import torch

from lordba_fl.errors import DecompressionBombError, ShapeMismatchError
from lordba_fl.methods.lora.frame import FP16, encode_lora
from lordba_fl.methods.lora.method import LoRAFedAvg


class HeteroRankLoRA(LoRAFedAvg):
    """Shared machinery: per-node ranks, nested truncation, per-rank reply decoding."""

    nested_ranks = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.node_ranks: dict[int, int] = {}

    # ---- layout ---------------------------------------------------------------------------------
    def split(self, values: torch.Tensor, rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The flat values of a rank-``rank`` adapter as ``[(A (rank, in), Bᵀ (rank, out)), ...]`` per layer."""
        out, pos = [], 0
        for _, n_in, n_out in self.layers_shapes:
            a = values[pos : pos + rank * n_in].view(rank, n_in)
            pos += rank * n_in
            bt = values[pos : pos + rank * n_out].view(rank, n_out)
            pos += rank * n_out
            out.append((a, bt))
        if pos != values.numel():
            raise ValueError(f"{values.numel()} values do not make a rank-{rank} adapter of these layers ({pos})")
        return out

    def truncate(self, values: torch.Tensor, rank: int) -> torch.Tensor:
        """The leading ``rank`` components of a rank-R flat adapter (what a rank-``rank`` node holds)."""
        if rank == self.cfg.rank:
            return values
        return torch.cat([t[:rank].reshape(-1) for a, bt in self.split(values, self.cfg.rank) for t in (a, bt)])

    def pad(self, values: torch.Tensor, rank: int) -> torch.Tensor:
        """A rank-``rank`` flat adapter padded with zero components to the run's rank R."""
        if rank == self.cfg.rank:
            return values
        parts = []
        for a, bt in self.split(values, rank):
            for t in (a, bt):
                parts += [t.reshape(-1), torch.zeros((self.cfg.rank - rank) * t.shape[1], dtype=t.dtype)]
        return torch.cat(parts)

    # ---- server ---------------------------------------------------------------------------------
    def note_rank(self, node_id: int, rank: int) -> None:
        if not 1 <= rank <= self.cfg.rank:
            raise ValueError(f"node {node_id} declares rank {rank}; method {self.name!r} serves ranks 1..{self.cfg.rank} "
                             "(the run's rank is the top tier)")
        self.node_ranks[node_id] = rank

    def rank_of(self, node_id: int) -> int:
        return self.node_ranks.get(node_id, self.cfg.rank)

    def downlink(self, node_id: int, server_round: int) -> bytes:
        payload = self.truncate(self.global_values, self.rank_of(node_id)).numpy().astype(np.float16)
        if not np.isfinite(payload).all():
            raise ValueError("global LoRA state overflows fp16")
        return encode_lora(FP16, 0, server_round, self._version, payload.tobytes(), compress=False)

    # ---- client ---------------------------------------------------------------------------------
    def client_load_(self, model, frame: bytes, state) -> int:
        try:
            return super().client_load_(model, frame, state)
        except DecompressionBombError as e:  # a broadcast sized for a higher tier than this node now trains
            raise ShapeMismatchError(f"{e} (the server still serves this node another rank)") from e

    def decode_reply(self, reply) -> torch.Tensor:
        """A reply's fp16 values at its node's rank: a reply of another rank fails the frame's size."""
        rank = self.rank_of(reply.node_id)
        try:
            return self._decode_reply(reply.frame, self.segments_at(rank))
        except ValueError as e:  # CodecError is a ValueError
            raise type(e)(f"{e} (node trains rank {rank})") from e

    def server_state(self):
        tensors, meta = super().server_state()
        return tensors, {**meta, "node_ranks": {str(k): v for k, v in self.node_ranks.items()}}

    def load_server_state(self, tensors, meta) -> None:
        super().load_server_state(tensors, meta)
        self.node_ranks = {int(k): int(v) for k, v in meta.get("node_ranks", {}).items()}

    def combine(self, accepted: list) -> torch.Tensor:
        total = sum(r.weight for r, _ in accepted)
        return self.combine_ranked([(v, self.rank_of(r.node_id), r.weight / total) for r, v in accepted])

    def combine_ranked(self, ranked: list) -> torch.Tensor:
        """The new global values from ``[(values, rank, weight share)]``: each reply zero-padded to the
        full rank, weighted mean (HetLoRA); a subclass may combine otherwise."""
        return sum(w * self.pad(v, rank) for v, rank, w in ranked).float()


class HetLoRA(HeteroRankLoRA):
    name = "lora-hetlora"


class FlexLoRA(HeteroRankLoRA):
    name = "lora-flexlora"

    @torch.no_grad()
    def combine_ranked(self, ranked) -> torch.Tensor:
        """FlexLoRA: the top-R SVD factors of the weighted mean of the replies' products."""
        per_client = [(self.split(v.double(), rank), w) for v, rank, w in ranked]
        parts = []
        for i, (_, n_in, n_out) in enumerate(self.layers_shapes):
            mean = sum(w * (layers[i][1].t() @ layers[i][0]) for layers, w in per_client)  # (out, in) = B A
            u, s, vh = torch.linalg.svd(mean, full_matrices=False)
            r = self.cfg.rank
            a = vh[:r]  # (R, in)
            bt = (u[:, :r] * s[None, :r]).t()  # (R, out)
            parts += [a.reshape(-1), bt.reshape(-1)]
        return torch.cat(parts).float()

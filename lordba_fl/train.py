"""The one training / evaluation loop every method shares (LoRDBA and the LoRA baselines).

What varies between methods is only which parameters train and with which optimizer settings: the
caller passes parameter groups. Batches are built from :class:`lordba_fl.data.Example` lists: the
prompt's tokens are context (label -100), the target's tokens are learned.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lordba_fl.data.tasks import Example
from lordba_fl.options import option

IGNORE = -100


@dataclass(frozen=True)
class TrainConfig:
    """Local training settings.

    Parameters
    ----------
    steps : int
        Optimizer steps per round (E).
    batch_size : int
        Examples per micro-batch.
    grad_accum : int
        Micro-batches per optimizer step.
    seq_len : int
        Tokens per example (longer ones are truncated).
    optimizer : str
        ``"adamw"`` or ``"sgd"``.
    gradient_checkpointing : bool
        Recompute each decoder layer's activations in backward instead of keeping them (less
        memory, ~1/3 more compute); for low-RAM devices.
    """

    steps: int = option(4, "train.local-steps", "Optimizer steps per client round (E).")
    batch_size: int = option(4, "train.batch-size", "Examples per micro-batch.")
    grad_accum: int = option(1, "train.grad-accum", "Micro-batches per optimizer step.")
    seq_len: int = option(128, "train.seq-len", "Tokens per example (longer ones are truncated).")
    optimizer: str = option("adamw", "train.optimizer", "adamw | sgd")
    gradient_checkpointing: bool = option(False, "train.gradient-checkpointing", "recompute activations in backward (low-RAM devices)")
    return_memory: bool = option(False, "train.return-memory",
        "hand freed tensor memory back to the OS at once (glibc: a fixed 16 KiB mmap threshold): a lower "
        "peak RSS on low-RAM devices for a few more page faults; set for the whole client process")

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "seq_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer; got {getattr(self, name)!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}; got {self.optimizer!r}")


def return_freed_memory(threshold: int = 16 * 1024) -> bool:
    """Make the C allocator serve every block of ``threshold`` bytes or more with its own ``mmap``, so
    a freed tensor's pages go back to the OS at once (``train.return-memory``).

    glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), after which
    activations, gradients and optimizer temporaries of that size come from the heap and stay resident:
    a client's RSS then climbs step after step. Fixing the threshold stops that. 16 KiB and not glibc's
    starting 128 KiB: an adapter's per-layer tensors (latents, their gradients and moments: 12-98 KiB
    each on SmolLM2-135M at rank 16) would otherwise share heap pages with longer-lived blocks, and a
    freed gradient's pages stay resident (the edge profile's round, ``simulations/bench_edge.py``: with
    the other parts of ``train.return-memory``, peak 566 -> 493 MB, the same losses and bytes). Returns
    False where the C library has no ``mallopt`` (not glibc: nothing changes). Affects the whole
    process, so call it before the model loads."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_mmap_threshold = -3  # glibc's M_MMAP_THRESHOLD
    return bool(mallopt(m_mmap_threshold, int(threshold)))


def trim_freed_memory() -> bool:
    """Hand the C heap's free pages back to the OS now (glibc ``malloc_trim(0)``), also those between
    blocks still in use: blocks the heap served before the mmap threshold applied (a freed hole is
    reused before a new mapping is made) keep their pages resident after they are freed. Called after
    every training step and after a round frees its gradients and moments when ``train.return-memory``
    is set (a few milliseconds). Returns False where the C library has no ``malloc_trim``."""
    import ctypes

    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    malloc_trim(0)
    return True


class PlainAdamW:
    """AdamW without weight decay, computing exactly what ``torch.optim.AdamW(weight_decay=0)`` computes on
    CPU tensors (its single-tensor path, operation for operation), with the same ``param_groups`` /
    ``state`` layout, but without ``torch.optim.Optimizer``: every call of that class imports torch's
    compiler (``torch._dynamo``, ~70 MB resident and a second in a fresh client process)."""

    def __init__(self, groups: list[dict], betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.defaults = {"betas": betas, "eps": eps, "weight_decay": 0.0}
        self.param_groups = [{**self.defaults, **g, "params": list(g["params"])} for g in groups]
        for g in self.param_groups:
            if "lr" not in g:
                raise ValueError("every optimizer group needs its lr")
        self.state: dict = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for g in self.param_groups:
            for p in g["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    self._update(p, g)

    @torch.no_grad()
    def _update(self, p: torch.Tensor, g: dict) -> None:
        beta1, beta2 = g["betas"]
        lr, eps = g["lr"], g["eps"]
        st = self.state.get(p)
        if st is None:
            st = self.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                  "exp_avg_sq": torch.zeros_like(p)}
        st["step"] += 1
        st["exp_avg"].lerp_(p.grad, 1 - beta1)
        st["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        step = st["step"].item()
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        denom = (st["exp_avg_sq"].sqrt() / bias_correction2_sqrt).add_(eps)
        p.addcdiv_(st["exp_avg"], denom, value=-(lr / (1 - beta1**step)))

    def step_in_backward(self) -> list:
        """Update each parameter the moment backward has accumulated its gradient, and drop that
        gradient: the whole set of gradients never exists at once (one parameter's at a time). AdamW
        is elementwise, so this computes exactly what ``backward(); step()`` computes, as long as one
        backward makes one step (no gradient accumulation over micro-batches; autograd sums a
        parameter's uses before its hook runs, and runs it after every node that needs its old value).
        Returns the hook handles (``handle.remove()`` restores the plain behaviour)."""
        handles = []
        for g in self.param_groups:
            for p in g["params"]:
                if p.requires_grad:
                    def hook(param, g=g):
                        self._update(param, g)
                        param.grad = None
                    handles.append(p.register_post_accumulate_grad_hook(hook))
        return handles


def _adamw(groups: list[dict]):
    on_cpu = all(p.device.type == "cpu" for g in groups for p in g["params"])
    return PlainAdamW(groups) if on_cpu else torch.optim.AdamW(groups, weight_decay=0.0)  # (fused / foreach kernels)


OPTIMIZERS = {
    "adamw": _adamw,
    "sgd": lambda groups: torch.optim.SGD(groups, momentum=0.0),
}


class TargetTooLongError(ValueError):
    """An example whose target (with EOS) does not fit ``train.seq-len`` and must not be cut."""


def encode_example(tok, ex: Example, seq_len: int) -> tuple[list[int], list[int]]:
    """Token ids and labels of one example (prompt tokens labelled -100), at most ``seq_len`` long.

    The target is what is learned and scored, so it is kept whole: a prompt that does not fit beside
    it loses its *first* tokens (at least one prompt token stays, so the first target token is
    predicted from context). A target that does not fit on its own is cut from the right (plain
    language modelling: the text's first ``seq_len`` tokens), except for an example marked
    ``whole_target`` (a scored answer or label), which raises :class:`TargetTooLongError`.
    """
    p = tok(ex.prompt, add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id
    t = tok(ex.target, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
    room = seq_len - len(t)  # prompt tokens that fit beside the whole target
    if room >= len(p):
        pass
    elif room >= 1:
        p = p[len(p) - room :]
    elif ex.whole_target:
        need = len(t) + (1 if p else 0)
        raise TargetTooLongError(f"a target of {len(t)} tokens (with EOS) does not fit train.seq-len={seq_len} "
                                 f"({ex.target[:60]!r}...): raise train.seq-len to >= {need} or shorten the targets")
    else:
        return (p + t)[:seq_len], ([IGNORE] * len(p) + t)[:seq_len]
    return p + t, [IGNORE] * len(p) + t


def encode_examples(tok, examples: Sequence[Example], seq_len: int) -> list[tuple[list[int], list[int]]]:
    """:func:`encode_example` of each example that keeps a target token within ``seq_len``."""
    out = []
    for ex in examples:
        ids, labels = encode_example(tok, ex, seq_len)
        if any(lab != IGNORE for lab in labels):
            out.append((ids, labels))
    if not out:
        raise ValueError(f"no example keeps a target token within seq_len={seq_len}; raise seq_len")
    return out


def check_targets_fit(tok, examples: Sequence[Example], seq_len: int) -> None:
    """Raise :class:`TargetTooLongError` naming how many ``whole_target`` examples do not fit ``seq_len``
    and the ``train.seq-len`` they need (what a launcher checks before any process starts)."""
    eos = 1 if tok.eos_token_id is not None else 0
    long = [(len(tok(ex.target, add_special_tokens=False)["input_ids"]) + eos + (1 if ex.prompt else 0), ex)
            for ex in examples if ex.whole_target]
    bad = [(n, ex) for n, ex in long if n > seq_len]
    if bad:
        n, ex = max(bad, key=lambda b: b[0])
        raise TargetTooLongError(f"{len(bad)} of {len(examples)} examples have a target that does not fit "
                                 f"train.seq-len={seq_len} even with the prompt cut to one token (longest needs {n}: "
                                 f"{ex.target[:60]!r}); raise train.seq-len to >= {n} or shorten those targets")


def collate(items: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch: ``input_ids``, ``labels`` (-100 on padding), ``attention_mask``; (B, T)."""
    width = max(len(ids) for ids, _ in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, (x, y) in enumerate(items):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def micro_batches(items: list, cfg: TrainConfig, seed: int) -> Iterator[list]:
    """The ``cfg.steps * cfg.grad_accum`` micro-batches of ``cfg.batch_size`` items a client draws:
    passes over a seeded shuffle, a new one whenever fewer than a batch are left."""
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(cfg.steps * cfg.grad_accum):
        if len(order) < cfg.batch_size:
            order += rng.sample(range(len(items)), len(items))
        yield [items[i] for i in order[: cfg.batch_size]]
        del order[: cfg.batch_size]


def make_optimizer(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optimizer`` over parameter ``groups``."""
    return OPTIMIZERS[cfg.optimizer](groups)


def model_device(model: nn.Module) -> torch.device:
    """Where the model's first parameter lives (batches are moved there)."""
    return next(model.parameters()).device


def batch_to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return batch if device.type == "cpu" else {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def pad_id_of(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)


def train_local(
    model: nn.Module,
    groups: list[dict],
    tok,
    examples: Sequence[Example],
    cfg: TrainConfig,
    seed: int,
    after_step=None,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, float]:
    """Run ``cfg.steps`` optimizer steps on shuffled micro-batches of ``examples``.

    ``groups`` are torch optimizer parameter groups (each with its ``lr``); ``after_step(step)``
    runs after every optimizer step (e.g. a flip budget). ``optimizer``, if given, is used instead
    of a fresh one over ``groups`` (a stateful client resumes its moments). Batches go to the
    model's device. Returns mean loss and counts.
    """
    batches = micro_batches(encode_examples(tok, examples, cfg.seq_len), cfg, seed)
    if cfg.return_memory and hasattr(tok, "release"):
        tok.release()  # the round's examples are encoded: a device's tokenizer frees its tables until used again
    opt = optimizer if optimizer is not None else make_optimizer(groups, cfg)
    device = model_device(model)
    if cfg.gradient_checkpointing and getattr(model, "supports_gradient_checkpointing", False):
        # non-reentrant: the frozen base's inputs need no grad for the adapters' gradients to flow
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif getattr(model, "is_activation_checkpointing", False):  # (transformers' name since v5)
        model.activation_checkpointing_disable()
    model.train()
    losses, seen = [], 0
    pad = pad_id_of(tok)
    # one backward a step on CPU AdamW: each parameter steps as soon as its gradient is complete (same
    # numbers, and a device never holds every gradient at once: lower peak memory)
    in_backward = opt.step_in_backward() if cfg.grad_accum == 1 and isinstance(opt, PlainAdamW) else None
    try:
        for step in range(cfg.steps):
            opt.zero_grad(set_to_none=True)
            for _ in range(cfg.grad_accum):
                batch = batch_to(collate(next(batches), pad), device)
                loss = model(**batch).loss
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"training loss is {loss.item()} at step {step}; lower the learning rate")
                (loss / cfg.grad_accum).backward()
                losses.append(float(loss.detach()))
                seen += batch["input_ids"].shape[0]
            if in_backward is None:
                opt.step()
            if cfg.return_memory:
                trim_freed_memory()
            if after_step is not None:
                after_step(step)
    finally:
        for handle in in_backward or ():
            handle.remove()
    model.eval()
    return {"train_loss": sum(losses) / len(losses), "train_examples": float(seen), "steps": float(cfg.steps)}


@torch.no_grad()
def evaluate_loss(model: nn.Module, tok, examples: Sequence[Example], seq_len: int, batch_size: int = 8) -> dict:
    """Token-weighted mean loss over the targets of ``examples`` and its perplexity."""
    items = encode_examples(tok, examples, seq_len)
    model.eval()
    total, tokens = 0.0, 0
    pad = pad_id_of(tok)
    device = model_device(model)
    for i in range(0, len(items), batch_size):
        batch = batch_to(collate(items[i : i + batch_size], pad), device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
        labels = batch["labels"][:, 1:]  # (B, T-1)
        nll = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
        )
        total += float(nll)
        tokens += int((labels != IGNORE).sum())
    loss = total / max(tokens, 1)
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "eval_tokens": float(tokens)}


@torch.no_grad()
def generate(model: nn.Module, tok, prompt: str, max_new_tokens: int = 160) -> str:
    """Greedy continuation of ``prompt``."""
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(model_device(model))  # (1, T)
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
        pad_token_id=pad_id_of(tok),
    )
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

"""A lean LLaMA runtime for client processes: the same computation as transformers' ``LlamaForCausalLM``
(RMSNorm, rotary positions, grouped-query attention through ``scaled_dot_product_attention``, SwiGLU)
in plain torch, with the same module names, so adapters attach to it exactly as to the transformers
model and a trained adapter is interchangeable between the two.

What it saves a device (``model-runtime = "lean"``, the ``edge`` profile):

* **imports**: transformers' modelling stack pulls ``torch.distributed.tensor``, ``torch._dynamo``,
  sympy, scipy and accelerate (~130 MB resident and seconds before the first step); this module
  needs torch alone (the tokenizer still comes from transformers' light tokenization module);
* **the vocabulary projection**: a training forward computes logits only at the positions that have
  a target, in row chunks, through :class:`HeadCrossEntropy`, which keeps neither the ``(tokens,
  vocabulary)`` logits nor their gradient for the backward pass (it recomputes them chunk by chunk);
* **the tied embedding** stays in the GGUF's own Q8_0 blocks (:class:`Q80Embedding`: int8 codes and an
  fp16 step per 32 values, 1.06 bytes a weight) instead of a dequantized fp32 copy (4 bytes); each
  row dequantizes to exactly the fp32 value transformers computes from the same file.

Scope: LLaMA-architecture models with the ``default`` rotary type and no attention / MLP bias (the
embedded SmolLM2 and the test model); evaluation and greedy generation work, without a KV cache.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

IGNORE = -100  # label of a position without a target (transformers' convention)
HEAD_ROWS = 4096  # vocabulary rows dequantized / multiplied at a time by the head
Q8_BLOCK = 32  # values per fp16 step in GGUF's Q8_0


@dataclass(frozen=True)
class LeanConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    pad_token_id: int | None = None
    eos_token_id: int | None = None
    model_type: str = "llama"

    @classmethod
    def from_dict(cls, c: dict) -> LeanConfig:
        """From a transformers ``config.json``; a model this runtime does not compute the same way is refused."""
        rope = c.get("rope_parameters") or {"rope_type": (c.get("rope_scaling") or {}).get("rope_type", "default"),
                                             "rope_theta": c.get("rope_theta", 10000.0)}
        problems = [f"{k}={c.get(k)!r}" for k, ok in (
            ("model_type", c.get("model_type") == "llama"), ("hidden_act", c.get("hidden_act", "silu") == "silu"),
            ("attention_bias", not c.get("attention_bias", False)), ("mlp_bias", not c.get("mlp_bias", False)),
            ("tie_word_embeddings", c.get("tie_word_embeddings", False))) if not ok]
        if rope.get("rope_type", "default") != "default":
            problems.append(f"rope_type={rope.get('rope_type')!r}")
        if problems:
            raise ValueError(f"model-runtime='lean' computes LLaMA models with silu, no biases, tied embeddings and "
                             f"default rotary positions; this model has {', '.join(problems)}: use "
                             "model-runtime='transformers'")
        heads = c["num_attention_heads"]
        eos = c.get("eos_token_id")
        return cls(
            vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
            num_hidden_layers=c["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads, rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", 10000.0)), pad_token_id=c.get("pad_token_id"),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
        )


@dataclass
class LeanOutput:
    """What a forward returns: ``loss`` (with ``labels``) or ``logits`` ``(B, T, V)`` (without)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None


# --------------------------------------------------------------------------------------------------
# The frozen tied embedding / vocabulary projection


class DenseEmbedding(nn.Module):
    """A tied embedding held as one float matrix (a model built in memory, e.g. for tests)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)

    def rows(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        return self.weight[start:stop].to(dtype)


class Q80Embedding(nn.Module):
    """A frozen tied embedding in GGUF's Q8_0 layout: ``codes`` int8 ``(V, H)`` and ``steps`` fp16
    ``(V, H / 32)`` (kept as raw int16 bits, so ``model.to(dtype)`` cannot re-round them); row ``v`` is
    ``codes[v] * steps[v]`` per block of 32, computed in fp32 exactly as the GGUF reader does."""

    def __init__(self, codes: torch.Tensor, steps: torch.Tensor):
        super().__init__()
        if codes.dtype != torch.int8 or codes.dim() != 2 or codes.shape[1] % Q8_BLOCK:
            raise ValueError(f"Q8_0 codes must be int8 (V, H) with H a multiple of {Q8_BLOCK}; got {codes.dtype} "
                             f"{tuple(codes.shape)}")
        if tuple(steps.shape) != (codes.shape[0], codes.shape[1] // Q8_BLOCK):
            raise ValueError(f"Q8_0 steps must be (V, H / {Q8_BLOCK}) = {(codes.shape[0], codes.shape[1] // Q8_BLOCK)}; "
                             f"got {tuple(steps.shape)}")
        self.num_embeddings, self.embedding_dim = codes.shape
        self.register_buffer("codes", codes)
        self.register_buffer("steps", steps.view(torch.int16))

    @classmethod
    def from_weight(cls, weight: torch.Tensor) -> Q80Embedding:
        """Q8_0 quantization of a float matrix (GGUF's rule: step = amax / 127 per block, codes rounded)."""
        blocks = weight.detach().float().reshape(weight.shape[0], -1, Q8_BLOCK)
        step = (blocks.abs().amax(-1) / 127).to(torch.float16)
        inv = torch.where(step.float() > 0, 1.0 / step.float(), torch.zeros(()))
        codes = torch.round(blocks * inv[..., None]).clamp(-127, 127).to(torch.int8).reshape(weight.shape)
        return cls(codes, step)

    def rows(self, start: int, stop: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        c = self.codes[start:stop].reshape(stop - start, -1, Q8_BLOCK).float()  # the one temporary
        return c.mul_(self.steps[start:stop].view(torch.float16).float()[..., None]).reshape(stop - start, -1).to(dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        c = self.codes[flat].reshape(flat.numel(), -1, Q8_BLOCK).float()
        out = c * self.steps[flat].view(torch.float16).float()[..., None]
        return out.reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, Q8_0"


def head_logits(head: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """``h @ Wᵀ`` for the tied head ``head`` (``(..., H)`` -> ``(..., V)``), ``HEAD_ROWS`` vocabulary rows at a time."""
    return torch.cat([h @ head.rows(s, min(s + HEAD_ROWS, head.num_embeddings), h.dtype).T
                      for s in range(0, head.num_embeddings, HEAD_ROWS)], dim=-1)


class HeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``h @ Wᵀ`` against ``labels`` for a frozen head ``W``, ``HEAD_ROWS``
    vocabulary rows at a time both ways: the forward keeps a running log-sum-exp per row (never the
    ``(tokens, vocabulary)`` logits) and saves only ``h`` and that log-sum-exp; the backward
    recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, labels: torch.Tensor, head: nn.Module) -> torch.Tensor:
        hf = h.float()
        lse = torch.full((hf.shape[0],), -math.inf, device=h.device)
        picked = torch.zeros(hf.shape[0], device=h.device)
        for s in range(0, head.num_embeddings, HEAD_ROWS):
            e = min(s + HEAD_ROWS, head.num_embeddings)
            logits = hf @ head.rows(s, e, torch.float32).T  # (N, chunk)
            lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=-1))
            hit = (labels >= s) & (labels < e)
            picked[hit] = logits[hit.nonzero().squeeze(1), labels[hit] - s]
        ctx.save_for_backward(h, labels, lse)
        ctx.head = head
        return (lse - picked).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, labels, lse = ctx.saved_tensors
        head = ctx.head
        hf = h.float()
        grad_h = torch.zeros_like(hf)
        for s in range(0, head.num_embeddings, HEAD_ROWS):
            e = min(s + HEAD_ROWS, head.num_embeddings)
            w = head.rows(s, e, torch.float32)
            p = torch.exp(hf @ w.T - lse[:, None])  # softmax over the vocabulary, this chunk's columns
            hit = (labels >= s) & (labels < e)
            p[hit.nonzero().squeeze(1), labels[hit] - s] -= 1.0
            grad_h += p @ w
        return (grad_h * grad).to(h.dtype), None, None


# --------------------------------------------------------------------------------------------------
# Activation checkpointing


def checkpoint(fn, *args):
    """``fn(*args)`` without keeping what its backward needs: every tensor autograd would save is
    dropped, and the first time the backward asks for one, ``fn(*args)`` runs again (with grad) and
    its saved tensors, in the same order, are handed out one by one (non-reentrant checkpointing, so
    gradients reach parameters inside ``fn`` even when no input needs a gradient). ``fn`` must be
    deterministic (no dropout). ``torch.utils.checkpoint`` does the same but imports torch's compiler
    on its first call (~70 MB and a second in a fresh process)."""
    held: dict[int, torch.Tensor] = {}
    count = [0]

    def pack(_tensor):
        count[0] += 1
        return count[0] - 1  # an index instead of the tensor

    def unpack(index: int) -> torch.Tensor:
        if not held:
            order = []

            def keep(tensor) -> None:
                # detached, and nothing packed into the throw-away graph: a node saving its own output
                # would otherwise hold itself through that tensor, a cycle no collector frees
                order.append(tensor.detach())

            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(keep, lambda _: None):
                fn(*args)
            if len(order) != count[0]:
                raise RuntimeError(f"checkpointed recomputation saved {len(order)} tensors, the forward {count[0]}: "
                                   "the checkpointed function is not deterministic")
            held.update(enumerate(order))
        return held.pop(index)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return fn(*args)


# --------------------------------------------------------------------------------------------------
# The decoder


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, device=device))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: LeanConfig, device=None):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.heads * self.head_dim, bias=False, device=device)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=False, device=device)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=False, device=device)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=False, device=device)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        cos, sin = cos[:, None], sin[:, None]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        rep = self.heads // self.kv_heads
        if rep > 1:
            k = k[:, :, None].expand(b, self.kv_heads, rep, t, self.head_dim).reshape(b, self.heads, t, self.head_dim)
            v = v[:, :, None].expand(b, self.kv_heads, rep, t, self.head_dim).reshape(b, self.heads, t, self.head_dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and t > 1,
                                             scale=self.head_dim**-0.5)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: LeanConfig, device=None):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False, device=device)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False, device=device)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LeanConfig, device=None):
        super().__init__()
        self.self_attn = Attention(cfg, device)
        self.mlp = MLP(cfg, device)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device)

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LeanModel(nn.Module):
    def __init__(self, cfg: LeanConfig, embed_tokens: nn.Module, device=None):
        super().__init__()
        self.embed_tokens = embed_tokens
        self.layers = nn.ModuleList(DecoderLayer(cfg, device) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device)


class LeanLlamaForCausalLM(nn.Module):
    """``LlamaForCausalLM``'s computation with a frozen tied head; module names as transformers'."""

    supports_gradient_checkpointing = True

    def __init__(self, cfg: LeanConfig, embed_tokens: nn.Module, device=None):
        """``device='meta'`` builds the skeleton a loader fills with the real (memory-mapped) tensors."""
        super().__init__()
        self.config = cfg
        self.model = LeanModel(cfg, embed_tokens, device)
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float) / cfg.head_dim))
        self.register_buffer("inv_freq", inv, persistent=False)
        self.is_activation_checkpointing = False

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    # transformers' names, as the training loop calls them
    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None) -> None:
        self.is_activation_checkpointing = True

    def activation_checkpointing_disable(self) -> None:
        self.is_activation_checkpointing = False

    def _mask(self, attention_mask: torch.Tensor | None, t: int) -> torch.Tensor | None:
        if attention_mask is None or bool(attention_mask.all()):
            return None  # causal, no padding: the fused causal path
        causal = torch.ones(t, t, dtype=torch.bool, device=attention_mask.device).tril()
        return causal[None, None] & attention_mask.bool()[:, None, None, :]  # (B, 1, T, T)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        dtype = self.model.norm.weight.dtype
        x = x.to(dtype)
        pos = torch.arange(input_ids.shape[1], device=input_ids.device, dtype=torch.float)
        freqs = pos[None, :, None] * self.inv_freq.to(input_ids.device)[None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        mask = self._mask(attention_mask, input_ids.shape[1])
        ckpt = self.is_activation_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.model.layers:
            x = checkpoint(layer, x, cos, sin, mask) if ckpt else layer(x, cos, sin, mask)
        return self.model.norm(x)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **_unused) -> LeanOutput:
        h = self.hidden_states(input_ids, attention_mask)
        if labels is None:
            return LeanOutput(logits=head_logits(self.model.embed_tokens, h))
        target = labels[:, 1:]  # position t predicts token t + 1
        keep = target != IGNORE
        n = int(keep.sum())
        if n == 0:
            return LeanOutput(loss=torch.full((), math.nan, device=h.device))  # transformers' mean over nothing
        rows = h[:, :-1][keep]
        loss = HeadCrossEntropy.apply(rows, target[keep], self.model.embed_tokens) / n
        return LeanOutput(loss=loss)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 20,
                 do_sample: bool = False, pad_token_id: int | None = None, **_unused) -> torch.Tensor:
        """Greedy decoding until ``max_new_tokens`` or the end-of-sequence token (no KV cache)."""
        if do_sample:
            raise ValueError("the lean runtime decodes greedily only (do_sample=False)")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("the lean runtime generates from unpadded prompts (an all-ones attention_mask); "
                             "generate one prompt at a time")
        ids = input_ids
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        eos = self.config.eos_token_id
        for _ in range(max_new_tokens):
            nxt = head_logits(self.model.embed_tokens, self.hidden_states(ids)[:, -1]).argmax(-1)
            if eos is not None:
                nxt = torch.where(done, torch.full_like(nxt, pad_token_id if pad_token_id is not None else eos), nxt)
                done |= nxt == eos
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            if bool(done.all()):
                break
        return ids


# --------------------------------------------------------------------------------------------------
# The tokenizer


class LeanTokenizer:
    """The model's fast tokenizer through the ``tokenizers`` library alone (transformers' wrapper
    costs ~40 MB and its import): the calls the training loop, scoring and generation make, with the
    ids transformers' ``PreTrainedTokenizerFast`` gives for them (same Rust tokenizer, same file)."""

    def __init__(self, folder: Path):
        self._file = folder / "tokenizer.json"
        self._backend = None
        config = json.loads((folder / "tokenizer_config.json").read_text())
        ids = {k: self._id(config.get(k)) for k in ("pad_token", "eos_token", "bos_token")}
        self.pad_token_id, self.eos_token_id, self.bos_token_id = ids["pad_token"], ids["eos_token"], ids["bos_token"]
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        if self.clean_up_tokenization_spaces:
            raise ValueError(f"{folder}: clean_up_tokenization_spaces=True is not implemented by the lean runtime; "
                             "use model-runtime='transformers'")

    @property
    def backend(self):
        """The ``tokenizers.Tokenizer``, loaded from the file on first use (again after :meth:`release`)."""
        if self._backend is None:
            from tokenizers import Tokenizer

            self._backend = Tokenizer.from_file(str(self._file))
        return self._backend

    def release(self) -> None:
        """Free the vocabulary and merge tables (~27 MB resident for SmolLM2's); the next call loads them
        again (~0.1 s). A device calls it once a round's examples are encoded (``train.return-memory``)."""
        self._backend = None

    def _id(self, token) -> int | None:
        content = token.get("content") if isinstance(token, dict) else token
        return None if content is None else self.backend.token_to_id(content)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __call__(self, text: str, add_special_tokens: bool = True, return_tensors: str | None = None) -> dict:
        if not isinstance(text, str):
            raise TypeError("the lean tokenizer encodes one string at a time")
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if return_tensors == "pt":
            return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
        if return_tensors is not None:
            raise ValueError(f"return_tensors must be None or 'pt'; got {return_tensors!r}")
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)


# --------------------------------------------------------------------------------------------------
# Building one


def from_transformers(model: nn.Module, q8_embedding: bool = False) -> LeanLlamaForCausalLM:
    """The lean model holding ``model``'s own modules (its linear layers, quantized or not, and norms):
    the same weights, no copy."""
    cfg = LeanConfig.from_dict(model.config.to_dict())
    weight = model.model.embed_tokens.weight.detach()
    embed = Q80Embedding.from_weight(weight) if q8_embedding else DenseEmbedding(weight)
    lean = LeanLlamaForCausalLM(cfg, embed, device="meta")
    lean.model.norm = model.model.norm
    for mine, theirs in zip(lean.model.layers, model.model.layers):
        for part in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(mine.self_attn, part, getattr(theirs.self_attn, part))
        for part in ("gate_proj", "up_proj", "down_proj"):
            setattr(mine.mlp, part, getattr(theirs.mlp, part))
        mine.input_layernorm, mine.post_attention_layernorm = theirs.input_layernorm, theirs.post_attention_layernorm
    for attr in ("lordba_base_quant", "lordba_config"):  # what quantization / an attached adapter noted on the model
        if hasattr(model, attr):
            setattr(lean, attr, getattr(model, attr))
    lean.eval()
    return lean


def load_lean(model_dir: Path, base_file: Path, embedding_file: Path | None = None) -> LeanLlamaForCausalLM:
    """The model of ``model_dir/config.json`` with the q4_1 base of ``base_file`` memory-mapped in place, and
    the tied embedding from ``embedding_file`` (Q8_0 codes and steps) where given, else ``base_file``'s fp32 one."""
    from safetensors.torch import load_file

    from lordba_fl.base.quant import Q41Linear

    cfg = LeanConfig.from_dict(json.loads((model_dir / "config.json").read_text()))
    tensors = load_file(str(base_file))  # mmap-backed: pages are read when first touched
    if embedding_file is not None:
        q8 = load_file(str(embedding_file))
        embed: nn.Module = Q80Embedding(q8["codes"], q8["steps"].view(torch.float16))
    else:
        embed = DenseEmbedding(tensors["model.embed_tokens.weight"])
    tensors.pop("model.embed_tokens.weight", None)
    lean = LeanLlamaForCausalLM(cfg, embed, device="meta")
    for name, module in list(lean.named_modules()):
        if isinstance(module, nn.Linear):
            try:
                q = Q41Linear(tensors.pop(f"{name}.qweight"), tensors.pop(f"{name}.q_scale").view(torch.float16),
                              tensors.pop(f"{name}.q_min").view(torch.float16))
            except KeyError:
                raise ValueError(f"{base_file} has no q4_1 tensors for {name}; delete it to rebuild the cache") from None
            parent, _, child = name.rpartition(".")
            setattr(lean.get_submodule(parent), child, q)
    for name, module in lean.named_modules():
        if isinstance(module, RMSNorm):
            key = f"{name}.weight"
            if key not in tensors:
                raise ValueError(f"{base_file} lacks {key}; delete it to rebuild the cache")
            module.weight = nn.Parameter(tensors.pop(key), requires_grad=False)
    left = [n for n in tensors if n != "lm_head.weight"]
    if left:
        raise ValueError(f"{base_file} has tensors the lean model does not: {left[:5]}; use model-runtime='transformers'")
    lean.lordba_base_quant = "q4_1"
    lean.eval()
    return lean

"""Packed on-device storage of LoRDBA adapters, and exact interop with PEFT LoRA.

File format (``format_version`` 1): one safetensors file with one 1-D tensor per kind, each the
concatenation over the adapted modules in the order of the ``modules`` table:

- ``sign_A``: uint8, each module's carrier ``S1`` (r, in) bit-packed row-wise (see :mod:`lordba_fl.adapter.packing`),
  ``r * ceil(in / 8)`` bytes a module;
- ``sign_B``: uint8, each ``S2`` (out, r) packed the same way, ``out * ceil(r / 8)`` bytes a module;
- ``scale_in`` / ``scale_mid`` / ``scale_out``: fp16 (or fp32) channel scales, those configured;

and string metadata: ``format``, ``format_version``, ``config`` (the :class:`LoRDBAConfig` as JSON),
``modules`` (``[[name, in, out], ...]``), ``base_fingerprint``, ``base_quant`` and ``scale_dtype``.
One tensor per kind instead of five per layer keeps the header a few kB (a per-layer layout spent
~10% of an r = 16 file on header).
Loading validates the whole file against the model before it changes anything.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from lordba_fl.adapter.config import LoRDBAConfig
from lordba_fl.adapter.fit import svd_init_
from lordba_fl.adapter.layer import attach_lordba_, find_targets, lordba_layers
from lordba_fl.adapter.packing import pack_signs, packed_row_bytes, unpack_signs
from lordba_fl.base.quant import peft_custom_modules
from lordba_fl.errors import CodecError

FORMAT = "lordba"
FORMAT_VERSION = 1
PEFT_PREFIX = "base_model.model."
_SCALE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


class LoRDBAFileError(ValueError):
    """An adapter file is unreadable, foreign, for another base, or does not fit the model."""


def base_fingerprint(model: nn.Module) -> str:
    """A short hash identifying the pretrained base, independent of its quantization and compute dtype.

    It hashes the architecture (model type, sizes) and a strided sample of the input-embedding table,
    which no backend quantizes, rounded to bfloat16 so fp32 and bf16 copies of a model agree.
    """
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size"):
            h.update(f"{key}={getattr(config, key, None)};".encode())
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        w = emb.weight.detach()
        step = max(1, w.shape[0] // 64)
        sample = w[::step][:64, :64]  # (<=64, <=64)
        shape = tuple(w.shape)
    elif emb is not None and hasattr(emb, "rows"):  # an embedding kept quantized: its rows, dequantized
        shape = (emb.num_embeddings, emb.embedding_dim)
        step = max(1, shape[0] // 64)
        with torch.no_grad():
            sample = emb(torch.arange(0, shape[0], step)[:64])[:, :64]
    if emb is not None and (getattr(emb, "weight", None) is not None or hasattr(emb, "rows")):
        h.update(str(shape).encode())
        h.update(sample.to(torch.bfloat16).float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Packed save / load


def _section_sizes(cfg: LoRDBAConfig, modules: dict[str, list[int]]) -> dict[str, list[int]]:
    """Per-module element counts of each consolidated tensor, in module order."""
    r = cfg.rank
    sizes = {"sign_A": [], "sign_B": []} | {f"scale_{s}": [] for s in cfg.scales}
    for n_in, n_out in modules.values():
        sizes["sign_A"].append(r * packed_row_bytes(n_in))
        sizes["sign_B"].append(n_out * packed_row_bytes(r))
        dims = {"in": n_in, "mid": r, "out": n_out}
        for s in cfg.scales:
            sizes[f"scale_{s}"].append(dims[s])
    return sizes


def save_lordba(model: nn.Module, path: str | os.PathLike, scale_dtype: str = "float16") -> int:
    """Write the model's LoRDBA adapter to a packed safetensors file; returns the file size in bytes.

    All layers go into a handful of 1-D tensors (one per kind), so the file header stays small next to
    the packed signs. The file is written to a temporary name and renamed, so a crash never leaves a
    partial file.
    """
    from safetensors.torch import save_file

    layers = lordba_layers(model)
    if not layers:
        raise ValueError("model has no LoRDBA adapter: call attach_lordba_(model, cfg) first")
    if scale_dtype not in _SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be one of {sorted(_SCALE_DTYPES)}; got {scale_dtype!r}")
    cfg: LoRDBAConfig = model.lordba_config
    parts: dict[str, list[torch.Tensor]] = {"sign_A": [], "sign_B": []} | {f"scale_{s}": [] for s in cfg.scales}
    modules = {}
    for name, layer in layers.items():
        modules[name] = [layer.in_features, layer.out_features]
        parts["sign_A"].append(pack_signs(layer.lordba_latent_A.detach()).flatten())  # r * ceil(in/8) bytes
        parts["sign_B"].append(pack_signs(layer.lordba_latent_B.detach()).flatten())  # out * ceil(r/8) bytes
        for s in cfg.scales:
            parts[f"scale_{s}"].append(layer.scale(s).detach().to(_SCALE_DTYPES[scale_dtype]))
    tensors = {k: torch.cat(v).cpu().contiguous() for k, v in parts.items()}
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(cfg.to_dict()),
        "modules": json.dumps([[n, i, o] for n, (i, o) in modules.items()]),
        "base_fingerprint": base_fingerprint(model),
        "base_quant": str(getattr(model, "lordba_base_quant", "none")),
        "scale_dtype": scale_dtype,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path.stat().st_size


def _read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load

    if not path.is_file():
        raise FileNotFoundError(f"no LoRDBA adapter file at {path}; write one with save_lordba(model, path)")
    data = path.read_bytes()
    try:
        tensors = load(data)  # checks the header and that every tensor lies inside the file
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types, and OSError/ValueError on garbage
        raise LoRDBAFileError(
            f"{path} is not a readable safetensors file (truncated, corrupted or foreign: {e}); re-export it with "
            f"save_lordba"
        ) from e
    return tensors, metadata


def _parse_metadata(path: Path, metadata: dict[str, str]) -> tuple[LoRDBAConfig, dict[str, list[int]], str]:
    if metadata.get("format") != FORMAT:
        raise LoRDBAFileError(f"{path} is not a LoRDBA adapter (format={metadata.get('format')!r}); for a PEFT "
                              f"LoRA adapter use lordba_from_peft_lora")
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise LoRDBAFileError(
            f"{path} has format_version {metadata.get('format_version')!r}; this lordba-fl reads version "
            f"{FORMAT_VERSION}: upgrade lordba-fl or re-export the adapter"
        )
    scale_dtype = metadata.get("scale_dtype")
    if scale_dtype not in _SCALE_DTYPES:
        raise LoRDBAFileError(f"{path}: unknown scale_dtype {scale_dtype!r}")
    try:
        cfg = LoRDBAConfig.from_dict(json.loads(metadata["config"]))
        modules = {str(n): [int(i), int(o)] for n, i, o in json.loads(metadata["modules"])}
        if not modules or any(i <= 0 or o <= 0 for i, o in modules.values()):
            raise ValueError("empty module table or non-positive dimensions")
    except (KeyError, ValueError, TypeError, IndexError) as e:
        raise LoRDBAFileError(f"{path}: malformed metadata ({e}); re-export the adapter with save_lordba") from e
    return cfg, modules, scale_dtype


def load_lordba_(model: nn.Module, path: str | os.PathLike, *, check_base: bool = True) -> LoRDBAConfig:
    """Load a packed LoRDBA adapter into ``model``, in place; attaches the adapter if the model has none.

    Everything is validated first (format, version, base fingerprint, module names and shapes, section
    sizes, padding bits, finite scales); on any error a :class:`LoRDBAFileError` is raised and the model
    is untouched. Latents are rebuilt as ``init_std * S`` (the file stores signs, not latent magnitudes).
    """
    path = Path(path)
    tensors, metadata = _read_file(path)
    cfg, modules, scale_dtype = _parse_metadata(path, metadata)
    if check_base:
        fp = base_fingerprint(model)
        if metadata.get("base_fingerprint") != fp:
            raise LoRDBAFileError(
                f"{path} was trained on another base model (fingerprint {metadata.get('base_fingerprint')} != "
                f"{fp}); load it onto the base it was trained on, or pass check_base=False if you know better"
            )
    attached = lordba_layers(model)
    if attached:
        have = model.lordba_config
        for key in ("rank", "scales"):
            if getattr(have, key) != getattr(cfg, key):
                raise LoRDBAFileError(
                    f"{path} has {key}={getattr(cfg, key)!r} but the model's adapter has {getattr(have, key)!r}; "
                    f"load it into a model without an adapter"
                )
        if set(attached) != set(modules):
            raise LoRDBAFileError(f"{path} adapts other modules than the model's adapter; load it into a fresh base")
    for name, (n_in, n_out) in modules.items():
        try:
            base = attached[name] if attached else model.get_submodule(name)
        except AttributeError:
            raise LoRDBAFileError(f"{path} adapts module {name!r}, which this model does not have") from None
        if (getattr(base, "in_features", None), getattr(base, "out_features", None)) != (n_in, n_out):
            raise LoRDBAFileError(
                f"{path}: module {name!r} is (in={n_in}, out={n_out}) in the file but "
                f"(in={getattr(base, 'in_features', None)}, out={getattr(base, 'out_features', None)}) in the model"
            )
    if not attached:
        try:
            would_attach = set(find_targets(model, cfg))
        except (TypeError, ValueError) as e:
            raise LoRDBAFileError(f"{path}: its target_modules do not fit this model ({e})") from e
        if would_attach != set(modules):
            raise LoRDBAFileError(
                f"{path} adapts {len(modules)} modules but its target_modules match {len(would_attach)} in this model; "
                f"load it onto the base it was trained on"
            )
    decoded = _decode(path, tensors, cfg, modules, scale_dtype)

    if not attached:
        attach_lordba_(model, replace(cfg, init="scratch"))  # the values come from the file below
        model.lordba_config = cfg
        attached = lordba_layers(model)
    with torch.no_grad():
        for name, parts in decoded.items():
            layer = attached[name]
            layer.lordba_latent_A.copy_(parts["sign_A"] * cfg.init_std)
            layer.lordba_latent_B.copy_(parts["sign_B"] * cfg.init_std)
            for s in cfg.scales:
                layer.scale(s).copy_(parts[f"scale_{s}"])
    return cfg


def _decode(path, tensors, cfg, modules, scale_dtype) -> dict[str, dict[str, torch.Tensor]]:
    sizes = _section_sizes(cfg, modules)
    extra = sorted(set(tensors) - set(sizes))
    if extra:
        raise LoRDBAFileError(f"{path} holds unexpected tensors {extra[:3]}; the file is not a clean export")
    for key, counts in sizes.items():
        t = tensors.get(key)
        dtype = torch.uint8 if key.startswith("sign_") else _SCALE_DTYPES[scale_dtype]
        if t is None:
            raise LoRDBAFileError(f"{path} lacks tensor {key!r}; the file is truncated or not a full export")
        if t.dim() != 1 or t.numel() != sum(counts) or t.dtype != dtype:
            raise LoRDBAFileError(
                f"{path}: tensor {key!r} is {t.dtype} {tuple(t.shape)}, expected {dtype} ({sum(counts)},) for rank "
                f"{cfg.rank} over the {len(modules)} modules listed in the file"
            )
        if not key.startswith("sign_") and not bool(torch.isfinite(t).all()):
            raise LoRDBAFileError(f"{path}: {key} holds NaN or Inf; the adapter diverged or the file is corrupt")
    out: dict[str, dict[str, torch.Tensor]] = {}
    split = {k: torch.split(tensors[k], c) for k, c in sizes.items()}
    for idx, (name, (n_in, n_out)) in enumerate(modules.items()):
        rows_cols = {"sign_A": (cfg.rank, n_in), "sign_B": (n_out, cfg.rank)}
        parts = {}
        for key, chunks in split.items():
            chunk = chunks[idx]
            if key in rows_cols:
                rows, cols = rows_cols[key]
                try:
                    parts[key] = unpack_signs(chunk.reshape(rows, packed_row_bytes(cols)), cols)
                except CodecError as e:
                    raise LoRDBAFileError(f"{path}: {key} of {name}: {e}") from e
            else:
                parts[key] = chunk.float()
        out[name] = parts
    return out


# --------------------------------------------------------------------------------------------------
# PEFT LoRA interop


def export_peft_lora(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write the adapter as a standard PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``).

    The export is exact: ``lora_A = S1 diag(s_in)``, ``lora_B = diag(s_out) S2 diag(s_mid)``, with the same
    rank and alpha, so ``PeftModel.from_pretrained`` reproduces the LoRDBA model's logits.
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    layers = lordba_layers(model)
    if not layers:
        raise ValueError("model has no LoRDBA adapter: call attach_lordba_(model, cfg) first")
    cfg: LoRDBAConfig = model.lordba_config
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, layer in layers.items():
        a, b = layer.lora_factors()
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.to(dtype).cpu().contiguous()  # (r, in)
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.to(dtype).cpu().contiguous()  # (out, r)
    name_or_path = base_model_name_or_path or getattr(getattr(model, "config", None), "_name_or_path", None)
    lora_cfg = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        target_modules=sorted(layers),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=name_or_path or None,
    )
    lora_cfg.save_pretrained(str(directory))
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    return directory


def lordba_from_peft_lora(
    model: nn.Module, directory: str | os.PathLike, cfg: LoRDBAConfig | None = None
) -> dict[str, float]:
    """Attach a LoRDBA adapter fitted to a PEFT LoRA adapter (post-training quantization via ``svd`` init).

    Parameters
    ----------
    model : nn.Module
        The base model the LoRA adapter was trained on, without an adapter.
    directory : path
        A PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).
    cfg : LoRDBAConfig, optional
        STE, scale set and, if given, the rank and alpha to fit; by default the LoRA's own.

    Returns
    -------
    dict
        The relative Frobenius reconstruction error ``||dW - dW_lordba|| / ||dW||`` of every layer.
    """
    deltas, r, lora_alpha = read_peft_lora_deltas(directory)
    base = cfg.to_dict() if cfg is not None else {"rank": r, "alpha": lora_alpha}
    base.update(target_modules=sorted(deltas), init="svd")
    return attach_lordba_(model, LoRDBAConfig.from_dict(base), delta_weights=deltas)


MAX_DELTA_ELEMENTS = 2**28  # one layer's (out, in): 1 GiB in fp32, past any model this library adapts on a device


def read_peft_lora_deltas(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], int, float]:
    """``({module_name: dW (out, in)}, r, lora_alpha)`` of a PEFT LoRA adapter directory."""
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg_path, weights_path = directory / "adapter_config.json", directory / "adapter_model.safetensors"
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} is missing: {directory} must be a PEFT adapter saved with save_pretrained")
    lora = json.loads(cfg_path.read_text())
    if lora.get("peft_type") != "LORA":
        raise LoRDBAFileError(f"{cfg_path} is a {lora.get('peft_type')!r} adapter; only PEFT LoRA can be converted")
    try:
        r, lora_alpha = int(lora["r"]), float(lora["lora_alpha"])
    except (KeyError, TypeError, ValueError) as e:
        raise LoRDBAFileError(f"{cfg_path} lacks a whole 'r' and a numeric 'lora_alpha' ({e})") from None
    if r < 1 or not math.isfinite(lora_alpha) or lora_alpha == 0:
        raise LoRDBAFileError(f"{cfg_path} has r = {r} and lora_alpha = {lora_alpha}; a LoRA has r >= 1 and a finite, "
                              "nonzero alpha")
    lora_scaling = lora_alpha / (math.sqrt(r) if lora.get("use_rslora") else r)
    try:
        weights = load_file(str(weights_path))
    except Exception as e:
        raise LoRDBAFileError(f"{weights_path} is not a readable safetensors file ({e})") from e
    deltas = {}
    for key, a in weights.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key[len(PEFT_PREFIX):-len(".lora_A.weight")] if key.startswith(PEFT_PREFIX) else key[:-14]
        b = weights.get(key.replace(".lora_A.weight", ".lora_B.weight"))
        if b is None:
            raise LoRDBAFileError(f"{weights_path} has {key} but no matching lora_B")
        # shapes before the product: a small file must not ask for a huge (out, in) matrix
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise LoRDBAFileError(f"{weights_path}: {name} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                                  f"the config's rank {r} needs ({r}, in) and (out, {r})")
        if b.shape[0] * a.shape[1] > MAX_DELTA_ELEMENTS:
            raise LoRDBAFileError(f"{weights_path}: {name}'s update would be {b.shape[0]} x {a.shape[1]}, past the "
                                  f"{MAX_DELTA_ELEMENTS} weights of any layer lordba-fl adapts")
        deltas[name] = (b.float() @ a.float()) * lora_scaling  # (out, r) @ (r, in) -> (out, in)
    if not deltas:
        raise LoRDBAFileError(f"{weights_path} holds no lora_A/lora_B weights")
    return deltas, r, lora_alpha


def init_from_(model: nn.Module, path: str | os.PathLike) -> dict[str, float]:
    """Set the adapter already attached to ``model`` from an existing adapter, in place.

    ``path`` is a packed LoRDBA file (:func:`save_lordba`; base fingerprint, rank, scale set and
    modules must match) or a PEFT LoRA directory, whose dense updates are fitted into the attached
    adapter with the ``svd`` init (any LoRA rank; the modules must be the adapter's). Everything is
    checked before anything is written. Returns the relative fit error per layer (empty for a
    packed file, which loads exactly).
    """
    path = Path(path)
    layers = lordba_layers(model)
    if not layers:
        raise ValueError("init_from_ needs a model with a LoRDBA adapter attached (attach_lordba_ first)")
    if path.is_dir():
        deltas, _, _ = read_peft_lora_deltas(path)
        if set(deltas) != set(layers):
            missing, extra = sorted(set(layers) - set(deltas)), sorted(set(deltas) - set(layers))
            raise LoRDBAFileError(
                f"{path}: the LoRA adapts other modules than this run's adapter (missing {missing[:3]}, extra "
                f"{extra[:3]}); train it with the same target modules, or start from scratch (init.from='')")
        for name, layer in layers.items():
            if tuple(deltas[name].shape) != (layer.out_features, layer.in_features):
                raise LoRDBAFileError(f"{path}: {name} is {tuple(deltas[name].shape)} in the LoRA but "
                                      f"{(layer.out_features, layer.in_features)} in this model: another base model")
        return {name: svd_init_(layer, deltas[name]) for name, layer in layers.items()}
    if path.is_file():
        load_lordba_(model, path)
        return {}
    raise FileNotFoundError(f"init.from={str(path)!r} does not exist: give a packed LoRDBA .safetensors file "
                            "(save_lordba) or a PEFT LoRA directory (save_pretrained)")


def peft_lora_config(directory: str | os.PathLike | None = None, **kwargs):
    """A PEFT ``LoraConfig`` that also wraps the base layers of every registered quantization backend
    PEFT does not know natively (:class:`~lordba_fl.base.quant.Q41Linear`).

    PEFT knows ``nn.Linear`` and bitsandbytes layers natively; for a ``q4_1`` base pass this config to
    ``PeftModel.from_pretrained(model, directory, config=peft_lora_config(directory))`` or to
    ``get_peft_model``. With ``directory``, the config is read from its ``adapter_config.json``;
    otherwise it is built from ``kwargs``.
    """
    from peft import LoraConfig

    cfg = LoraConfig.from_pretrained(str(directory)) if directory is not None else LoraConfig(**kwargs)
    cfg._register_custom_module(peft_custom_modules())  # PEFT's documented hook for custom layer types
    return cfg


@torch.no_grad()
def merge_dense_(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every LoRDBA layer by a plain ``nn.Linear`` holding its base weight plus its update
    (``W + dW``), and every other quantized linear by its dequantized ``nn.Linear``, in place: a model
    that ``save_pretrained`` writes and plain transformers loads, computing what the adapted model does."""
    from lordba_fl.adapter.layer import effective_weight
    from lordba_fl.base.quant import quantized_types

    def dense(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
        out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="cpu", dtype=dtype)
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
        return out

    replace_: dict[str, nn.Module] = {}
    for name, layer in lordba_layers(model).items():
        base = layer.base_layer
        replace_[name] = dense(effective_weight(base) + layer.delta_weight().float().cpu(), getattr(base, "bias", None))
    qtypes = quantized_types()
    for name, module in model.named_modules():
        if isinstance(module, qtypes) and not any(name == n or name.startswith(n + ".") for n in replace_):
            replace_[name] = dense(effective_weight(module), getattr(module, "bias", None))
    for name, new in replace_.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return model

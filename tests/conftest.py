import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch


def tiny_llama(seed: int = 0, hidden: int = 64, inter: int = 96, vocab: int = 128):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_qwen2(seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return Qwen2ForCausalLM(cfg).eval()  # q/k/v projections carry a bias


BUILDERS = {"llama": tiny_llama, "qwen2": tiny_qwen2}


@pytest.fixture(params=sorted(BUILDERS))
def arch(request):
    return request.param


@pytest.fixture
def ids():
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def randomize_adapter_(model, seed: int = 0):
    """Give every adapter random latents and non-trivial scales (so logits actually change)."""
    from lordba_fl import lordba_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lordba_layers(model).values():
            layer.lordba_latent_A.copy_(torch.randn(layer.lordba_latent_A.shape, generator=g))
            layer.lordba_latent_B.copy_(torch.randn(layer.lordba_latent_B.shape, generator=g))
            for s in layer.scale_names:
                p = layer.scale(s)
                p.copy_((0.5 + torch.rand(p.shape, generator=g)) * 0.05)

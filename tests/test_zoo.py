"""Models nobody here wrote, from the package index, trained through the Trainer under zero1/2/3 against
Lightning's ``ddp`` in the same precision, 2 ranks, same seed and data.

transformers GPT-2 (tied embeddings, SDPA attention), Llama (rotary fp32 buffers, RMSNorm, grouped-query
attention) with and without HF gradient checkpointing, a transformers ResNet (BatchNorm CNN), litgpt's GPT
(Llama-style: RMSNorm, LLaMAMLP), Lightning's own demo ``torch.nn.Transformer`` (an fp32 positional-encoding
buffer: the case that crashed bf16-mixed), and a peft LoRA model (frozen base, adapters trained).

Tolerance: per tensor after 3 AdamW steps, ``|zero - ddp| / |ddp| <= 1e-5`` in both precisions, and the
losses of every step within 1e-5 relative. The runs are in fact bit for bit equal: under ``bf16-mixed``
ZeRO stores in bf16 only the matrices autocast casts to bf16 under ``ddp`` too (see [Note: fp32 norms,
vectors and embeddings under mixed precision] in ``lightning_zero/sharding/layout.py``). Also printed: the
whole-model gap as a share of how far training moved the weights, ``|zero - ddp| / |ddp - init|``.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_zero import ZeroStrategy
from tests.lit_helpers import SettledDDPStrategy, trainer

# transformers, peft and litgpt live in tests/.zoo (see the README's test command and pyproject's test
# extra): on sys.path only in the processes that build zoo models, after lightning is imported.
ZOO_PATH = Path(__file__).resolve().parent / ".zoo"
if not all((ZOO_PATH / package).is_dir() for package in ("transformers", "peft", "litgpt")):
    pytest.skip(f"the model zoo is not installed in {ZOO_PATH}: run the README's test command",
                allow_module_level=True)


def _use_zoo() -> None:
    if str(ZOO_PATH) not in sys.path:
        sys.path.append(str(ZOO_PATH))

VOCAB, SEQ, BATCH, STEPS = 128, 16, 2, 3
BOUND = 1e-5


# ---------------------------------------------------------------------------------------------- models
def _gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def _llama_config() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)


def _llama() -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(_llama_config())


def _llama_checkpointed() -> torch.nn.Module:
    model = _llama()
    model.gradient_checkpointing_enable()
    return model


def _lora() -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(_llama(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                               target_modules=["q_proj", "v_proj"]))


def _litgpt() -> torch.nn.Module:
    from litgpt import GPT, Config

    return GPT(Config(n_layer=2, n_head=4, n_embd=64, block_size=SEQ, vocab_size=VOCAB, padded_vocab_size=VOCAB,
                      n_query_groups=2, norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP", intermediate_size=128,
                      bias=False, rotary_percentage=1.0, parallel_residual=False))


def _demo_transformer() -> torch.nn.Module:
    from lightning.pytorch.demos.transformer import Transformer

    return Transformer(vocab_size=VOCAB, ninp=32, nhead=2, nhid=64, nlayers=2, dropout=0.0)


def _resnet() -> torch.nn.Module:
    from transformers import ResNetConfig, ResNetForImageClassification

    return ResNetForImageClassification(ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16],
                                                     depths=[1, 1], num_labels=4))


class NormsMeetFp32(torch.nn.Module):
    """Not a zoo model: every norm torch ships, SDPA and a TransformerEncoderLayer, each fed activations made
    fp32 by an fp32 buffer (what crashed ``bf16-mixed`` on the CPU with 16-bit norm weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, 32)
        self.register_buffer("position", torch.randn(SEQ, 32))
        self.norms = torch.nn.ModuleList([torch.nn.LayerNorm(32), torch.nn.RMSNorm(32)])
        self.channel_norms = torch.nn.ModuleList([torch.nn.GroupNorm(4, 32), torch.nn.BatchNorm1d(32),
                                                  torch.nn.InstanceNorm1d(32, affine=True)])
        self.qkv = torch.nn.Linear(32, 96)
        self.layer = torch.nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
        self.head = torch.nn.Linear(32, VOCAB)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> Any:
        x = self.embed(input_ids) + self.position  # fp32: the buffer
        for norm in self.norms:
            x = x + norm(x + self.position)
        for norm in self.channel_norms:
            x = x + norm((x + self.position).transpose(1, 2)).transpose(1, 2)
        q, k, v = self.qkv(x).view(*x.shape[:2], 3, 2, 16).unbind(2)
        attended = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True)
        x = self.layer(x + attended.transpose(1, 2).reshape_as(x) + self.position)
        logits = self.head(x)
        # An output object stage 3 cannot look into (the loss is a class attribute): the unit stays gathered.
        return type("Out", (), {"loss": F.cross_entropy(logits.flatten(0, 1), labels.flatten())})


ZOO = {"gpt2": _gpt2, "llama": _llama, "llama_checkpointed": _llama_checkpointed, "lora": _lora,
       "litgpt": _litgpt, "demo_transformer": _demo_transformer, "resnet": _resnet}


def _loss(name: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if name == "resnet":
        return model(pixel_values=x, labels=y).loss
    if name == "demo_transformer":
        return F.nll_loss(model(x, y), y.reshape(-1))
    if name == "litgpt":
        return F.cross_entropy(model(x)[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))
    return model(input_ids=x, labels=x).loss


class Batches(Dataset):
    """Step ``i``'s batch for this rank, made from a seed, so every strategy sees the same data."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __len__(self) -> int:
        return STEPS

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(1000 * step + dist.get_rank())
        if self.name == "resnet":
            return torch.randn(BATCH, 3, 16, 16, generator=gen), torch.randint(4, (BATCH,), generator=gen)
        tokens = torch.randint(VOCAB, (BATCH, SEQ), generator=gen)
        return tokens, torch.roll(tokens, -1, dims=1)


class ZooModule(pl.LightningModule):
    def __init__(self, name: str) -> None:
        super().__init__()
        _use_zoo()
        torch.manual_seed(0)
        self.name = name
        self.model = {**ZOO, "norms": NormsMeetFp32}[name]()
        self.losses: list[float] = []
        self.trained_in: set[str] = set()  # dtypes of the trainable parameters the forward computed with

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = _loss(self.name, self.model, *batch)
        self.losses.append(float(loss.detach()))
        self.trained_in |= {str(p.dtype) for p in self.model.parameters() if p.requires_grad}
        return loss

    def configure_optimizers(self) -> Any:
        trainable = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(trainable, lr=3e-3, weight_decay=0.01)


def fit_zoo(name: str, kind: str, precision: str) -> dict[str, Any] | None:
    """Train ``name`` for ``STEPS`` steps under ``kind`` ("ddp" or "zeroN"); rank 0 returns what it ends with."""
    strategy: Any = SettledDDPStrategy() if kind == "ddp" else ZeroStrategy(stage=int(kind[-1]))
    module = ZooModule(name)
    initial = {k: v.detach().float().clone() for k, v in module.model.state_dict().items()}
    trainer(strategy, max_steps=STEPS, precision=precision).fit(
        module, DataLoader(Batches(name), batch_size=None, shuffle=False))
    if dist.get_rank() != 0:
        return None
    final = {k: v.detach().float().clone() for k, v in module.model.state_dict().items()}
    dtypes = {str(v.dtype) for v in module.model.state_dict().values()}
    return {"initial": initial, "final": final, "losses": module.losses, "dtypes": dtypes,
            "trained_in": module.trained_in}


def _differences(got: dict[str, Any], want: dict[str, Any]) -> tuple[dict[str, float], float]:
    """Per tensor ``|zero - ddp| / |ddp|``, and over the whole model ``|zero - ddp| / |ddp - init|``: the
    gap as a share of how far training moved the weights."""
    per_tensor, gap, moved = {}, 0.0, 0.0
    for key, ref in want["final"].items():
        if not ref.is_floating_point():
            continue
        diff = (got["final"][key] - ref).norm().item()
        per_tensor[key] = diff / max(ref.norm().item(), 1e-12)
        gap += diff**2
        moved += (ref - want["initial"][key]).norm().item() ** 2
    return per_tensor, math.sqrt(gap / moved)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("name", [*ZOO, "norms"])
def test_zoo_model_trains_as_under_ddp(pools, name: str, precision: str) -> None:
    pool = pools(2)
    reference = pool.run(fit_zoo, name, "ddp", precision)[0]
    assert reference is not None
    moved = max((reference["final"][k] - v).norm().item() for k, v in reference["initial"].items())
    assert moved > 0, "the reference did not train: the comparison would be empty"
    worst: dict[str, str] = {}
    for kind in ("zero1", "zero2", "zero3"):
        got = pool.run(fit_zoo, name, kind, precision)[0]
        assert got is not None
        assert got["final"].keys() == reference["final"].keys()
        assert got["dtypes"] == reference["dtypes"], (kind, got["dtypes"], reference["dtypes"])
        # ZeRO kept its 16-bit storage (ddp trains fp32 parameters under autocast).
        assert reference["trained_in"] == {"torch.float32"}
        if precision == "32-true":
            assert got["trained_in"] == {"torch.float32"}
        else:
            assert "torch.bfloat16" in got["trained_in"] <= {"torch.bfloat16", "torch.float32"}, got["trained_in"]
        per_tensor, of_update = _differences(got, reference)
        key = max(per_tensor, key=per_tensor.__getitem__)
        loss_gap = max(abs(a - b) / abs(b) for a, b in zip(got["losses"], reference["losses"]))
        worst[kind] = f"tensor {per_tensor[key]:.1e} ({key}), of update {of_update:.1e}, loss {loss_gap:.1e}"
        assert all(math.isfinite(v) for v in got["losses"])
        assert per_tensor[key] <= BOUND and of_update <= BOUND, (kind, worst[kind])
        assert loss_gap <= BOUND, (kind, got["losses"], reference["losses"])
    print(f"{name} {precision}: {worst}")

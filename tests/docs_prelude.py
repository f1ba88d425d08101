"""What every snippet of the README and docs/ may take as given, prepended to each one by
``tests/test_docs.py``: ``MyModel`` (a small LightningModule with its own data, also ``LitModel``),
``dataset()``, and for the bare-engine snippet ``build_model()``, ``loader`` and ``loss_fn``."""

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def dataset(rows: int = 64, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 8, generator=generator)
    return TensorDataset(x, x.sum(1, keepdim=True).tanh())


class MyModel(LightningModule):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(8, width), nn.LayerNorm(width), nn.Tanh(), nn.Linear(width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x), y), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(dataset(64), batch_size=8)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(dataset(16, seed=1), batch_size=8)


LitModel = MyModel


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))


loader = [[(x[i : i + 4], y[i : i + 4]) for i in (0, 4)] for x, y in DataLoader(dataset(32), batch_size=8)]
loss_fn = F.mse_loss

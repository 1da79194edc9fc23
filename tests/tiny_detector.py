"""A tiny Co-DETR over any backbone, trained a few steps on a fixed random batch (CPU, seconds)."""
import torch

from codetr.model.builder import build_criterion, build_model
from codetr.spec import load_spec

TINY_HEAD = [
    "model.hidden_dim=32", "model.nheads=2", "model.enc_layers=1", "model.dec_layers=1",
    "model.dim_feedforward=64", "model.num_queries=10", "model.num_select=10", "model.dn_number=2",
    "model.num_co_heads=1", "model.co_head_num_convs=1", "model.num_feature_levels=3",
    "model.return_interm_indices=[1,2,3]", "dataset.augmentation.scales=[64]",
]


def fixed_batch(height: int = 64, width: int = 96):
    """Two images (the second padded on the right by 16 px), three boxes, cxcywh normalised."""
    images = torch.randn(2, 3, height, width)
    masks = torch.zeros(2, height, width, dtype=torch.bool)
    masks[1, :, width - 16:] = True
    targets = [{"boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.4]]),
                "labels": torch.tensor([0, 2]), "size": torch.tensor([height, width])},
               {"boxes": torch.tensor([[0.5, 0.5, 0.4, 0.5]]), "labels": torch.tensor([1]),
                "size": torch.tensor([height, width - 16])}]
    for t in targets:
        t["orig_size"] = t["size"].clone()
    return images, masks, targets


def train_losses(overrides: list[str], steps: int = 8, lr: float = 2e-4) -> list[float]:
    """Losses of ``steps`` AdamW steps of the tiny Co-DETR of ``TINY_HEAD + overrides``."""
    torch.manual_seed(0)
    spec = load_spec(None, TINY_HEAD + list(overrides))
    model = build_model(spec, num_classes=3).train()
    criterion = build_criterion(spec, num_classes=3)
    images, masks, targets = fixed_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = sum(criterion(model(images, masks, targets), targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def loss_fell(losses: list[float], window: int = 3) -> bool:
    """The mean of the last ``window`` losses is below that of the first ``window``."""
    return sum(losses[-window:]) / window < sum(losses[:window]) / window

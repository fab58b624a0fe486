"""Augmented full fine-tuning: ``zoo.finetune(..., augment="standard")`` against a hand loop.

zoo's ``standard`` preset (``zoo/augment.py``) is RandomResizedCrop (area 8-100 %) +
horizontal flip + TrivialAugmentWide, run batched on tensors with per-image draws
(``zoo/augment_ops.py``). The reference is the loop a competent user writes on CPU: the
same three ``torchvision.transforms.v2`` transforms in a ``v2.Compose`` applied image by
image (uint8, as torchvision recommends) in a ``Dataset`` read by a ``DataLoader`` with
``num_workers=0`` (on 2 cores a worker process would take a core from the training step),
then normalised per batch; AdamW (no decay on norms and biases, as zoo and timm do), cosine
schedule stepped per batch, cross-entropy, same model, base weights, data, epochs, batch size.

Both loops run ``repeats`` times, interleaved (hand, zoo, hand, zoo, ...), so background load
on a shared machine falls on both; the ratio is zoo's training img/s over the hand loop's
(time of the epochs, set-up excluded), per pair and as the median of the pairs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from bench import loops
from bench.common import (
    CASES,
    LocalBase,
    accuracy,
    dataset,
    loadavg,
    local_base,
    median,
    normalizer,
    table,
)
from bench.training import Cell, LoopResult, run_zoo

TARGET = 0.9


@dataclass(frozen=True)
class AugCell:
    """One augmented full fine-tune comparison: model, training images, epochs, repeats."""

    model: str = "resnet18"
    n: int = 512
    epochs: int = 2
    repeats: int = 3


def default_plan(quick: bool = False) -> list[AugCell]:
    """ResNet-18 at 64 px: N=1,024 x 3 epochs (full run) or N=256 x 2 epochs (quick)."""
    if quick:
        return [AugCell("resnet18", 256, 2, 3)]
    return [AugCell("resnet18", 1024, 3, 3)]


class AugmentedImages(torch.utils.data.Dataset):
    """uint8 images and labels, each image passed through a v2 pipeline when read."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, pipeline: Any) -> None:
        self.x, self.y, self.pipeline = x, y, pipeline

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pipeline(self.x[i]), self.y[i]


def standard_pipeline(size: int) -> v2.Compose:
    """zoo's ``standard`` preset written with torchvision v2, for one image."""
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.TrivialAugmentWide(),
    ])


def hand_train(base: LocalBase, x: torch.Tensor, y: torch.Tensor, *, epochs: int,
               batch_size: int = 64, lr: float = 1e-3, weight_decay: float = 0.01,
               seed: int = 0) -> LoopResult:
    """The hand-written augmented full fine-tune on CPU; times its set-up and epochs."""
    result = LoopResult()
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = base.build("cpu")
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    normalize = normalizer(base.mean, base.std)
    data = AugmentedImages(x, y, standard_pipeline(x.shape[-1]))
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True,
                                         num_workers=0,
                                         generator=torch.Generator().manual_seed(seed))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer,
                                                           T_max=epochs * len(loader))
    result.setup_s = time.perf_counter() - t0
    for _ in range(epochs):
        model.train()
        loss_sum = torch.zeros(())
        for images, labels in loader:
            loss = F.cross_entropy(model(normalize(images)), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach() * len(labels)
        result.epoch_end_s.append(time.perf_counter() - t0)
        result.train_loss = float(loss_sum) / len(x)
    result.extra["model"] = model
    return result


def train_img_s(result: LoopResult, n: int) -> float:
    """Training images per second over the epochs (set-up excluded)."""
    return n * len(result.epoch_end_s) / (result.epoch_end_s[-1] - result.setup_s)


def run(plan: list[AugCell], workdir: Path, log: Any = print,
        eval_size: int = 500) -> dict[str, Any]:
    """Run every cell, hand loop and zoo interleaved ``repeats`` times; JSON-able results."""
    rows = []
    for cell in plan:
        case = CASES[cell.model]
        base = local_base(case, workdir)
        data = dataset(cell.n, case.image_size, eval_size)
        model = base.build("cpu")
        loops.warm_up(model, data.x, base.mean, base.std, channels_last=case.convnet)
        del model
        zcell = Cell(cell.model, "full", cell.n, cell.epochs, ())
        pairs = []
        for i in range(cell.repeats):
            load = loadavg()
            hand = hand_train(base, data.x, data.y, epochs=cell.epochs)
            hand_acc = accuracy(hand.extra.pop("model"), data.x_eval, data.y_eval,
                                base.mean, base.std)
            mine, zoo_model = run_zoo(base, zcell, data, augment="standard")
            zoo_acc = accuracy(zoo_model, data.x_eval, data.y_eval, base.mean, base.std)
            pair = {"hand_img_s": train_img_s(hand, cell.n),
                    "zoo_img_s": train_img_s(mine, cell.n),
                    "hand_epoch_end_s": hand.epoch_end_s, "zoo_epoch_end_s": mine.epoch_end_s,
                    "hand_setup_s": hand.setup_s, "zoo_setup_s": mine.setup_s,
                    "hand_acc": hand_acc, "zoo_acc": zoo_acc,
                    "hand_loss": hand.train_loss, "zoo_loss": mine.train_loss,
                    "loadavg": [load, loadavg()]}
            pair["ratio"] = pair["zoo_img_s"] / pair["hand_img_s"]
            pairs.append(pair)
            log(f"  augment standard {cell.model} N={cell.n} E={cell.epochs} run {i + 1}: "
                f"hand {pair['hand_img_s']:.0f} img/s, zoo {pair['zoo_img_s']:.0f} img/s, "
                f"x{pair['ratio']:.2f}  load {load:.1f}")
        rows.append({"model": cell.model, "image_size": case.image_size, "n": cell.n,
                     "epochs": cell.epochs, "repeats": cell.repeats, "pairs": pairs,
                     "median_ratio": median([p["ratio"] for p in pairs])})
    return {"rows": rows, "eval_size": eval_size, "target": TARGET,
            "reference": "v2.Compose per image in a Dataset, DataLoader num_workers=0"}


def tables(data: dict[str, Any]) -> str:
    """One line per interleaved pair, then the median ratio against the target."""
    out = []
    for row in data["rows"]:
        for i, p in enumerate(row["pairs"], 1):
            out.append([row["model"], row["n"], row["epochs"], i, f"{p['hand_img_s']:.0f}",
                        f"{p['zoo_img_s']:.0f}", f"{p['ratio']:.2f}x",
                        f"{p['hand_acc']:.3f}/{p['zoo_acc']:.3f}",
                        f"{p['loadavg'][0]:.1f}-{p['loadavg'][1]:.1f}", "-"])
        met = "met" if row["median_ratio"] >= data["target"] else "MISSED"
        out.append([row["model"], row["n"], row["epochs"], "median",
                    f"{median([p['hand_img_s'] for p in row['pairs']]):.0f}",
                    f"{median([p['zoo_img_s'] for p in row['pairs']]):.0f}",
                    f"{row['median_ratio']:.2f}x", "-", "-",
                    f"img/s >= {data['target']}x: {met}"])
    return (table(["model", "N", "E", "run", "hand img/s", "zoo img/s", "zoo/hand",
                   "acc hand/zoo", "load", "target"], out,
                  'Full fine-tune with augment="standard" (zoo, batched) vs a hand loop '
                  "(v2 per image)")
            + "\n  hand loop: v2.Compose([RandomResizedCrop(scale=(0.08, 1)), "
            "RandomHorizontalFlip(), TrivialAugmentWide()])"
            "\n  per uint8 image in a Dataset, DataLoader(num_workers=0), normalised per batch;"
            "\n  img/s over the training epochs (set-up excluded); runs interleaved hand, zoo;"
            f"\n  accuracy on {data.get('eval_size', 500)} held-out mnist5k images.")

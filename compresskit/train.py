"""The one training loop.

Teacher training, distillation, recovery fine-tuning after pruning and QAT all call `fit` with
the same arguments: a model, an objective (a module whose forward(images, targets) returns
loss, student logits and the per-term parts; its own parameters, e.g. feature adapters, are
trained too), the data bundle and a TrainConfig. `fit` keeps the weights with the best
validation accuracy, saves a resume file after every epoch and picks up from it when the same
stage is re-run after an interruption.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from compresskit.config import TrainConfig
from compresskit.data import DataBundle


@dataclass
class FitResult:
    best_val_accuracy: float
    best_epoch: int
    epochs: int
    wall_s: float
    images_per_s: float
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int | None = None
    teacher_cache: dict[str, int] | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was asked for but CUDA is not available")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    if mode == "off" or device.type != "cuda":
        return None
    if mode == "fp16":
        return torch.float16
    if mode == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def make_optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """Weight decay on weights of rank >= 2 only (not on norms and biases)."""
    decay, no_decay = [], []
    for p in params:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov and cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999))


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    total = max(1, cfg.epochs * steps_per_epoch)
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total,
                                                   pct_start=0.25, div_factor=25, final_div_factor=1e3)
    warm = int(cfg.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        t = (step - warm) / max(1, total - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
             device: torch.device | None = None) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy of a model on a loader."""
    was_training = model.training
    model.eval()
    correct, total, loss_sum = 0, 0, 0.0
    for x, y in loader:
        if device is not None:
            x, y = x.to(device), y.to(device)
        logits = model(x).float()
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        total += len(y)
    model.train(was_training)
    return {"accuracy": correct / max(1, total), "loss": loss_sum / max(1, total), "n": total}


def _progress(quiet: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                    disable=quiet, transient=True)


def fit(model: nn.Module, objective: nn.Module, data: DataBundle, cfg: TrainConfig, *,
        device: torch.device, seed: int = 0, desc: str = "train",
        resume_file: Path | None = None, resume_key: str = "",
        epoch_callback: Callable[[int, nn.Module], None] | None = None,
        quiet: bool = False, log: Callable[[str], None] | None = None) -> FitResult:
    """Train `model` through `objective`; load the best-validation weights back into `model`."""
    from compresskit.artifacts import atomic_path

    torch.manual_seed(seed)
    model.to(device)
    objective.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    params = list(model.parameters()) + [p for p in objective.parameters()
                                         if all(p is not q for q in model.parameters())]
    opt = make_optimizer(params, cfg)
    train_loader = data.loader("train", batch_size=cfg.batch_size, shuffle=True, augment=True,
                               device=device, channels_last=cfg.channels_last, seed=seed)
    val_loader = data.loader("val", device=device, channels_last=cfg.channels_last)
    steps = len(train_loader)
    if cfg.max_batches_per_epoch is not None:
        steps = min(steps, cfg.max_batches_per_epoch)
    sched = make_scheduler(opt, cfg, steps)
    dtype = amp_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None

    best_acc, best_epoch, best_state = -1.0, -1, None
    history: list[dict[str, Any]] = []
    start_epoch, resumed = 0, None
    if resume_file is not None and resume_file.is_file():
        state = torch.load(resume_file, map_location="cpu", weights_only=True)
        if state.get("key") == resume_key:
            model.load_state_dict(state["model"])
            objective.load_state_dict(state["objective"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            train_loader.gen.set_state(state["rng"])
            torch.set_rng_state(state["torch_rng"])
            best_acc, best_epoch, best_state = state["best_acc"], state["best_epoch"], state["best_state"]
            history, start_epoch = list(state["history"]), int(state["epoch"]) + 1
            resumed = start_epoch
            if log:
                log(f"{desc}: resuming after epoch {start_epoch}")

    t_start = time.perf_counter()
    seen_images, train_time = 0, 0.0
    with _progress(quiet) as progress:
        ep_task = progress.add_task(f"{desc} epochs", total=cfg.epochs, completed=start_epoch, info="")
        for epoch in range(start_epoch, cfg.epochs):
            if epoch_callback is not None:
                epoch_callback(epoch, model)
            model.train()
            objective.train()
            b_task = progress.add_task(f"{desc} epoch {epoch + 1}", total=steps, info="")
            loss_sum, correct, count = 0.0, 0, 0
            t0 = time.perf_counter()
            set_epoch = getattr(objective, "set_epoch", None)
            for step, (x, y) in enumerate(train_loader):
                if step >= steps:
                    break
                if set_epoch is not None:
                    set_epoch(epoch + step / steps)
                ctx = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
                with ctx:
                    out = objective(x, y)
                loss = out.loss
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{desc}: loss became {loss.item()} in epoch {epoch + 1}; "
                                             "lower the learning rate")
                opt.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(opt)
                else:
                    loss.backward()
                if cfg.grad_clip:
                    nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                if scaler is not None:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                sched.step()
                loss_sum += loss.item() * len(y)
                correct += (out.logits.detach().argmax(1) == y).sum().item()
                count += len(y)
                progress.update(b_task, advance=1, info=f"loss {loss_sum / count:.3f}")
            epoch_time = time.perf_counter() - t0
            train_time += epoch_time
            seen_images += count
            progress.remove_task(b_task)
            val = evaluate(model, val_loader)
            record = {"epoch": epoch + 1, "images": count, "train_loss": loss_sum / max(1, count),
                      "train_accuracy": correct / max(1, count), "val_accuracy": val["accuracy"],
                      "val_loss": val["loss"], "lr": opt.param_groups[0]["lr"],
                      "images_per_s": count / max(epoch_time, 1e-9), "seconds": epoch_time}
            history.append(record)
            if val["accuracy"] >= best_acc:
                best_acc, best_epoch = val["accuracy"], epoch + 1
                best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            progress.update(ep_task, advance=1, info=f"val {val['accuracy']:.2%}")
            if log:
                log(f"{desc} epoch {epoch + 1}/{cfg.epochs}: loss {record['train_loss']:.4f} "
                    f"val {val['accuracy']:.2%} ({record['images_per_s']:.0f} img/s)")
            if resume_file is not None:
                with atomic_path(resume_file) as tmp:
                    torch.save({"key": resume_key, "epoch": epoch, "model": model.state_dict(),
                                "objective": objective.state_dict(), "optimizer": opt.state_dict(),
                                "scheduler": sched.state_dict(), "rng": train_loader.gen.get_state(),
                                "torch_rng": torch.get_rng_state(), "best_acc": best_acc,
                                "best_epoch": best_epoch, "best_state": best_state,
                                "history": history}, tmp)
    if best_state is not None:
        model.load_state_dict(best_state)
    else:  # no epochs: the selection score is the current model's
        best_acc = evaluate(model, val_loader)["accuracy"]
    model.to(memory_format=torch.contiguous_format)
    return FitResult(best_val_accuracy=best_acc, best_epoch=best_epoch, epochs=cfg.epochs,
                     wall_s=time.perf_counter() - t_start,
                     images_per_s=seen_images / train_time if train_time else 0.0,
                     history=history, resumed_from=resumed)

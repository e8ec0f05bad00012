"""A frozen copy of `compresskit.train.fit` as it was before it took loaders (DataBundle + TrainConfig).

Only the tests that prove the new `fit(model, loss_fn, *loaders_for(data, cfg, ...), cfg=cfg)`
bit-identical to the old call use it. Resume files and the progress bar are left out: neither
touches the random number generators or the weights.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from compresskit.config import TrainConfig
from compresskit.data import DataBundle
from compresskit.train import amp_dtype, evaluate, make_optimizer, make_scheduler


def legacy_fit(model: nn.Module, objective: nn.Module, data: DataBundle, cfg: TrainConfig, *,
               device: torch.device, seed: int = 0) -> list[dict]:
    """Train as the old fit did; load the best-validation weights; return the history."""
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
    best_acc, best_state, history = -1.0, None, []
    for epoch in range(cfg.epochs):
        model.train()
        objective.train()
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
        val = evaluate(model, val_loader)
        history.append({"epoch": epoch + 1, "val_accuracy": val["accuracy"], "val_loss": val["loss"],
                        "lr": opt.param_groups[0]["lr"]})
        if val["accuracy"] >= best_acc:
            best_acc = val["accuracy"]
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if best_state is not None:
        model.load_state_dict(best_state)
    model.to(memory_format=torch.contiguous_format)
    return history

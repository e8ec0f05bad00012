"""The one training loop.

Teacher training, distillation, recovery fine-tuning after pruning and QAT all call `fit`: a
model, a loss (a distill objective whose forward(images, targets) returns loss and student
logits and whose own parameters, e.g. feature adapters, are trained too; or a plain criterion
such as ``F.cross_entropy``), a train loader and a val loader (any iterables of batches, e.g.
a DataLoader) and the settings of a TrainConfig. `fit` keeps the weights with the best
validation accuracy, saves a resume file after every epoch and picks up from it when the same
stage is re-run after an interruption, and stops with `TrainingDiverged` when training is not
healthy (`health_problem`: a non-finite or exploding loss, or accuracy stuck at chance).
`loaders_for(data, cfg, ...)` makes the loaders the pipeline uses from a DataBundle.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from compresskit.config import TrainConfig

if TYPE_CHECKING:
    from compresskit.data import BatchLoader, DataBundle


class TrainingDiverged(RuntimeError, FloatingPointError):
    """Training diverged (a non-finite or exploding loss) or collapsed (accuracy at chance while
    the loss does not fall). The message names the run (`fit`'s `desc`) and what to try. A
    RuntimeError, so the pipeline reports it as a one-line stage error; a FloatingPointError
    too, as the non-finite-loss error always was."""


HEALTH_ADVICE = ("try a lower train.lr, a train.grad_clip (e.g. 1.0), or check the data normalisation "
                 "(data.mean / data.std: inputs should be about zero-mean, unit-variance)")


def health_problem(history: list[dict[str, Any]], *, initial_loss: float | None, num_classes: int | None,
                   max_loss_growth: float | None = 100.0, chance_epochs: int | None = 3,
                   chance_margin: float = 0.02) -> str | None:
    """What is wrong with a training run after its latest epoch (`history`: `fit`'s per-epoch
    records, oldest first), as a phrase; None while it looks healthy.

    Exploding: the latest epoch's mean train loss is above `max_loss_growth` times the reference
    ``max(initial_loss, ln(num_classes))``: the loss of the first batch trained on, or, when that
    is smaller (fine-tuning a trained model starts near zero), the cross-entropy of a uniform
    guess. A healthy run ends far below its start; a loss 100x above it has blown up, even if it
    is still finite.

    Collapsed: for the `chance_epochs` epochs after the first (so at least ``chance_epochs + 1``
    epochs: short runs never trip) the accuracy (val, else train) stayed at or below
    ``1/num_classes + chance_margin`` and the train loss fell by less than 1% over them. A run
    that is learning, even slowly, lowers its loss; one that sits at chance with a flat loss is
    not going anywhere. None disables either check.
    """
    if not history:
        return None
    last = history[-1]
    loss = last["train_loss"]
    if max_loss_growth is not None:
        ref = max(initial_loss if initial_loss is not None else history[0]["train_loss"],
                  math.log(num_classes) if num_classes and num_classes > 1 else 0.0)
        if ref > 0 and loss > max_loss_growth * ref:
            return (f"training diverged in epoch {last['epoch']}: its mean train loss {loss:.3g} is "
                    f"{loss / ref:.3g}x its start ({ref:.3g}), above train.max_loss_growth={max_loss_growth:g}")
    if chance_epochs is not None and num_classes and num_classes > 1 and len(history) > chance_epochs:
        window = history[-chance_epochs:]
        before = history[-chance_epochs - 1]["train_loss"]
        key = "val_accuracy" if all(h.get("val_accuracy") is not None for h in window) else "train_accuracy"
        chance = 1.0 / num_classes
        at_chance = all(h[key] <= chance + chance_margin for h in window)
        if at_chance and loss >= before - 0.01 * abs(before):
            what = "val" if key == "val_accuracy" else "train"
            accs = ", ".join(f"{h[key]:.1%}" for h in window)
            return (f"training collapsed: {what} accuracy stayed at chance (1/{num_classes} = {chance:.1%}, "
                    f"+ train.chance_margin={chance_margin:g}) in epochs {window[0]['epoch']}-{last['epoch']} "
                    f"({accs}) while the train loss did not fall ({before:.3g} -> {loss:.3g}); "
                    "train.chance_epochs: null turns this check off")
    return None


@dataclass
class FitResult:
    best_val_accuracy: float | None  # None: trained without a val loader
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
    if cfg.schedule == "onecycle" and total >= 4:
        # OneCycleLR divides by its warm-up length: at least 2 steps of it (very short runs only)
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total,
                                                   pct_start=max(0.25, 2 / total), div_factor=25,
                                                   final_div_factor=1e3)
    # cosine (and one-cycle runs of under 4 steps, which have no room for a warm-up)
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


# ------------------------------------------------------------------ loaders and loss functions

def loaders_for(data: DataBundle, cfg: TrainConfig, *, device: torch.device | str = "cpu",
                seed: int = 0) -> tuple[BatchLoader, BatchLoader]:
    """The (train, val) loaders the pipeline trains with, built from a DataBundle.

    Train: shuffled and augmented as the data says, batch `cfg.batch_size` (else the data's),
    seeded with `seed`. Val: in order, unaugmented, the data's eval batch size. Both yield
    batches on `device`, channels_last if `cfg.channels_last`. With the same `seed` passed to
    `fit` as well, training is bit-identical to the pipeline's.
    """
    device = resolve_device(device) if isinstance(device, str) else device
    train = data.loader("train", batch_size=cfg.batch_size, shuffle=True, augment=True,
                        device=device, channels_last=cfg.channels_last, seed=seed)
    val = data.loader("val", device=device, channels_last=cfg.channels_last)
    return train, val


def loader_generator(loader: object) -> torch.Generator | None:
    """The torch.Generator a loader draws its order (and augmentation) from: BatchLoader's
    `.gen`, a DataLoader's `.generator`; None for an unseeded DataLoader or a plain iterable."""
    for name in ("gen", "generator"):
        gen = getattr(loader, name, None)
        if isinstance(gen, torch.Generator):
            return gen
    return None


@dataclass(frozen=True)
class StepOutput:
    """What an objective returns for one batch (the same fields as distill's LossOutput)."""

    loss: torch.Tensor
    logits: torch.Tensor
    parts: dict[str, float] = field(default_factory=dict)


class CriterionObjective(nn.Module):
    """Turns a criterion ``loss_fn(logits, targets) -> loss`` into an objective:
    ``objective(x, y)`` runs ``logits = model(x)`` and returns `StepOutput`.

    The model is a plain reference (the training loop owns it); a criterion module is a
    submodule, so its buffers (class weights) move with ``.to(device)``.
    """

    def __init__(self, model: nn.Module, criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        object.__setattr__(self, "_model", model)
        self.criterion = criterion

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        logits = self._model(x)
        return StepOutput(loss=self.criterion(logits, y), logits=logits)


def as_objective(loss_fn: Callable[..., Any], model: nn.Module) -> nn.Module:
    """The objective `fit` trains through: `loss_fn` itself if it is an `nn.Module` other than a
    torch loss (`nn.modules.loss._Loss`), else `CriterionObjective(model, loss_fn)`."""
    if isinstance(loss_fn, nn.Module) and not isinstance(loss_fn, nn.modules.loss._Loss):
        return loss_fn
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be an objective module or a callable, got {type(loss_fn).__name__}")
    return CriterionObjective(model, loss_fn)


def _steps_per_epoch(loader: Iterable[Any], limit: int | None) -> int | None:
    try:
        steps: int | None = len(loader)  # type: ignore[arg-type]
    except TypeError:
        steps = None
    if limit is not None:
        steps = limit if steps is None else min(steps, limit)
    return steps


def training_device(device: torch.device | str | None, model: nn.Module) -> torch.device:
    """`device` as a torch.device ("auto" and "cuda" checked by `resolve_device`); None: the
    device of the model's first parameter or buffer (CPU for a stateless model)."""
    if device is not None:
        return resolve_device(device) if isinstance(device, str) else torch.device(device)
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def first_batch(loader: Iterable[Any]) -> Any:
    """The loader's first batch, without moving its generator (see `loader_generator`) on: a
    seeded loader then yields the same batches in training as if it had not been peeked at."""
    gen = loader_generator(loader)
    state = gen.get_state() if gen is not None else None
    try:
        return next(iter(loader))
    except StopIteration:
        raise ValueError("the loader yields no batch") from None
    finally:
        if gen is not None:
            gen.set_state(state)


# ------------------------------------------------------------------ the loop

def fit(model: nn.Module, loss_fn: Callable[..., Any], train_loader: Iterable[Any],
        val_loader: Iterable[Any] | None = None, *, epochs: int | None = None,
        cfg: TrainConfig | None = None, optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None, device: torch.device | str | None = None, seed: int | None = 0,
        max_batches_per_epoch: int | None = None, grad_clip: float | None = None,
        amp: str | bool | None = None, channels_last: bool | None = None, desc: str = "train",
        resume_file: Path | None = None, resume_key: str = "",
        epoch_callback: Callable[[int, nn.Module], None] | None = None,
        quiet: bool = False, log: Callable[[str], None] | None = None) -> FitResult:
    """Train `model` on `train_loader`; keep the weights with the best `val_loader` accuracy.

    Loaders are any re-iterable source of ``(images, labels)`` batches (a DataLoader,
    compresskit's BatchLoader, a list); batches not on `device` are moved there.

    `loss_fn`: an `nn.Module` that is not a torch loss is an *objective*: it runs the model
    itself, ``loss_fn(x, y)`` returns an object with `.loss` and `.logits` (compresskit's
    distill `Objective`), and its own parameters (feature adapters) are trained too. Anything
    else (``F.cross_entropy``, ``nn.CrossEntropyLoss()``, a function) is a *criterion*:
    ``loss = loss_fn(model(x), y)``. A criterion module of your own must subclass
    `nn.modules.loss._Loss`, or be wrapped in a function.

    Settings: `epochs`, `max_batches_per_epoch`, `grad_clip`, `amp` ("auto", "off", "fp16",
    "bf16" or a bool) and `channels_last` override `cfg`; what neither gives comes from
    ``TrainConfig()``. Without `optimizer` one is made from `cfg` (`make_optimizer`). Without
    `scheduler` one is made from `cfg` (`make_scheduler`, stepped per batch), except when the
    caller passed an optimizer and no `cfg` (its learning rate is then kept as it is). A given
    scheduler is also stepped once per batch. `device` defaults to the model's. `seed`
    reseeds torch first (None: leave the RNG alone).

    Without `val_loader` there is no selection: the last epoch's weights are kept and
    `best_val_accuracy` is None.

    Health: a non-finite loss raises `TrainingDiverged` at once; after every epoch
    `health_problem` judges the history (an exploding loss, `cfg.max_loss_growth`; accuracy
    stuck at chance with a flat loss, `cfg.chance_epochs` / `cfg.chance_margin`) and a problem
    raises `TrainingDiverged` naming `desc` and what to try, before that epoch is saved for
    resuming (a re-run with the same settings starts again from the last healthy epoch).

    Resume: with `resume_file`, the state after every epoch (model, objective, optimizer,
    scheduler, torch's CPU RNG and the train loader's generator, see `loader_generator`) is
    saved there, and a later call with the same `resume_key` continues after the last saved
    epoch. A DataLoader without a generator draws its order (and its workers' seeds) from
    torch's CPU RNG, which is restored, so it resumes bit-identically too. Not restored:
    randomness drawn in this process from Python's `random` or numpy (e.g. by a dataset's
    transforms) and the CUDA RNG (dropout on the GPU); such runs resume, but not bit-identically.
    """
    from compresskit.artifacts import atomic_path

    cfg_given = cfg is not None
    if isinstance(amp, bool):
        amp = "auto" if amp else "off"
    overrides = {"epochs": epochs, "max_batches_per_epoch": max_batches_per_epoch, "grad_clip": grad_clip,
                 "amp": amp, "channels_last": channels_last}
    cfg = (cfg if cfg_given else TrainConfig()).model_copy(
        update={k: v for k, v in overrides.items() if v is not None})
    epochs, max_batches, grad_clip = cfg.epochs, cfg.max_batches_per_epoch, cfg.grad_clip
    amp, channels_last = cfg.amp, cfg.channels_last
    device = training_device(device, model)

    if seed is not None:
        torch.manual_seed(seed)
    objective = as_objective(loss_fn, model)
    model.to(device)
    objective.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    own = {id(p) for p in model.parameters()}
    params = list(model.parameters()) + [p for p in objective.parameters() if id(p) not in own]
    opt = optimizer if optimizer is not None else make_optimizer(params, cfg)
    steps = _steps_per_epoch(train_loader, max_batches)
    sched = scheduler
    if sched is None and (optimizer is None or cfg_given):
        if steps is None:
            raise ValueError(f"{desc}: train_loader has no len(); pass max_batches_per_epoch or a scheduler")
        sched = make_scheduler(opt, cfg, steps)
    gen = loader_generator(train_loader)
    dtype = amp_dtype(amp, device)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None

    best_acc: float | None = -1.0 if val_loader is not None else None
    best_epoch, best_state = -1, None
    history: list[dict[str, Any]] = []
    start_epoch, resumed = 0, None
    initial_loss: float | None = None  # the first batch's loss: the reference for an exploding loss
    num_classes: int | None = None
    if resume_file is not None and resume_file.is_file():
        state = torch.load(resume_file, map_location="cpu", weights_only=True)
        if state.get("key") == resume_key:
            model.load_state_dict(state["model"])
            objective.load_state_dict(state["objective"])
            opt.load_state_dict(state["optimizer"])
            if sched is not None and state.get("scheduler") is not None:
                sched.load_state_dict(state["scheduler"])
            if gen is not None and state.get("rng") is not None:
                gen.set_state(state["rng"])
            torch.set_rng_state(state["torch_rng"])
            best_acc, best_epoch, best_state = state["best_acc"], state["best_epoch"], state["best_state"]
            history, start_epoch = list(state["history"]), int(state["epoch"]) + 1
            initial_loss = state.get("initial_loss")
            resumed = start_epoch
            if log:
                log(f"{desc}: resuming after epoch {start_epoch}")

    t_start = time.perf_counter()
    seen_images, train_time = 0, 0.0
    with _progress(quiet) as progress:
        ep_task = progress.add_task(f"{desc} epochs", total=epochs, completed=start_epoch, info="")
        for epoch in range(start_epoch, epochs):
            if epoch_callback is not None:
                epoch_callback(epoch, model)
            model.train()
            objective.train()
            b_task = progress.add_task(f"{desc} epoch {epoch + 1}", total=steps, info="")
            loss_sum, correct, count = 0.0, 0, 0
            t0 = time.perf_counter()
            set_epoch = getattr(objective, "set_epoch", None)
            for step, (x, y) in enumerate(train_loader):
                if steps is not None and step >= steps:
                    break
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if channels_last and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                if set_epoch is not None:
                    set_epoch(epoch + step / steps if steps else epoch)
                ctx = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
                with ctx:
                    out = objective(x, y)
                loss = getattr(out, "loss", None)
                if not isinstance(loss, torch.Tensor):
                    raise TypeError(f"{desc}: the objective {type(objective).__name__} returned "
                                    f"{type(out).__name__}, not an object with .loss and .logits "
                                    "(a criterion module must subclass nn.modules.loss._Loss)")
                if not torch.isfinite(loss):
                    raise TrainingDiverged(f"{desc}: loss became {loss.item()} in epoch {epoch + 1}; "
                                           f"{HEALTH_ADVICE}")
                opt.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(opt)
                else:
                    loss.backward()
                if grad_clip:
                    nn.utils.clip_grad_norm_(params, grad_clip)
                if scaler is not None:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                if sched is not None:
                    sched.step()
                loss_sum += loss.item() * len(y)
                if initial_loss is None:
                    initial_loss = loss.item()
                num_classes = out.logits.shape[-1]
                correct += (out.logits.detach().argmax(1) == y).sum().item()
                count += len(y)
                progress.update(b_task, advance=1, info=f"loss {loss_sum / count:.3f}")
            epoch_time = time.perf_counter() - t0
            train_time += epoch_time
            seen_images += count
            progress.remove_task(b_task)
            val = evaluate(model, val_loader, device) if val_loader is not None else None
            record = {"epoch": epoch + 1, "images": count, "train_loss": loss_sum / max(1, count),
                      "train_accuracy": correct / max(1, count),
                      "val_accuracy": val["accuracy"] if val else None, "val_loss": val["loss"] if val else None,
                      "lr": opt.param_groups[0]["lr"],
                      "images_per_s": count / max(epoch_time, 1e-9), "seconds": epoch_time}
            history.append(record)
            if val is None:
                best_epoch = epoch + 1
            elif val["accuracy"] >= best_acc:
                best_acc, best_epoch = val["accuracy"], epoch + 1
                best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            val_info = f"val {val['accuracy']:.2%}" if val else "no val"
            progress.update(ep_task, advance=1, info=val_info)
            if log:
                log(f"{desc} epoch {epoch + 1}/{epochs}: loss {record['train_loss']:.4f} "
                    f"{val_info} ({record['images_per_s']:.0f} img/s)")
            problem = health_problem(history, initial_loss=initial_loss, num_classes=num_classes,
                                     max_loss_growth=cfg.max_loss_growth, chance_epochs=cfg.chance_epochs,
                                     chance_margin=cfg.chance_margin)
            if problem is not None:
                raise TrainingDiverged(f"{desc}: {problem}; {HEALTH_ADVICE}")
            if resume_file is not None:
                with atomic_path(resume_file) as tmp:
                    torch.save({"key": resume_key, "epoch": epoch, "model": model.state_dict(),
                                "objective": objective.state_dict(), "optimizer": opt.state_dict(),
                                "scheduler": sched.state_dict() if sched is not None else None,
                                "rng": gen.get_state() if gen is not None else None,
                                "torch_rng": torch.get_rng_state(), "best_acc": best_acc,
                                "best_epoch": best_epoch, "best_state": best_state,
                                "history": history, "initial_loss": initial_loss}, tmp)
    if best_state is not None:
        model.load_state_dict(best_state)
    elif val_loader is not None:  # no epochs: the selection score is the current model's
        best_acc = evaluate(model, val_loader, device)["accuracy"]
    model.to(memory_format=torch.contiguous_format)
    return FitResult(best_val_accuracy=best_acc, best_epoch=best_epoch, epochs=epochs,
                     wall_s=time.perf_counter() - t_start,
                     images_per_s=seen_images / train_time if train_time else 0.0,
                     history=history, resumed_from=resumed)

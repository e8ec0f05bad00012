"""Pipeline configuration: one pydantic model per stage, validated once.

Every model forbids unknown keys and documents each field; choices are literals and
method-specific options are discriminated unions. `load_config(path, overrides)` reads YAML with
`yaml.safe_load`, merges `--set a.b=value` overrides, validates, and raises `ConfigError` whose
`problems` are `(key path, message)` pairs. This module imports no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo

from compresskit.config_terms import CETerm, KDTerm, LossTerm


class Strict(BaseModel):
    """Unknown keys are errors, and types are strict: `epochs: true` is not 1 and `lr: '0.1'` is
    not 0.1 (an int is still a float). Paths are the one exception: YAML gives them as strings."""

    model_config = ConfigDict(extra="forbid", validate_default=True, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_for_choices(cls, data: Any) -> Any:
        """Strict mode still takes `true` for `Literal[1, 3]` (True == 1): pass it on as the text
        it was written as, so the field itself reports it at its own key path."""
        if isinstance(data, dict):
            for name, value in data.items():
                field = cls.model_fields.get(name)
                if isinstance(value, bool) and field is not None and not _allows_bool(field.annotation):
                    data = {**data, name: str(value).lower()}
        return data


def _allows_bool(annotation: Any) -> bool:
    if annotation is bool or annotation is Any:
        return True
    if get_origin(annotation) is Literal:
        return any(isinstance(a, bool) for a in get_args(annotation))
    return any(_allows_bool(a) for a in get_args(annotation) if not isinstance(a, FieldInfo))


class ConfigError(Exception):
    """A configuration problem; `problems` holds (key path, message) pairs."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("\n".join(f"{loc}: {msg}" for loc, msg in problems))


# ------------------------------------------------------------------ data

class AugmentConfig(Strict):
    hflip: bool = Field(False, description="Random horizontal flip during training.")
    crop_padding: int = Field(0, ge=0, le=16, description="Random crop after zero-padding by this many pixels (0: off).")


class SyntheticConfig(Strict):
    num_train: int = Field(512, ge=16, description="Training images (validation is carved from them).")
    num_test: int = Field(256, ge=8, description="Test images.")
    num_classes: int = Field(4, ge=2, description="Number of classes.")
    image_size: int = Field(16, ge=8, le=512, description="Square image side in pixels.")
    channels: Literal[1, 3] = Field(1, description="Image channels.")
    seed: int = Field(0, description="Seed of the generator (the data is the same for the same seed).")


class DataConfig(Strict):
    dataset: Literal["fashion-mnist", "cifar10", "imagefolder", "synthetic"] = Field(
        "fashion-mnist", description="Dataset to train and evaluate on.")
    root: Path | None = Field(None, strict=False, description=(
        "Dataset directory. fashion-mnist: the four IDX .gz files (default: Debian's "
        "/usr/share/datasets/fashion-mnist, else ./data/fashion-mnist); cifar10: torchvision's root; "
        "imagefolder: a directory with train/ and test/ class-per-folder subdirectories."))
    download: bool = Field(False, description="Let torchvision download the dataset when it is missing.")
    image_size: int | None = Field(None, ge=8, le=1024, description="imagefolder: resize images to this square size (required for imagefolder).")
    channels: Literal[1, 3] | None = Field(None, description="imagefolder: 1 converts to grayscale, 3 to RGB (default 3).")
    mean: list[float] | None = Field(None, description="Per-channel normalization mean (after scaling pixels to [0,1]); default per dataset.")
    std: list[float] | None = Field(None, description="Per-channel normalization std; default per dataset.")
    class_names: list[str] | None = Field(None, description="Class names written into exported models; default per dataset.")
    val_fraction: float = Field(0.1, ge=0.0, lt=0.5, description="Fraction of the training set held out for model selection.")
    calib_size: int = Field(512, ge=1, description="Training images (never test images) used to calibrate PTQ.")
    batch_size: int = Field(128, ge=1, description="Training batch size.")
    eval_batch_size: int = Field(512, ge=1, description="Evaluation batch size.")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes (0: load in the main process).")
    limit_train: int | None = Field(None, ge=1, description="Use only the first N training images (quick runs).")
    limit_test: int | None = Field(None, ge=1, description="Use only the first N test images (quick runs).")
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="Training augmentation.")
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig, description="Options of the synthetic dataset.")

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.mean is not None and self.std is not None and len(self.mean) != len(self.std):
            raise ValueError("mean and std must have the same length")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError("std values must be > 0")
        if self.dataset == "imagefolder" and self.root is None:
            raise ValueError("imagefolder needs data.root (a directory with train/ and test/)")
        if self.dataset == "imagefolder" and self.image_size is None:
            raise ValueError("imagefolder needs data.image_size")
        return self


# ------------------------------------------------------------------ models

class ResNetSpec(Strict):
    arch: Literal["resnet"] = Field(description="ResNet with basic blocks for small inputs.")
    blocks: list[Annotated[int, Field(ge=1)]] = Field([2, 2, 2, 2], min_length=1, max_length=6, description="Blocks per stage.")
    width: int = Field(64, ge=4, le=512, description="Channels of the first stage (doubled at every stage).")
    stem_stride: Literal[1, 2] = Field(1, description="Stride of the 3x3 stem convolution.")


class MobileNetV2Spec(Strict):
    arch: Literal["mobilenetv2"] = Field(description="MobileNetV2 for small inputs.")
    width_mult: float = Field(1.0, gt=0.0, le=4.0, description="Channel width multiplier.")
    stem_stride: Literal[1, 2] = Field(2, description="Stride of the stem convolution.")
    stage_strides: list[Literal[1, 2]] = Field([1, 2, 2, 2, 1, 1, 1], min_length=7, max_length=7, description="Stride of each of the 7 inverted-residual stages.")
    last_channel: int = Field(1280, ge=8, description="Channels of the final 1x1 convolution before pooling.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout before the classifier.")


class MobileNetV3Spec(Strict):
    arch: Literal["mobilenetv3"] = Field(description="torchvision MobileNetV3.")
    size: Literal["small", "large"] = Field("small", description="Variant.")
    width_mult: float = Field(1.0, gt=0.0, le=4.0, description="Channel width multiplier.")
    stem_stride: Literal[1, 2] | None = Field(None, description="Override the stem stride (torchvision: 2).")
    dropout: float = Field(0.2, ge=0.0, lt=1.0, description="Dropout before the classifier.")


class TorchvisionSpec(Strict):
    arch: Literal["torchvision"] = Field(description="Any torchvision classifier by name, randomly initialised.")
    name: str = Field(description="torchvision model name, e.g. resnet18, mobilenet_v2, efficientnet_b0.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra keyword arguments for the constructor.")
    stem_stride: Literal[1, 2] | None = Field(None, description="Override the first convolution's stride.")


class CustomSpec(Strict):
    arch: Literal["custom"] = Field(description="A user model built by a Python callable.")
    factory: str = Field(pattern=r"^[\w.]+:[\w.]+$", description="'package.module:callable' returning an nn.Module; it gets num_classes/in_channels if it accepts them.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the callable.")
    search_path: list[str] = Field(default_factory=list, description="Folders searched first for the factory's module (relative ones: to the pipeline file's folder, which load_config adds last), then PYTHONPATH, then the current directory.")

    @classmethod
    def anchor_all(cls, node: Any, folder: Path) -> None:
        """Give every custom spec under `node` (a config) absolute search folders: its own,
        relative to `folder` (the pipeline file's), then `folder` itself."""
        if isinstance(node, cls):
            paths = [Path(p) if Path(p).is_absolute() else folder / p for p in node.search_path]
            node.search_path = list(dict.fromkeys(str(p) for p in [*paths, folder]))
        elif isinstance(node, BaseModel):
            for name in type(node).model_fields:
                cls.anchor_all(getattr(node, name), folder)
        elif isinstance(node, (list, tuple)):
            for item in node:
                cls.anchor_all(item, folder)


class MBNetSpec(Strict):
    arch: Literal["mbnet"] = Field(description="MobileNetV2-style net with configurable stages (what the student search varies); the defaults give mobilenetv2's layout.")
    width_mult: float = Field(1.0, gt=0.0, le=4.0, description="Channel width multiplier (stem, stages).")
    stem_channels: int = Field(32, ge=4, le=1024, description="Channels of the 3x3 stem convolution (times width_mult).")
    stem_stride: Literal[1, 2] = Field(2, description="Stride of the stem convolution.")
    channels: list[Annotated[int, Field(ge=1, le=4096)]] = Field([16, 24, 32, 64, 96, 160, 320], min_length=1, max_length=12, description="Base output channels of each stage (times width_mult).")
    blocks: list[Annotated[int, Field(ge=0, le=16)]] = Field([1, 2, 3, 4, 3, 3, 1], min_length=1, max_length=12, description="Inverted-residual blocks per stage (0 drops the stage and its stride).")
    strides: list[Literal[1, 2]] = Field([1, 2, 2, 2, 1, 1, 1], min_length=1, max_length=12, description="Stride of each stage's first block.")
    expand: list[Annotated[float, Field(ge=1.0, le=12.0)]] = Field([1.0, 6.0, 6.0, 6.0, 6.0, 6.0, 6.0], min_length=1, max_length=12, description="Expansion ratio of each stage's blocks.")
    kernel: list[Literal[3, 5, 7]] = Field([3, 3, 3, 3, 3, 3, 3], min_length=1, max_length=12, description="Depthwise kernel size of each stage's blocks.")
    last_channel: int = Field(1280, ge=8, description="Channels of the final 1x1 convolution before pooling.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout before the classifier.")

    @model_validator(mode="after")
    def _stages(self) -> MBNetSpec:
        lengths = {len(self.channels), len(self.blocks), len(self.strides), len(self.expand), len(self.kernel)}
        if len(lengths) != 1:
            raise ValueError("channels, blocks, strides, expand and kernel need one entry per stage (the same length)")
        if sum(self.blocks) < 1:
            raise ValueError("blocks must hold at least one block")
        return self


class PlainConvSpec(Strict):
    arch: Literal["plainconv"] = Field(description="Plain conv net: conv-BN-ReLU layers, global average pool, linear head (few operators: fast at batch 1).")
    channels: list[Annotated[int, Field(ge=1, le=4096)]] = Field([16, 32, 64, 128], min_length=1, max_length=16, description="Output channels of each conv layer.")
    strides: list[Literal[1, 2]] = Field([2, 1, 2, 1], min_length=1, max_length=16, description="Stride of each conv layer (same length as channels).")
    kernel: Literal[1, 3, 5, 7] = Field(3, description="Kernel size of every conv layer.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout before the classifier.")

    @model_validator(mode="after")
    def _layers(self) -> PlainConvSpec:
        if len(self.channels) != len(self.strides):
            raise ValueError("channels and strides need one entry per layer (the same length)")
        return self


ModelSpec = Annotated[
    ResNetSpec | MobileNetV2Spec | MBNetSpec | PlainConvSpec | MobileNetV3Spec | TorchvisionSpec | CustomSpec,
    Field(discriminator="arch"),
]


# ------------------------------------------------------------------ training

class TrainConfig(Strict):
    epochs: int = Field(5, ge=0, le=10000, description="Training epochs (0: no training).")
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="Optimizer.")
    lr: float = Field(0.1, gt=0.0, le=10.0, description="Peak learning rate.")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum (AdamW: beta1).")
    nesterov: bool = Field(True, description="Nesterov momentum (SGD).")
    weight_decay: float = Field(5e-4, ge=0.0, le=1.0, description="Weight decay (not applied to norms and biases).")
    schedule: Literal["onecycle", "cosine", "constant"] = Field("onecycle", description="Learning-rate schedule, stepped per batch.")
    warmup_epochs: float = Field(0.0, ge=0.0, description="Linear warm-up (cosine/constant schedules).")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="Label smoothing of the cross-entropy term.")
    batch_size: int | None = Field(None, ge=1, description="Override data.batch_size for this stage.")
    max_batches_per_epoch: int | None = Field(None, ge=1, description="Stop each epoch after this many batches (a fresh random subset every epoch); for short fine-tuning such as QAT.")
    grad_clip: float | None = Field(None, gt=0.0, description="Clip the gradient norm to this value.")
    channels_last: bool = Field(True, description="Train in channels_last memory format (faster convolutions on CPU and GPU).")
    amp: Literal["auto", "off", "fp16", "bf16"] = Field("auto", description="Mixed precision: auto = bf16/fp16 on CUDA, off on CPU.")
    cache_teacher: bool = Field(True, description="Memoise teacher logits per image when inputs repeat exactly (no augmentation, logit-only loss terms); exact, and a KD step then costs about a student-only step.")
    max_loss_growth: float | None = Field(100.0, gt=1.0, description="Stop as diverged when an epoch's mean train loss exceeds this many times the larger of the first batch's loss and ln(classes) (a uniform guess's cross-entropy); null: off.")
    chance_epochs: int | None = Field(3, ge=1, description="Stop as collapsed when, for this many epochs after the first, val accuracy (train accuracy without val) stays within chance_margin of 1/classes and the train loss fell by less than 1%; null: off.")
    chance_margin: float = Field(0.02, ge=0.0, le=1.0, description="How far above 1/classes an accuracy still counts as chance (fraction), for chance_epochs.")


# ------------------------------------------------------------------ distillation loss terms
# one config model per method, in config_terms.py (a discriminated union on `method`)

def default_kd_loss() -> list[LossTerm]:
    return [CETerm(method="ce", weight=0.1), KDTerm(method="kd", weight=0.9, temperature=4.0)]


# ------------------------------------------------------------------ stages

class EnsembleMember(Strict):
    model: ModelSpec | None = Field(None, description="Architecture of this extra teacher (default: teacher.model).")
    checkpoint: Path | None = Field(None, strict=False, description="Load this checkpoint instead of training the member.")
    seed: int | None = Field(None, description="Training seed (default: the run's seed + the member's position).")


def _specialist_train() -> TrainConfig:
    return TrainConfig(epochs=2, lr=0.01, schedule="cosine")


class SpecialistsConfig(Strict):
    enabled: bool = Field(False, description="Train specialists for the classes the generalist (the teacher) confuses and use generalist + specialists as the teacher.")
    count: int = Field(2, ge=1, le=100, description="Number of specialists.")
    size: int = Field(3, ge=2, le=1000, description="Classes per specialist (each also has a dustbin class for all others).")
    top_k: int = Field(2, ge=1, description="A specialist takes part for an image when one of its classes is in the generalist's top-k.")
    temperature: float = Field(2.0, gt=0.0, le=100.0, description="Temperature of the generalist's soft targets that specialists are trained on.")
    soft_weight: float = Field(0.5, ge=0.0, le=1.0, description="Share of the soft-target loss in a specialist's training loss (the rest: cross-entropy on its classes + dustbin).")
    combine_steps: int = Field(30, ge=1, le=1000, description="Gradient steps that combine generalist and specialists into one distribution per image.")
    train: TrainConfig = Field(default_factory=_specialist_train, description="Training of each specialist (initialised from the generalist).")


class TeacherConfig(Strict):
    model: ModelSpec = Field(default_factory=lambda: ResNetSpec(arch="resnet", width=32, stem_stride=2),
                             description="Teacher architecture (also used to load a plain state-dict checkpoint).")
    checkpoint: Path | None = Field(None, strict=False, description="Load this checkpoint instead of training (a compresskit checkpoint or a state dict).")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training settings when no checkpoint is given.")
    ensemble: list[EnsembleMember] = Field(default_factory=list, description="Extra teachers: with any, the teacher is an ensemble of teacher.model and these (the 'ensemble' loss term averages their soft targets).")
    specialists: SpecialistsConfig = Field(default_factory=SpecialistsConfig, description="Generalist + specialists teacher (Hinton et al. 2015).")
    preprocess_mismatch: Literal["refuse", "convert", "ignore"] = Field("refuse", description="A checkpoint (teacher or ensemble member) that records other preprocessing than the data's: refuse it; convert (fold a different mean/std into its first convolution, noted in the metrics); or ignore the difference.")

    @model_validator(mode="after")
    def _one_scheme(self) -> TeacherConfig:
        if self.ensemble and self.specialists.enabled:
            raise ValueError("teacher.ensemble and teacher.specialists cannot be combined; choose one")
        return self


class DistillConfig(Strict):
    enabled: bool = Field(True, description="Run this stage (off: no student is trained; the later stages compress the teacher model itself, e.g. a loaded teacher.checkpoint).")
    student: ModelSpec = Field(default_factory=lambda: MobileNetV2Spec(arch="mobilenetv2", width_mult=0.35, last_channel=256),
                               description="Student architecture.")
    loss: list[LossTerm] = Field(default_factory=default_kd_loss, min_length=1, description="Weighted sum of loss terms.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training settings.")
    baseline: bool = Field(False, description="Also train the same student with cross-entropy only, as an ablation row.")


class StructuredPrune(Strict):
    method: Literal["structured"] = Field(description="Channel pruning with Torch-Pruning: the network really shrinks.")
    importance: Literal["l1", "l2", "bn_scale", "taylor", "lamp", "fpgm"] = Field("l2", description="Channel importance criterion.")
    ratio: float = Field(0.5, gt=0.0, lt=1.0, description="Fraction of channels removed (per layer, or overall when global).")
    global_pruning: bool = Field(False, description="Rank channels across layers instead of the same ratio per layer.")
    iterative_steps: int = Field(1, ge=1, le=100, description="Prune in this many steps.")
    round_to: int | None = Field(8, ge=1, description="Keep channel counts multiples of this (SIMD-friendly).")
    ignored_layers: list[str] = Field(default_factory=list, description="Module paths (or shell patterns like features.*.conv.2.0) whose output channels are never pruned; the classifier never is.")
    max_layer_ratio: float = Field(0.95, gt=0.0, lt=1.0, description="No layer loses more than this fraction of its channels (matters with global_pruning).")
    target_latency_ms: float | None = Field(None, gt=0.0, description="Pick the ratio by measuring: the smallest of search_ratios whose FP32 ONNX model runs at or below this p50 (budgets.latency_batch_size and latency_threads); replaces ratio.")
    target_speedup: float | None = Field(None, gt=1.0, description="Pick the ratio by measuring: the smallest of search_ratios at least this much faster than the unpruned model; replaces ratio.")
    search_ratios: list[Annotated[float, Field(gt=0.0, lt=1.0)]] = Field([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7], min_length=1, description="Ratios tried in order by the target modes.")

    @model_validator(mode="after")
    def _one_target(self) -> StructuredPrune:
        if self.target_latency_ms is not None and self.target_speedup is not None:
            raise ValueError("give target_latency_ms or target_speedup, not both")
        return self


class MagnitudePrune(Strict):
    method: Literal["magnitude"] = Field(description="Global unstructured L1 pruning: zeros weights, shapes stay (no speed-up on dense runtimes).")
    sparsity: float = Field(0.5, gt=0.0, lt=1.0, description="Fraction of conv/linear weights set to zero.")
    ignored_layers: list[str] = Field(default_factory=list, description="Module paths (or shell patterns) left dense; the first conv and the classifier always are.")


class FinetuneConfig(Strict):
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=2, lr=0.02), description="Recovery fine-tuning settings.")
    loss: list[LossTerm] = Field(default_factory=default_kd_loss, min_length=1, description="Loss terms; teacher terms use the stage's teacher model.")
    max_accuracy_loss: float = Field(0.02, ge=0.0, le=1.0, description="Test accuracy the pruned, fine-tuned model may lose against the student it was pruned from (fraction: 0.02 = 2 pt) before the stage summary and the report warn.")


class PruneConfig(Strict):
    enabled: bool = Field(True, description="Run this stage.")
    pruner: Annotated[StructuredPrune | MagnitudePrune, Field(discriminator="method")] = Field(
        default_factory=lambda: StructuredPrune(method="structured"), description="Pruning method and its options.")
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig, description="Recovery fine-tuning with KD from the teacher.")


class PTQSearchConfig(Strict):
    enabled: bool = Field(True, description="Choose the INT8 format by measuring here: quantize every candidate, time and evaluate it on the validation split, keep the fastest within the accuracy budget (the single settings above are then unused).")
    activation_types: list[Literal["uint8", "int8"]] = Field(["uint8", "int8"], min_length=1, description="Activation types tried.")
    per_channel: list[bool] = Field([True, False], min_length=1, description="Per-channel (true) and/or per-tensor (false) weight scales tried.")
    calibrate_methods: list[Literal["minmax", "entropy", "percentile", "distribution"]] = Field(["minmax"], min_length=1, description="Calibration methods tried.")
    max_accuracy_drop: float = Field(0.002, ge=0.0, le=1.0, description="Largest validation-accuracy drop vs the float model a candidate may have (fraction: 0.002 = 0.2 pt).")
    batch_sizes: list[Annotated[int, Field(ge=1)]] = Field([1, 64], min_length=1, description="Batch sizes timed per candidate.")
    rank_batch_size: int | None = Field(None, ge=1, description="Batch size whose p50 ranks the candidates (default: budgets.latency_batch_size).")
    max_seconds: float = Field(0.5, gt=0.0, description="Time budget per candidate and batch size.")
    fallback: bool = Field(True, description="When no candidate meets the budget, keep the nodes most sensitive to quantization (SQNR) in float until it does.")
    max_excluded: int = Field(16, ge=1, description="Most nodes the fallback keeps in float.")


class PTQConfig(Strict):
    enabled: bool = Field(True, description="Run post-training static quantization with onnxruntime.")
    activation_type: Literal["uint8", "int8"] = Field("uint8", description="Activation type: uint8 is faster on x86 VNNI than int8.")
    weight_type: Literal["int8", "uint8"] = Field("int8", description="Weight type.")
    per_channel: bool = Field(True, description="Per-output-channel weight scales.")
    calibrate_method: Literal["minmax", "entropy", "percentile", "distribution"] = Field("minmax", description="Calibration method.")
    percentile: float = Field(99.999, gt=90.0, le=100.0, description="Percentile for calibrate_method=percentile.")
    reduce_range: bool = Field(False, description="7-bit weights, for CPUs without VNNI where U8S8 can saturate.")
    nodes_to_exclude: list[str] = Field(default_factory=list, description="ONNX node names kept in float.")
    search: PTQSearchConfig = Field(default_factory=PTQSearchConfig, description="INT8 format chosen by measurement.")


class QATConfig(Strict):
    enabled: bool = Field(True, description="Run quantization-aware training.")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=1, lr=0.005, schedule="cosine"), description="QAT fine-tuning settings.")
    loss: list[LossTerm] = Field(default_factory=default_kd_loss, min_length=1, description="Loss terms; the teacher is the float (pruned) student.")
    per_channel: bool | Literal["auto"] = Field("auto", description="Per-output-channel weight scales; auto: as the PTQ search's winner (measured fastest here), else true.")
    activation_type: Literal["auto", "uint8", "int8"] = Field("auto", description="Activation type of the fake-quantized model and its QDQ export; auto: the one of the PTQ search's winner (measured fastest here), else uint8.")
    max_accuracy_loss: float = Field(0.02, ge=0.0, le=1.0, description="Test accuracy the QAT model may lose against the float model it was trained from (fraction: 0.02 = 2 pt) before the stage summary and the report warn.")


class QuantizeConfig(Strict):
    ptq: PTQConfig = Field(default_factory=PTQConfig, description="Post-training quantization.")
    qat: QATConfig = Field(default_factory=QATConfig, description="Quantization-aware training.")


class ExportConfig(Strict):
    opset: int = Field(17, ge=13, le=23, description="ONNX opset.")
    parity_samples: int = Field(512, ge=1, description="Test images used for the PyTorch/ONNX parity check.")
    max_abs_diff: float = Field(1e-3, gt=0.0, description="FP32 parity: absolute floor on the largest |logit difference|; a difference up to this always passes (tiny logits), above it max_rel_diff decides.")
    max_rel_diff: float = Field(1e-4, gt=0.0, description="FP32 parity: largest |logit difference| relative to the largest |logit| of the PyTorch model on the parity images; above this (and above max_abs_diff) fails the stage.")
    min_top1_agreement: float = Field(0.99, ge=0.0, le=1.0, description="FP32 parity: smallest fraction of parity images on which ONNX and PyTorch pick the same class; below this fails the stage.")
    min_qat_top1_agreement: float = Field(0.9, ge=0.0, le=1.0, description="QAT parity: smallest fraction of parity images on which the INT8 ONNX export and the fake-quant PyTorch model pick the same class (INT8 rounding differs a little); below this the export does not reproduce QAT for this model and fails the stage.")
    max_abs_logit: float | None = Field(1e3, gt=0.0, description="A model whose logits on the parity images are not finite or exceed this in magnitude is reported as diverged and not exported (softmax saturates in float32 at logit gaps of ~100; trained classifiers stay well below); null: no bound, only non-finite logits fail.")
    ort_format: bool = Field(False, description="Also write .ort files for onnxruntime mobile.")


class BenchConfig(Strict):
    batch_sizes: list[Annotated[int, Field(ge=1)]] = Field([1, 64], min_length=1, description="Batch sizes to time.")
    threads: list[Annotated[int, Field(ge=0)]] = Field([1], min_length=1, description="Intra-op thread counts to time (0: all cores).")
    warmup: int = Field(10, ge=0, description="Untimed warm-up runs.")
    min_runs: int = Field(20, ge=1, description="Minimum timed runs.")
    max_seconds: float = Field(2.0, gt=0.0, description="Time budget per (model, batch, threads) measurement.")
    target_rel_ci: float | None = Field(0.02, gt=0.0, lt=1.0, description="Stop timing once the 95% confidence interval of the median is within +- this fraction of it (or at max_seconds); null: always run max_seconds.")
    accuracy: bool = Field(True, description="Evaluate every model on the full test set through onnxruntime.")


class TrackingConfig(Strict):
    mlflow_uri: str | None = Field(None, description="Log the run to MLflow: a tracking server URI (http://host:5000) or a local folder (a file store, e.g. mlruns). Needs compresskit[track].")
    mlflow_experiment: str = Field("compresskit", description="MLflow experiment name.")
    tensorboard_dir: Path | None = Field(None, strict=False, description="Log the run's figures and training curves for TensorBoard under this folder. Needs compresskit[track].")


class BudgetConfig(Strict):
    min_accuracy: float | None = Field(None, ge=0.0, le=1.0, description="Minimum test accuracy of the deployed model (fraction, 0.917 = 91.7%).")
    max_accuracy_drop: float | None = Field(None, ge=0.0, le=1.0, description="Maximum accuracy drop vs reference_model (fraction points, 0.005 = 0.5 pt).")
    max_latency_ms: float | None = Field(None, gt=0.0, description="Maximum p50 latency in ms at latency_batch_size.")
    max_size_mb: float | None = Field(None, gt=0.0, description="Maximum model file size in MiB.")
    latency_batch_size: int = Field(1, ge=1, description="Batch size the latency budget applies to (must be in bench.batch_sizes).")
    latency_threads: int | None = Field(None, ge=0, description="Thread count the latency budget applies to (default: the first of bench.threads).")
    reference_model: Literal["student", "pruned", "teacher"] = Field("student", description="FP32 model that max_accuracy_drop is measured against.")


# ------------------------------------------------------------------ student search (compresskit search)

class RangeSpec(Strict):
    low: float = Field(description="Lowest value.")
    high: float = Field(description="Highest value.")
    log: bool = Field(False, description="Sample on a log scale.")
    integer: bool = Field(False, description="Integer values (low and high are rounded).")

    @model_validator(mode="after")
    def _order(self) -> RangeSpec:
        if self.high < self.low or (self.log and self.low <= 0):
            raise ValueError("need low <= high (and low > 0 with log)")
        return self


class PlainConvSpace(Strict):
    enabled: bool = Field(True, description="Search plain conv nets (arch plainconv).")
    depth: list[Annotated[int, Field(ge=1, le=16)]] = Field([3, 4, 5], min_length=1, description="Conv layers: the choices.")
    channels: list[Annotated[int, Field(ge=1, le=4096)]] = Field([16, 24, 32, 48, 64, 96, 128], min_length=1, description="Output channels of each layer: the choices (one pick per layer).")
    stride_patterns: list[list[Literal[1, 2]]] = Field([[2, 1, 2, 1, 1, 1]], min_length=1, description="Stride patterns: layer i takes pattern[i]; each pattern needs at least max(depth) entries.")
    kernel: list[Literal[1, 3, 5, 7]] = Field([3], min_length=1, description="Kernel size: the choices.")

    @model_validator(mode="after")
    def _patterns(self) -> PlainConvSpace:
        if any(len(p) < max(self.depth) for p in self.stride_patterns):
            raise ValueError(f"every stride pattern needs at least max(depth) = {max(self.depth)} entries")
        return self


class MBNetSpace(Strict):
    enabled: bool = Field(True, description="Search MobileNet-style nets (arch mbnet).")
    width_mult: list[Annotated[float, Field(gt=0.0, le=4.0)]] = Field([0.25, 0.35, 0.5], min_length=1, description="Width multiplier: the choices.")
    stem_stride: list[Literal[1, 2]] = Field([2], min_length=1, description="Stem stride: the choices.")
    channels: list[Annotated[int, Field(ge=1, le=4096)]] = Field([16, 24, 32, 64, 96, 160, 320], min_length=1, max_length=12, description="Base channels of the stages (the template; times width_mult).")
    strides: list[Literal[1, 2]] = Field([1, 1, 2, 2, 1, 2, 1], min_length=1, max_length=12, description="Stride of each stage (the template).")
    blocks: list[Annotated[int, Field(ge=0, le=16)]] = Field([0, 1, 2], min_length=1, description="Blocks per stage: the choices, one pick per stage (a stride-2 stage keeps at least 1 block, so the downsampling stays).")
    expand: list[Annotated[float, Field(ge=1.0, le=12.0)]] = Field([3.0, 6.0], min_length=1, description="Expansion ratio of every stage but the first (which keeps 1): the choices.")
    kernel: list[Literal[3, 5, 7]] = Field([3], min_length=1, description="Depthwise kernel size of every stage: the choices.")
    last_channel: list[Annotated[int, Field(ge=8)]] = Field([128, 256], min_length=1, description="Head width (final 1x1 conv): the choices.")

    @model_validator(mode="after")
    def _template(self) -> MBNetSpace:
        if len(self.channels) != len(self.strides):
            raise ValueError("channels and strides need one entry per stage (the same length)")
        return self


class FactorySpace(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=60, description="Family name in the trial table.")
    model: ModelSpec = Field(description="A torchvision or custom model spec; the sampled values go into its kwargs.")
    space: dict[str, list[Any] | RangeSpec] = Field(min_length=1, description="kwarg -> list of choices, or {low, high, log, int}.")

    @model_validator(mode="after")
    def _kind(self) -> FactorySpace:
        if self.model.arch not in ("torchvision", "custom"):
            raise ValueError("model must be {arch: torchvision, ...} or {arch: custom, ...} (its kwargs are searched)")
        if any(isinstance(v, list) and not v for v in self.space.values()):
            raise ValueError("every list of choices needs at least one value")
        return self


class SearchFamilies(Strict):
    plainconv: PlainConvSpace = Field(default_factory=PlainConvSpace, description="Plain conv nets.")
    mbnet: MBNetSpace = Field(default_factory=MBNetSpace, description="MobileNet-style nets.")
    factories: list[FactorySpace] = Field(default_factory=list, description="torchvision classifiers or your factories, each with a declared parameter space.")


def _default_recipes() -> list[list[LossTerm]]:
    return [[CETerm(method="ce", weight=1.0)], default_kd_loss()]


class SearchConfig(Strict):
    n_trials: int = Field(30, ge=1, le=100000, description="Trials in the study in all (a resumed search or a worker runs only the missing ones).")
    timeout_s: float | None = Field(None, gt=0.0, description="Stop starting trials after this many seconds (this process).")
    seed: int = Field(0, description="Sampler seed; the trials already in the study are added (a resumed search does not redraw the same random start), and a --worker adds its process id (workers do not draw the same candidates).")
    sampler: Literal["tpe", "random"] = Field("tpe", description="Optuna sampler.")
    pruner: Literal["successive_halving", "hyperband", "median", "none"] = Field("successive_halving", description="Optuna pruner over the proxy epochs.")
    pruner_startup: int = Field(4, ge=0, description="Trials that must finish their proxy training before the pruner may stop any (early comparisons are too few to judge).")
    storage: str | None = Field(None, description="Optuna storage URL; default sqlite:///<models_dir>/<name>/search/study.db. Use PostgreSQL (postgresql://user:pw@host/db) for workers on several machines.")
    families: SearchFamilies = Field(default_factory=SearchFamilies, description="Student architecture families and their ranges.")
    recipes: list[list[LossTerm]] = Field(default_factory=_default_recipes, min_length=1, description="Distillation recipes tried (each a distill.loss list; [{method: ce, weight: 1.0}] is 'no KD'). Logit terms only: module paths differ between architectures.")
    temperatures: list[Annotated[float, Field(gt=0.0, le=100.0)]] | None = Field(None, min_length=1, description="Also search the temperature of the recipes' kd/dkd/dist terms over these values.")
    proxy_epochs: int = Field(2, ge=1, le=1000, description="Epochs of the proxy training every surviving candidate gets (val accuracy reported to the pruner after each).")
    proxy_max_batches: int | None = Field(100, ge=1, description="Batches per proxy epoch (null: the whole training set).")
    full_epochs: int | None = Field(None, ge=1, le=10000, description="Epochs of the finalists' full training (default: distill.train.epochs).")
    top_k: int = Field(2, ge=1, le=100, description="Finalists trained fully, INT8-quantized and measured.")
    labels_only_baseline: bool = Field(True, description="A finalist whose recipe uses the teacher is also trained on the labels alone (CE; same architecture, epochs and seed) and measured the same way: both are reported side by side and either can win, so KD is kept only where it helps.")
    accuracy_tie: float = Field(0.0, ge=0.0, le=1.0, description="Accuracies within this of the best count as tied; the fastest of them wins (fraction, 0.002 = 0.2 pt).")
    max_latency_ratio: float | None = Field(None, gt=0.0, description="Relative latency budget: at most this times latency_reference's p50 (measured the same way, here); combined with budgets.max_latency_ms (the smaller wins).")
    latency_reference: ModelSpec | None = Field(None, description="The model max_latency_ratio refers to (default: distill.student, the hand-picked student).")
    latency_table: Path | None = Field(None, strict=False, description="JSON file: canonical spec key -> p50 ms measured on the target device; replaces measuring here.")
    latency_table_missing: Literal["drop", "measure"] = Field("drop", description="A candidate missing from latency_table: drop it, or measure it here.")
    calib_images: int = Field(32, ge=1, le=4096, description="Training images that calibrate the untrained candidates' screening INT8 models.")
    screen_max_seconds: float = Field(0.5, gt=0.0, description="Timing budget per screened candidate.")
    format_search: bool = Field(True, description="Finalists: choose the INT8 format by measuring (quantize.ptq.search's candidates); false: U8S8 per-tensor, as screened. Always U8S8 per-tensor with a latency_table.")

    @model_validator(mode="after")
    def _check(self) -> SearchConfig:
        f = self.families
        if not (f.plainconv.enabled or f.mbnet.enabled or f.factories):
            raise ValueError("families: enable at least one family")
        for i, recipe in enumerate(self.recipes):
            for j, term in enumerate(recipe):
                if term.module_paths():
                    raise ValueError(f"recipes.{i}.{j}: {term.method} reads module paths, which differ between candidate architectures; use logit terms (ce, kd, dkd, dist)")
                if term.method == "ensemble":
                    raise ValueError(f"recipes.{i}.{j}: the search uses a single teacher; no 'ensemble' term")
        return self


class PipelineConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100,
                      description="Run name: artifacts go to <models_dir>/<name>/, reports to <reports_dir>/<name>/.")
    seed: int = Field(0, description="Random seed.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when present, else CPU.")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads for training (default: torch's choice).")
    models_dir: Path = Field(Path("models"), strict=False, description="Root of run artifacts.")
    reports_dir: Path = Field(Path("reports"), strict=False, description="Root of run reports.")
    data: DataConfig = Field(default_factory=DataConfig, description="Dataset and loaders.")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="Teacher stage.")
    distill: DistillConfig = Field(default_factory=DistillConfig, description="Distillation stage.")
    prune: PruneConfig = Field(default_factory=PruneConfig, description="Pruning stage.")
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig, description="Quantization stage.")
    export: ExportConfig = Field(default_factory=ExportConfig, description="ONNX export stage.")
    bench: BenchConfig = Field(default_factory=BenchConfig, description="Benchmark stage.")
    budgets: BudgetConfig = Field(default_factory=BudgetConfig, description="CI budgets for the deployed model.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="Optional experiment tracking (MLflow, TensorBoard); no stage reads it.")
    search: SearchConfig | None = Field(None, description="Student search (compresskit search): families, recipes, budgets' fidelity; no stage reads it.")

    @model_validator(mode="after")
    def _check(self) -> PipelineConfig:
        b = self.budgets
        if b.latency_batch_size not in self.bench.batch_sizes:
            raise ValueError(f"budgets.latency_batch_size={b.latency_batch_size} is not in bench.batch_sizes={self.bench.batch_sizes}")
        if b.latency_threads is not None and b.latency_threads not in self.bench.threads:
            raise ValueError(f"budgets.latency_threads={b.latency_threads} is not in bench.threads={self.bench.threads}")
        if self.distill.enabled and any(t.method == "ensemble" for t in self.distill.loss) and not self.teacher.ensemble:
            raise ValueError("distill.loss has an 'ensemble' term but teacher.ensemble lists no extra teachers")
        for where, terms in (("prune.finetune.loss", self.prune.finetune.loss), ("quantize.qat.loss", self.quantize.qat.loss)):
            if any(t.method == "ensemble" for t in terms):
                raise ValueError(f"{where}: the 'ensemble' term is for the distill stage (its teacher here is one model)")
        return self


# ------------------------------------------------------------------ loading

def _parse_value(text: str) -> Any:
    """An override value is YAML: 3 -> int, 0.1 -> float, true -> bool, [1,2] -> list, null -> None."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Merge `a.b.c=value` overrides into a raw config dict (list items by index: `a.0.b=1`)."""
    problems: list[tuple[str, str]] = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            problems.append((item, "override must look like key.path=value"))
            continue
        parts = key.strip().split(".")
        node: Any = raw
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    problems.append((key, f"'{part}' is not a valid index of a list of {len(node)}"))
                    break
                if last:
                    node[int(part)] = _parse_value(value)
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = _parse_value(value)
                else:
                    if node.get(part) is None:
                        node[part] = {}
                    node = node[part]
            else:
                problems.append((key, f"'{'.'.join(parts[:i])}' is not a mapping"))
                break
    if problems:
        raise ConfigError(problems)
    return raw


_UNION_TAGS = {"resnet", "mobilenetv2", "mbnet", "plainconv", "mobilenetv3", "torchvision", "custom", "ce", "kd",
               "fitnet", "at", "structured", "magnitude"}


def _loc(err: dict[str, Any]) -> str:
    """The key path of an error, without the union tags pydantic inserts (teacher.model.resnet.width)."""
    loc = [str(p) for p in err.get("loc", ())]
    parts = [p for i, p in enumerate(loc) if not (p in _UNION_TAGS and 0 < i < len(loc) - 1)]
    return ".".join(parts) or "(root)"


def validate_config(raw: Any) -> PipelineConfig:
    if raw is None:
        raise ConfigError([("(root)", "the pipeline file is empty")])
    if not isinstance(raw, dict):
        raise ConfigError([("(root)", f"expected a mapping of sections, got {type(raw).__name__}")])
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as err:
        problems = []
        for e in err.errors(include_url=False):
            msg = e["msg"]
            if e["type"] == "extra_forbidden":
                msg = "unknown key"
            elif e.get("input") is not None and e["type"] not in ("missing",):
                shown = repr(e["input"])
                msg = f"{msg} (got {shown[:60]})"
            problems.append((_loc(e), msg))
        raise ConfigError(problems) from None


def load_raw(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError([(str(path), "file not found")])
    if not path.is_file():
        raise ConfigError([(str(path), "not a file")])
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError([(str(path), f"cannot read: {err}")]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError([(f"{path}:{where}", f"YAML syntax error: {problem}")]) from None
    if raw is None:
        raise ConfigError([(str(path), "the pipeline file is empty")])
    return raw


def load_config(path: Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read, override and validate a pipeline file. Relative paths inside stay relative to the cwd;
    custom model factories are also looked for in the pipeline file's folder."""
    raw = load_raw(path)
    if isinstance(raw, dict) and overrides:
        raw = apply_overrides(raw, overrides)
    cfg = validate_config(raw)
    CustomSpec.anchor_all(cfg, Path(path).resolve().parent)
    return cfg

"""Config models of the distillation loss terms, one per method (a discriminated union on `method`).

The options of each model are exactly the keyword options of the term class of the same
`method` in `compresskit.distill` (a test checks names and defaults agree). Default weights of
the feature and relation terms are the values the reference re-implementations use on CIFAR-100
(a ResNet teacher, a small student); they are a starting point, not a tuned setting for every
pair. Fields named `student` / `teacher` hold module paths (a string, or a list where a method
reads several layers); `module_paths()` lists them for the pre-flight check. This module imports
no torch.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["LossTerm", "TEACHER_FREE", "TERM_SPECS", "TermSpec"]

_STUDENT = "Student module path whose output is read, e.g. features.6 (see model.named_modules())."
_TEACHER = "Teacher module path whose output is read, e.g. layers.1."
_WEIGHT = "Weight of this term in the sum."


class TermSpec(BaseModel):
    """Base of the term configs: `method` and `weight` are common to all."""

    model_config = ConfigDict(extra="forbid", validate_default=True, strict=True)

    def module_paths(self) -> list[tuple[str, str, str]]:
        """(field, side, path) of every module path the term names; side is student or teacher."""
        out = []
        for name in ("student", "teacher"):
            value = getattr(self, name, None)
            for path in [value] if isinstance(value, str) else (value or []):
                out.append((name, name, path))
        return out


# ------------------------------------------------------------------ logit-based

class CETerm(TermSpec):
    method: Literal["ce"] = Field(description="Cross-entropy on the hard labels.")
    weight: float = Field(1.0, ge=0.0, description=_WEIGHT)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="Label smoothing.")


class KDTerm(TermSpec):
    method: Literal["kd"] = Field(description="Hinton KD: T^2 * KL(softmax(t/T) || softmax(s/T)).")
    weight: float = Field(0.9, ge=0.0, description="Weight of the soft-target term (the hard-label term is a separate 'ce' term).")
    temperature: float = Field(4.0, gt=0.0, le=100.0, description="Softmax temperature T.")


class DKDTerm(TermSpec):
    method: Literal["dkd"] = Field(description="Decoupled KD (Zhao et al. 2022): alpha * TCKD + beta * NCKD.")
    weight: float = Field(1.0, ge=0.0, description=_WEIGHT)
    alpha: float = Field(1.0, ge=0.0, description="Weight of the target-class part (TCKD).")
    beta: float = Field(8.0, ge=0.0, description="Weight of the non-target-class part (NCKD).")
    temperature: float = Field(4.0, gt=0.0, le=100.0, description="Softmax temperature T (both parts are scaled by T^2).")
    warmup_epochs: float = Field(0.0, ge=0.0, description="Ramp the term's weight linearly from 0 over this many epochs (the paper: 20 of 240).")


class DISTTerm(TermSpec):
    method: Literal["dist"] = Field(description="DIST (Huang et al. 2022): Pearson-correlation relations between predictions.")
    weight: float = Field(1.0, ge=0.0, description=_WEIGHT)
    beta: float = Field(1.0, ge=0.0, description="Weight of the inter-class relation (per sample, across classes).")
    gamma: float = Field(1.0, ge=0.0, description="Weight of the intra-class relation (per class, across the batch).")
    temperature: float = Field(1.0, gt=0.0, le=100.0, description="Softmax temperature (the loss is scaled by T^2).")


class EnsembleTerm(TermSpec):
    method: Literal["ensemble"] = Field(description="KD from an ensemble of teachers (teacher.ensemble): T^2 * KL(mean_k softmax(t_k/T) || softmax(s/T)).")
    weight: float = Field(0.9, ge=0.0, description=_WEIGHT)
    temperature: float = Field(4.0, gt=0.0, le=100.0, description="Softmax temperature T.")


class CSKDTerm(TermSpec):
    method: Literal["cskd"] = Field(description="Class-wise self-KD (Yun et al. 2020): match the prediction on another sample of the same class.")
    weight: float = Field(1.0, ge=0.0, description=_WEIGHT)
    temperature: float = Field(4.0, gt=0.0, le=100.0, description="Softmax temperature T.")


# ------------------------------------------------------------------ feature-based

class FitNetTerm(TermSpec):
    method: Literal["fitnet"] = Field(description="FitNet hint: MSE between a regressed student feature and a teacher feature.")
    weight: float = Field(1.0, ge=0.0, description=_WEIGHT)
    student: str = Field(min_length=1, description=_STUDENT)
    teacher: str = Field(min_length=1, description=_TEACHER)


class ATTerm(TermSpec):
    method: Literal["at"] = Field(description="Attention transfer: distance of normalized spatial attention maps.")
    weight: float = Field(100.0, ge=0.0, description=_WEIGHT)
    student: str = Field(min_length=1, description=_STUDENT)
    teacher: str = Field(min_length=1, description=_TEACHER)
    p: float = Field(2.0, gt=0.0, description="Exponent of the attention map (mean over channels of |f|^p).")


class FTTerm(TermSpec):
    method: Literal["ft"] = Field(description="Factor transfer (Kim et al. 2018): match the student's translated factor to the teacher's paraphrased factor.")
    weight: float = Field(200.0, ge=0.0, description=_WEIGHT)
    student: str = Field(min_length=1, description=_STUDENT)
    teacher: str = Field(min_length=1, description=_TEACHER)
    factor_rate: float = Field(0.5, gt=0.0, le=4.0, description="Factor channels as a fraction of the teacher's channels (the paper's k).")
    p: int = Field(1, ge=1, le=2, description="Norm of the factor distance (the paper uses 1).")
    paraphraser_steps: int = Field(200, ge=0, description="Steps at the start in which only the paraphraser is trained (reconstruction of the teacher feature).")


class VIDTerm(TermSpec):
    method: Literal["vid"] = Field(description="Variational information distillation (Ahn et al. 2019): Gaussian log-likelihood of the teacher feature given the student's.")
    weight: float = Field(1.0, ge=0.0, description=_WEIGHT)
    student: str = Field(min_length=1, description=_STUDENT)
    teacher: str = Field(min_length=1, description=_TEACHER)
    init_variance: float = Field(5.0, gt=0.0, description="Initial per-channel variance sigma^2.")
    min_variance: float = Field(1.0e-5, gt=0.0, description="Lower bound added to the variance.")

    @model_validator(mode="after")
    def _variance_above_floor(self) -> VIDTerm:
        if self.init_variance <= self.min_variance:
            raise ValueError("init_variance must be greater than min_variance")
        return self


class FSPTerm(TermSpec):
    method: Literal["fsp"] = Field(description="Flow of solution procedure (Yim et al. 2017): match Gram matrices between two layers.")
    weight: float = Field(50.0, ge=0.0, description=_WEIGHT)
    student: list[Annotated[str, Field(min_length=1)]] = Field(min_length=2, max_length=2, description="Two student module paths (the flow's start and end layer).")
    teacher: list[Annotated[str, Field(min_length=1)]] = Field(min_length=2, max_length=2, description="Two teacher module paths.")


class ABTerm(TermSpec):
    method: Literal["ab"] = Field(description="Activation boundaries (Heo et al. 2019): hinge loss that the student's neurons switch on and off with the teacher's.")
    weight: float = Field(1.0, ge=0.0, description=_WEIGHT)
    student: str = Field(min_length=1, description="Student module path; tap the pre-activation (e.g. a BatchNorm before ReLU).")
    teacher: str = Field(min_length=1, description="Teacher module path; tap the pre-activation.")
    margin: float = Field(1.0, gt=0.0, description="Margin mu of the hinge.")


class CRDTerm(TermSpec):
    method: Literal["crd"] = Field(description="Contrastive representation distillation (Tian et al. 2020), negatives from a memory bank.")
    weight: float = Field(0.8, ge=0.0, description=_WEIGHT)
    student: str = Field(min_length=1, description=_STUDENT)
    teacher: str = Field(min_length=1, description=_TEACHER)
    embed_dim: int = Field(128, ge=2, le=4096, description="Dimension of the projected, normalised embeddings.")
    temperature: float = Field(0.07, gt=0.0, le=10.0, description="Contrast temperature.")
    memory_size: int = Field(4096, ge=1, le=1_000_000, description="Negatives kept in each memory bank (a queue of past embeddings).")


# ------------------------------------------------------------------ relation-based

class SPTerm(TermSpec):
    method: Literal["sp"] = Field(description="Similarity-preserving KD (Tung & Mori 2019): match the batch's normalised similarity matrices.")
    weight: float = Field(3000.0, ge=0.0, description=_WEIGHT)
    student: str = Field(min_length=1, description=_STUDENT)
    teacher: str = Field(min_length=1, description=_TEACHER)


class RKDTerm(TermSpec):
    method: Literal["rkd"] = Field(description="Relational KD (Park et al. 2019): distance-wise and angle-wise relations of embeddings.")
    weight: float = Field(1.0, ge=0.0, description=_WEIGHT)
    student: str = Field(min_length=1, description=_STUDENT)
    teacher: str = Field(min_length=1, description=_TEACHER)
    distance_weight: float = Field(25.0, ge=0.0, description="Weight of the distance-wise loss.")
    angle_weight: float = Field(50.0, ge=0.0, description="Weight of the angle-wise loss.")


class PKTTerm(TermSpec):
    method: Literal["pkt"] = Field(description="Probabilistic knowledge transfer (Passalis & Tefas 2018): KL of cosine-similarity distributions.")
    weight: float = Field(30000.0, ge=0.0, description=_WEIGHT)
    student: str = Field(min_length=1, description=_STUDENT)
    teacher: str = Field(min_length=1, description=_TEACHER)


class CCTerm(TermSpec):
    method: Literal["cc"] = Field(description="Correlation congruence (Peng et al. 2019): match kernel correlations between samples of embeddings.")
    weight: float = Field(0.02, ge=0.0, description=_WEIGHT)
    student: str = Field(min_length=1, description=_STUDENT)
    teacher: str = Field(min_length=1, description=_TEACHER)
    embed_dim: int = Field(128, ge=2, le=4096, description="Both features are projected (linear) to this dimension.")
    gamma: float = Field(0.4, gt=0.0, description="Gaussian RBF kernel parameter.")
    order: int = Field(2, ge=0, le=8, description="Order P of the kernel's Taylor expansion.")


class NSTTerm(TermSpec):
    method: Literal["nst"] = Field(description="Neuron selectivity transfer (Huang & Wang 2017): MMD between the spatial activation distributions.")
    weight: float = Field(50.0, ge=0.0, description=_WEIGHT)
    student: str = Field(min_length=1, description=_STUDENT)
    teacher: str = Field(min_length=1, description=_TEACHER)
    kernel: Literal["poly", "linear", "gaussian"] = Field("poly", description="MMD kernel (the paper's best: polynomial, d=2, c=0).")


# ------------------------------------------------------------------ schemes

class DMLTerm(TermSpec):
    method: Literal["dml"] = Field(description="Deep mutual learning (Zhang et al. 2018): the student and its peers learn from each other; the peers are dropped at export.")
    weight: float = Field(1.0, ge=0.0, description=_WEIGHT)
    peers: int = Field(1, ge=1, le=8, description="Extra peers (copies of the student architecture, freshly initialised), trained alongside.")
    temperature: float = Field(1.0, gt=0.0, le=100.0, description="Softmax temperature of the mutual KL terms.")


class BYOTTerm(TermSpec):
    method: Literal["byot"] = Field(description="Be your own teacher (Zhang et al. 2019): auxiliary heads on intermediate stages learn from the deepest; heads are dropped at export.")
    weight: float = Field(1.0, ge=0.0, description=_WEIGHT)
    student: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1, description="Student module paths of the intermediate stages that get a head.")
    temperature: float = Field(3.0, gt=0.0, le=100.0, description="Softmax temperature of the KD from the deepest classifier.")
    alpha: float = Field(0.3, ge=0.0, le=1.0, description="Share of KD in each head's loss (1 - alpha is its cross-entropy).")
    feature_weight: float = Field(0.03, ge=0.0, description="Weight of the L2 hint from the deepest feature to each head's feature.")


class DDGSDTerm(TermSpec):
    method: Literal["ddgsd"] = Field(description="Data-distortion guided self-distillation (Xu & Liu 2019): two distorted views teach each other.")
    weight: float = Field(1.0, ge=0.0, description=_WEIGHT)
    student: str | None = Field(None, description="Student module path for the MMD of features between the views (none: logits only).")
    temperature: float = Field(1.0, gt=0.0, le=100.0, description="Softmax temperature of the mutual KL between the views.")
    mmd_weight: float = Field(0.005, ge=0.0, description="Weight of the feature MMD between the views.")
    crop_padding: int = Field(4, ge=0, le=32, description="Distortion: random crop after zero-padding by this many pixels.")
    noise_std: float = Field(0.1, ge=0.0, le=5.0, description="Distortion: Gaussian noise added to the normalised image.")


class DAFLTerm(TermSpec):
    method: Literal["dafl"] = Field(description="Data-free KD (Chen et al. 2019, DAFL): a generator trained against the teacher replaces the training images.")
    weight: float = Field(1.0, ge=0.0, description=_WEIGHT)
    teacher: str | None = Field(None, description="Teacher module path whose output feeds the classifier (for the activation loss; none: not used).")
    latent_dim: int = Field(100, ge=1, le=4096, description="Generator input noise dimension.")
    generator_lr: float = Field(1.0e-3, gt=0.0, le=1.0, description="Adam learning rate of the generator.")
    onehot_weight: float = Field(1.0, ge=0.0, description="Weight of the one-hot loss (teacher confident on generated images).")
    activation_weight: float = Field(0.1, ge=0.0, description="Weight of the activation loss (large teacher features).")
    entropy_weight: float = Field(5.0, ge=0.0, description="Weight of the information-entropy loss (classes balanced over the batch).")
    temperature: float = Field(1.0, gt=0.0, le=100.0, description="Softmax temperature of the student's KD on generated images.")


_ALL = (CETerm, KDTerm, DKDTerm, DISTTerm, EnsembleTerm, CSKDTerm,
        FitNetTerm, ATTerm, FTTerm, VIDTerm, FSPTerm, ABTerm, CRDTerm,
        SPTerm, RKDTerm, PKTTerm, CCTerm, NSTTerm,
        DMLTerm, BYOTTerm, DDGSDTerm, DAFLTerm)

LossTerm = Annotated[
    CETerm | KDTerm | DKDTerm | DISTTerm | EnsembleTerm | CSKDTerm
    | FitNetTerm | ATTerm | FTTerm | VIDTerm | FSPTerm | ABTerm | CRDTerm
    | SPTerm | RKDTerm | PKTTerm | CCTerm | NSTTerm
    | DMLTerm | BYOTTerm | DDGSDTerm | DAFLTerm,
    Field(discriminator="method"),
]

TERM_SPECS: dict[str, type[TermSpec]] = {cls.model_fields["method"].annotation.__args__[0]: cls for cls in _ALL}
"""Every term config model by its method name."""

TEACHER_FREE = frozenset({"ce", "cskd", "dml", "byot", "ddgsd"})
"""Methods that need no teacher (self-distillation and mutual learning)."""

"""The training objectives: rate-distortion for people (CompressAI), and the paper's surrogate losses.

- ``rd_loss``: R + λ·255²·MSE(x, x̂), CompressAI's ``RateDistortionLoss`` (R in bits per pixel); with a gain map,
  the MSE weighs each pixel by its position's λ (``weighted_mse``).
- ``distillation``: L_dist = MSE(C'(T(y_hat)), C(x)) (paper eq. 1) on the CLIP output the neck targets;
  ``weighted_distillation``: Σ_i w_i · MSE over several outputs i (one neck for several MLLM families).
- ``zero_shot_cross_entropy``: softmax over logit_scale × cosine(image embedding, class text embeddings)
  against the true class (§3.4, the warm-up loss; form ``cosine``), or, as the authors' code computes it (their
  ``ClipClsloss``; form ``dot``), over the raw dot product of the unnormalised image embedding with the unit class
  weights, without a logit scale.
- The joint objective of (d2)/(d3) (Table 1), R + λ(γ·d_recon + β·L_dist), with d_recon = MSE(x, x̂)
  on [0, 1] pixels. Default γ = 255² makes β = 0 the codec's own RD loss (same λ); β = γ/60 is the paper's
  γ:β = 60:1. (d3) has no reconstruction: γ = 0, the same β, so R + λ·β·L_dist. The paper writes (d3) as
  R + λ·L_dist, but its L_dist has no stated scale and λ is ELIC's (paired with 255²·MSE): with β = 1 the rate term
  outweighs a feature MSE of about 1e-2 by orders of magnitude, so d3 keeps d2's distillation weight β and
  differs from d2 only by dropping the reconstruction term. ``beta=1`` is the paper's literal form.
- ``rank_loss`` (``train vbr``, arXiv 2407.17060's token term): the gap between the spectral entropies (log effective
  ranks, ``token_entropy``) of the decoded image's tokens and the original's.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from comneck_cli.errors import ComneckError

# λ per quality level: CompressAI's zoo table (MSE models, q1..q8), and ELIC's as the ComNeck paper trains it.
ZOO_LAMBDAS = (0.0018, 0.0035, 0.0067, 0.0130, 0.0250, 0.0483, 0.0932, 0.1800)
# The ComNeck paper (§4.1) trains its ELIC, the authors' ELIC_LLM (``elic-comneck``), at these four.
PAPER_ELIC_LAMBDAS = (0.004, 0.008, 0.016, 0.032)
LAMBDAS: dict[str, Sequence[float]] = {"elic2022-official": PAPER_ELIC_LAMBDAS, "elic-comneck": PAPER_ELIC_LAMBDAS}

PIXEL_SCALE = 255.0**2
GAMMA = PIXEL_SCALE
BETA = PIXEL_SCALE / 60.0


def default_lambda(codec: str, quality: int) -> float:
    """λ for a codec's quality level (ELIC: the paper's four; others: CompressAI's zoo table)."""
    table = LAMBDAS.get(codec, ZOO_LAMBDAS)
    if not 1 <= quality <= len(table):
        raise ComneckError(f"no default λ for {codec} quality {quality}; pass `lmbda`", params=("lmbda",))
    return float(table[quality - 1])


def weighted_mse(x_hat: Tensor, x: Tensor, weights: Tensor | None = None) -> Tensor:
    """MSE(x, x̂) in float32, or mean(w·(x − x̂)²) with per-pixel weights w (B, 1, H, W): the distortion of a
    spatially varying gain, each pixel at its own position's λ relative to the rate's (``gainmaps``)."""
    if weights is None:
        return F.mse_loss(x_hat.float(), x.float())
    return (weights * (x_hat.float() - x.float()).square()).mean()


def rd_loss(bpp: Tensor, x_hat: Tensor, x: Tensor, lmbda: float,
            weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(R + λ·255²·D, MSE), float32; D is the MSE, or with per-pixel ``weights`` ``weighted_mse``."""
    mse = F.mse_loss(x_hat.float(), x.float())
    distortion = mse if weights is None else weighted_mse(x_hat, x, weights)
    return bpp + lmbda * PIXEL_SCALE * distortion, mse


def distillation(student: Tensor, teacher: Tensor) -> Tensor:
    """L_dist = MSE(C'(T(y_hat)), C(x)), float32."""
    return F.mse_loss(student.float(), teacher.float())


def weighted_distillation(students: Sequence[Tensor], teachers: Sequence[Tensor],
                          weights: Sequence[float]) -> tuple[Tensor, list[Tensor]]:
    """(Σ_i w_i · MSE(student_i, teacher_i), [each MSE]), float32; one target of weight 1 is ``distillation``."""
    if not len(students) == len(teachers) == len(weights) > 0:
        raise ValueError(f"{len(students)} student, {len(teachers)} teacher outputs and {len(weights)} weights")
    parts = [distillation(s, t) for s, t in zip(students, teachers)]
    total = weights[0] * parts[0]
    for weight, part in zip(weights[1:], parts[1:]):
        total = total + weight * part
    return total, parts


CE_FORMS = ("cosine", "dot")


def zero_shot_cross_entropy(image_embedding: Tensor, text_embeddings: Tensor, logit_scale: Tensor | float,
                            labels: Tensor, form: str = "cosine") -> Tensor:
    """CLIP zero-shot classification loss against ``labels``: logits = scale · cos(image, class text) (``cosine``),
    or image · class text with the image embedding as it is and no scale (``dot``, the authors' code; the class
    weights are unit rows either way)."""
    if form not in CE_FORMS:
        raise ValueError(f"cross-entropy form {form!r} is not one of {', '.join(CE_FORMS)}")
    text = F.normalize(text_embeddings.float(), dim=-1)
    if form == "dot":
        return F.cross_entropy(image_embedding.float() @ text.T, labels)
    image = F.normalize(image_embedding.float(), dim=-1)
    return F.cross_entropy(torch.as_tensor(logit_scale, dtype=torch.float32) * image @ text.T, labels)


def token_entropy(tokens: Tensor) -> Tensor:
    """Per image, the spectral entropy H = -Σ_i p_i·log p_i (nats) of its tokens (B, P, D); exp(H) is their effective
    rank (Roy & Vetterli, 2007), 1 when every token is the same direction, min(P, D) when all are orthogonal.

    The tokens are centred over the P tokens (an offset every token shares tells them apart no better), and p_i are
    the eigenvalues (``torch.linalg.eigvalsh``) of their Gram matrix, the smaller of T·Tᵀ (P×P) and Tᵀ·T (D×D): the
    same non-zero eigenvalues, the squared singular values of T, divided by their sum (the Gram's trace) so they sum
    to 1. Float32, differentiable (eigenvalues have gradients even where they repeat; eigenvectors would not).
    """
    t = tokens.float()
    t = t - t.mean(dim=1, keepdim=True)
    gram = t @ t.transpose(1, 2) if t.shape[1] <= t.shape[2] else t.transpose(1, 2) @ t
    p = torch.linalg.eigvalsh(gram).clamp_min(0)
    p = p / p.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return -(p * p.clamp_min(1e-12).log()).sum(dim=-1)


def rank_loss(decoded: Sequence[Tensor], original: Sequence[Tensor]) -> Tensor:
    """L_rank = mean over layers and images of |H(tokens of x̂) - H(tokens of x)| (``token_entropy``), i.e. the
    distance between the log effective ranks: coding that blurs the tokens into fewer directions (or adds spurious
    ones) costs, so the decoded tokens stay as discriminative as the original's. Float32."""
    gaps = [(token_entropy(a) - token_entropy(b.detach())).abs().mean() for a, b in zip(decoded, original)]
    return sum(gaps) / len(gaps)


def joint_loss(bpp: Tensor, mse: Tensor | None, dist: Tensor, lmbda: float, gamma: float, beta: float) -> Tensor:
    """(d2)/(d3): R + λ(γ·MSE(x, x̂) + β·L_dist); ``mse`` None (d3: g_s unused) counts as zero."""
    recon = 0.0 if mse is None else gamma * mse
    return bpp + lmbda * (recon + beta * dist)

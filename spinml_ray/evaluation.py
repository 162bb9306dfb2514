"""Privacy and utility measures beyond the MI meter: SIM, cross-object MI, replication, membership inference.

Pure functions over arrays (images, embeddings, losses); no Ray, no model. Where they need an image
encoder (SIM, replication), they take its embeddings: which encoder made them is the caller's choice.

- SIM, as in SpinML: the mean cosine similarity between the embeddings of every synthetic image's
  segment and every real reference's segment of the same object; dSIM is a configuration's SIM less
  that of L0_L0 for the same request (how much closer to the user's images sharing made the data).
- Cross-object MI: how much the *target's* release tells about the *background* it was not meant to
  release, with the same normalisation as the per-object meter (`leakage.object_leakage`).
- Replication: for each synthetic image, its highest similarity to any real image (or to any
  released payload); the share above a threshold, the 95th percentile and the closest pairs.
- Membership inference: given a score per example that is higher for what an attacker believes was
  trained on (e.g. minus the model's loss), the ROC AUC and the true-positive rate at 1% false
  positives, as the membership-inference literature reports them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchmetrics.functional.classification import binary_auroc, binary_roc

from spinml_ray.leakage import object_leakage


def _unit_rows(embeddings: np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(embeddings, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{what}: expected a non-empty 2-D array of embeddings (one row each), got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{what}: embeddings must be finite")
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"{what}: an embedding of length zero has no direction")
    return array / norms


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of every row of `a` with every row of `b` (len(a) x len(b)), in one product."""
    left, right = _unit_rows(a, "a"), _unit_rows(b, "b")
    if left.shape[1] != right.shape[1]:
        raise ValueError(f"embeddings differ in length: {left.shape[1]} and {right.shape[1]}")
    return np.clip(left @ right.T, -1.0, 1.0)


def sim(synthetic: np.ndarray, references: np.ndarray) -> float:
    """SpinML's SIM for one object: the mean cosine similarity over all (synthetic, reference) pairs."""
    return float(cosine_matrix(synthetic, references).mean())


def dsim(config_sim: float, l0_l0_sim: float) -> float:
    """dSIM: a configuration's SIM less the L0_L0 configuration's, for the same request and object."""
    return float(config_sim - l0_l0_sim)


@dataclass(frozen=True)
class Replication:
    nearest: np.ndarray  # per synthetic image, its highest similarity to any reference
    above_threshold: float  # share of synthetic images whose nearest reference is above `threshold`
    p95: float  # 95th percentile of `nearest`
    closest: list[tuple[int, int, float]]  # (synthetic index, reference index, similarity), most similar first
    threshold: float


def replication(synthetic: np.ndarray, references: np.ndarray, threshold: float = 0.95, top: int = 5) -> Replication:
    """How close each synthetic image comes to copying a reference (or a released payload)."""
    similarity = cosine_matrix(synthetic, references)
    best = similarity.argmax(axis=1)
    nearest = similarity[np.arange(len(similarity)), best]
    order = np.argsort(-nearest, kind="stable")[:top]
    return Replication(nearest=nearest, above_threshold=float((nearest > threshold).mean()),
                       p95=float(np.percentile(nearest, 95)),
                       closest=[(int(i), int(best[i]), float(nearest[i])) for i in order], threshold=threshold)


def cross_object_leakage(target_rgb: np.ndarray, background_rgb: np.ndarray, raw_rgb: np.ndarray, level: str,
                         canny_low: float = 100, canny_high: float = 200,
                         released_rgb: np.ndarray | None = None) -> float:
    """Normalised MI between what the target's level shares and the background object:
    ``MI(shared(target), background) / MI(raw, raw)``, letterboxed as the per-object meter is.

    `target_rgb` and `background_rgb` hold each object's pixels (black elsewhere), `raw_rgb` the image.
    L0 shares nothing (0.0); `released_rgb` (L2) is the target as released when it differs (faces blurred)."""
    return object_leakage(target_rgb, raw_rgb, level, canny_low, canny_high, released_rgb, about_rgb=background_rgb)


@dataclass(frozen=True)
class MembershipInference:
    auc: float
    tpr_at_1_fpr: float  # true-positive rate at a false-positive rate of at most 1%
    members: int
    non_members: int


def membership_inference(member_scores: np.ndarray, non_member_scores: np.ndarray,
                         max_fpr: float = 0.01) -> MembershipInference:
    """ROC AUC and TPR at `max_fpr` of an attack that scores examples higher when it believes they were
    trained on (for a loss-threshold attack: minus the loss). 0.5 AUC and ~`max_fpr` TPR is chance."""
    members = np.asarray(member_scores, dtype=np.float64).ravel()
    others = np.asarray(non_member_scores, dtype=np.float64).ravel()
    if len(members) == 0 or len(others) == 0:
        raise ValueError("membership inference needs at least one member and one non-member score")
    if not (np.isfinite(members).all() and np.isfinite(others).all()):
        raise ValueError("membership inference scores must be finite")
    scores = torch.from_numpy(np.concatenate([members, others]))
    truth = torch.cat([torch.ones(len(members), dtype=torch.long), torch.zeros(len(others), dtype=torch.long)])
    fpr, tpr, _ = binary_roc(scores, truth)
    return MembershipInference(auc=float(binary_auroc(scores, truth)), tpr_at_1_fpr=float(tpr[fpr <= max_fpr].max()),
                               members=len(members), non_members=len(others))


def loss_threshold_attack(member_losses: np.ndarray, non_member_losses: np.ndarray) -> MembershipInference:
    """The plain loss-threshold attack: lower loss, more likely a member."""
    return membership_inference(-np.asarray(member_losses, dtype=np.float64),
                                -np.asarray(non_member_losses, dtype=np.float64))


def logit_confidence(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per example, log(p / (1 - p)) of the true label's softmax probability p: the scale on which a
    model's confidence is close to Gaussian across models (what LiRA fits), computed without overflow."""
    from scipy.special import logsumexp

    z = np.asarray(logits, dtype=np.float64)
    rows = np.arange(len(z))
    y = np.asarray(labels).astype(int)
    others = z.copy()
    others[rows, y] = -np.inf
    return z[rows, y] - logsumexp(others, axis=1)  # log p - log(1 - p), each over the same normaliser


def lira_scores(target: np.ndarray, shadow: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """LiRA (the likelihood-ratio attack of Carlini et al.), per example: the log-likelihood of its
    confidence under the attacked model (`target`, n) under a Gaussian fit to its confidences in the
    shadow models that trained on it, less that under those that did not. `shadow` (k x n) holds the
    confidences under k shadow models and `inside` (k x n) whether each trained on each example. With
    few shadows the variance is shared across examples (the fixed-variance variant); an example that
    no shadow saw in (or out) takes the mean over all examples in (or out). Higher: more likely a member."""
    target = np.asarray(target, dtype=np.float64)
    shadow = np.asarray(shadow, dtype=np.float64)
    inside = np.asarray(inside, dtype=bool)
    if shadow.shape != inside.shape or shadow.shape[1:] != target.shape:
        raise ValueError(f"shapes differ: target {target.shape}, shadow {shadow.shape}, inside {inside.shape}")
    if not inside.any() or inside.all():
        raise ValueError("LiRA needs shadow models both with and without the examples")

    def fit(mask: np.ndarray) -> tuple[np.ndarray, float]:
        counts = mask.sum(axis=0)
        overall = shadow[mask].mean()
        means = np.where(counts > 0, (shadow * mask).sum(axis=0) / np.maximum(counts, 1), overall)
        spread = float(np.sqrt(((shadow - means)[mask] ** 2).mean())) if mask.sum() > 1 else 1.0
        return means, max(spread, 1e-3)

    mean_in, sd_in = fit(inside)
    mean_out, sd_out = fit(~inside)
    log_in = -0.5 * ((target - mean_in) / sd_in) ** 2 - np.log(sd_in)
    log_out = -0.5 * ((target - mean_out) / sd_out) ** 2 - np.log(sd_out)
    return log_in - log_out

"""Losses of the SimCLRv2 recipe: NT-Xent (docs/method.md §3) and distillation (docs/method.md §6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from simclrv2.distributed import gather_with_grad
from simclrv2.runtime import ieee_fp32_matmul


class NTXentLoss(nn.Module):
    """Normalised temperature-scaled cross entropy of SimCLR (docs/method.md §3).

    ``loss(z_a, z_b, extra_negatives=None)`` with ``z_a``, ``z_b``: [N, d], the projections of the
    two views of the same N images (row i of each is a positive pair). With u = z/||z||,
    s(i, j) = u_i·u_j / τ, and for each of the 2N anchors i with positive p(i):

        l_i = -log( exp s(i, p(i)) / Σ_{k ≠ i} exp s(i, k) )

    where k runs over the other 2N-1 views of the (global) batch plus, if given, the K rows of
    ``extra_negatives`` [K, d] (a memory queue; normalised here too, no gradient). Returns the mean
    of l_i over the 2N anchors: a scalar. (The official TF code returns the sum of the two
    directions' means, i.e. 2x this value.)

    ``keys=(k_a, k_b)`` (each [N, d], no gradient; e.g. an EMA network's projections of the same
    views) makes the candidates the keys instead of the anchors: s(i, k) = u_i·v_k / τ with v the
    normalised keys, positive v_p(i), and k ≠ i excludes the anchor's own view's key. Use it with a
    queue of such keys: the positive and every negative then come from the same network. (Online
    positives against EMA negatives let the encoder lower the loss by telling the two networks'
    outputs apart: measured, the online embeddings bunched together, mean cosine 0.66 between
    different images, orthogonal to the whole queue.)

    ``gather_distributed=True``: under torch.distributed, both views of all ranks are gathered as
    candidates (gradients flow to each rank's own slice); the loss is the mean over this rank's
    anchors, so that DDP's gradient average equals one process on the global batch.
    """

    def __init__(self, temperature: float = 0.1, gather_distributed: bool = False):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"{type(self).__name__}: temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.gather_distributed = gather_distributed

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor, extra_negatives: torch.Tensor | None = None,
                keys: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if z_a.shape != z_b.shape or z_a.dim() != 2:
            raise ValueError(f"NTXentLoss expects two [N, d] tensors of the same shape, got {tuple(z_a.shape)} and {tuple(z_b.shape)}")
        if keys is not None and (keys[0].shape != z_a.shape or keys[1].shape != z_a.shape):
            raise ValueError(f"NTXentLoss keys must be two [N, d] tensors shaped like z_a {tuple(z_a.shape)}")
        # similarities in IEEE fp32 even under autocast or TF32: tau = 0.1 magnifies their errors ten times
        with torch.autocast(z_a.device.type, enabled=False), ieee_fp32_matmul():
            return self._loss(z_a, z_b, extra_negatives, keys)

    def _loss(self, z_a: torch.Tensor, z_b: torch.Tensor, extra_negatives: torch.Tensor | None,
              keys: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        n = z_a.shape[0]
        u = F.normalize(torch.cat([z_a, z_b]).float(), dim=1)  # [2N, d]: anchors of this rank
        if keys is None:
            u_a, u_b = u[:n], u[n:]
        else:
            u_a, u_b = F.normalize(torch.cat(keys).detach().float(), dim=1).chunk(2)
        if self.gather_distributed:
            all_a, offset = gather_with_grad(u_a)
            all_b, _ = gather_with_grad(u_b)
        else:
            all_a, all_b, offset = u_a, u_b, 0
        m = all_a.shape[0]
        candidates = torch.cat([all_a, all_b])  # [2M, d]
        logits = u @ candidates.T / self.temperature  # [2N, 2M]
        idx = torch.arange(n, device=u.device) + offset
        self_cols = torch.cat([idx, idx + m])
        positive_cols = torch.cat([idx + m, idx])
        # -inf on each anchor's own column (in place: neither the division nor the product keeps its output for backward)
        logits.index_put_((torch.arange(2 * n, device=u.device), self_cols), logits.new_full((), float("-inf")))
        if extra_negatives is not None and extra_negatives.numel():
            q = F.normalize(extra_negatives.detach().float(), dim=1)
            logits = torch.cat([logits, u @ q.T / self.temperature], dim=1)
        return F.cross_entropy(logits, positive_cols)


def part_of_mean(mean: torch.Tensor, rows: int, batch_rows: int) -> torch.Tensor:
    """A mean over ``rows`` rows as their part of the mean over the ``batch_rows`` rows of their
    batch (gradient accumulation: summed over the micro-batches, the batch's mean); ``mean``
    itself when the rows are the whole batch."""
    return mean if rows == batch_rows else mean * (rows / batch_rows)


class DistillationLoss(nn.Module):
    """Distillation with temperature τ and an optional mix with the true labels (docs/method.md §6).

    ``loss(student_logits, teacher_logits, labels=None)``; logits [N, C], labels [N] int (-1 = unlabeled).

        L_distill = mean_x [ -Σ_y P_T(y|x; τ) log P_S(y|x; τ) ],  P(y|x; τ) = softmax(logits / τ)
        L = (1 - α) · CE(student_logits, labels) + α · L_distill

    CE is the mean over the labelled rows (label >= 0); with α = 1 (default) labels are unused.
    ``num_labelled`` (optional) replaces this batch's count of labelled rows as the CE
    denominator (multi-process training passes the global count / processes, so that the
    average over processes is the global batch's mean). ``batch_rows`` (gradient accumulation): the
    rows are a micro-batch of a batch of that many rows, and the distillation term is their part of
    its mean (:func:`part_of_mean`; ``num_labelled`` is then the whole batch's count).
    The teacher is fixed: no gradient flows into ``teacher_logits``.
    """

    def __init__(self, temperature: float = 1.0, alpha: float = 1.0):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"{type(self).__name__}: temperature must be > 0, got {temperature}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"DistillationLoss: alpha must be in [0, 1], got {alpha}")
        self.temperature = temperature
        self.alpha = alpha

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None,
                num_labelled: torch.Tensor | None = None, batch_rows: int | None = None) -> torch.Tensor:
        t = self.temperature
        n = student_logits.shape[0]
        p_teacher = F.softmax(teacher_logits.detach().float() / t, dim=1)
        log_p_student = F.log_softmax(student_logits.float() / t, dim=1)
        loss = part_of_mean(-(p_teacher * log_p_student).sum(dim=1).mean(), n, batch_rows or n)
        if self.alpha < 1.0:
            if labels is None:
                raise ValueError("DistillationLoss with alpha < 1 needs labels")
            labelled = labels >= 0
            if num_labelled is not None:
                ce_rows = F.cross_entropy(student_logits.float(), labels.clamp_min(0), reduction="none")
                ce = (ce_rows * labelled).sum() / num_labelled
            else:
                ce = (
                    F.cross_entropy(student_logits.float()[labelled], labels[labelled])
                    if labelled.any()
                    else student_logits.sum() * 0.0
                )
            loss = (1.0 - self.alpha) * ce + self.alpha * loss
        return loss

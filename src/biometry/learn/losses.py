"""Losses that average over the labels present only (NaN = missing)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from biometry.learn.models import split_mean_logvar


def masked_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the present (non-NaN) labels; (B, T) each. 0 if none is present."""
    mask = ~torch.isnan(target)
    diff = torch.where(mask, pred - torch.nan_to_num(target), torch.zeros_like(pred))
    return diff.pow(2).sum() / mask.sum().clamp(min=1)


def masked_gaussian_nll(mean: torch.Tensor, logvar: torch.Tensor,
                        target: torch.Tensor) -> torch.Tensor:
    """Gaussian negative log-likelihood without the constant, over present labels only.

    ``0.5 * (s + exp(-s) (y - mu)^2)`` with ``s`` the log-variance, averaged over the non-NaN labels
    of the (B, T) batch; masked entries get exactly zero gradient.
    """
    mask = ~torch.isnan(target)
    y = torch.nan_to_num(target)
    per = 0.5 * (logvar + torch.exp(-logvar) * (y - mean).pow(2))
    per = torch.where(mask, per, torch.zeros_like(per))
    return per.sum() / mask.sum().clamp(min=1)


def compute_loss(output: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    """The configured loss of a raw network output (float32) against a (B, T) target batch."""
    output = output.float()
    if loss == "mse":
        return masked_mse(output, target)
    if loss == "gaussian_nll":
        mean, logvar = split_mean_logvar(output)
        return masked_gaussian_nll(mean, logvar, target)
    labels = torch.nan_to_num(target[:, 0], nan=-100.0).long()
    if bool((labels >= 0).any()):
        return F.cross_entropy(output, labels, ignore_index=-100)
    return output.sum() * 0.0



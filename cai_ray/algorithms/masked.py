"""Masked reductions and token log-probabilities: pure torch, no Ray, no I/O.

Shapes: B = batch, T = sequence length, N = selected tokens, H = hidden size, V = vocabulary.
"""

from __future__ import annotations

import torch


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `x` where `mask` is true. x, mask: same shape."""
    m = mask.to(x.dtype)
    return (x * m).sum() if dim is None else (x * m).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over the true entries of `mask` (0 where nothing is selected)."""
    m = mask.to(x.dtype)
    total = m.sum() if dim is None else m.sum(dim)
    return masked_sum(x, mask, dim) / total.clamp(min=1.0)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  eps: float = 1e-8) -> torch.Tensor:
    """Normalise the selected entries to unit variance (and zero mean when `shift_mean`);
    unselected entries are returned as they were."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, x)


def selected_token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) at selected positions only.

    logits: [N, V] from the LM head applied to the N selected hidden states; targets: [N].
    Projecting only where a loss is taken avoids a [B, T, V] logits tensor, which for a 49k
    vocabulary dominates the cost on CPU.
    """
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)

"""Losses of MPCViT: token-level knowledge distillation and the architecture penalty of the search."""
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy
from torch import nn

from ..layers.linearizable_mlp import LinearizableMlp
from ..reader import read_model

__all__ = ['TokenDistillationLoss', 'ArchitecturePenalty']


class TokenDistillationLoss(nn.Module):
    """MPCViT's token-level distillation from the all-Softmax teacher::

        loss = CE(softmax(teacher logits), student logits)            # soft cross-entropy, T = 1
             + kd_alpha · MSE(student tokens, teacher tokens)          # final-norm outputs, all tokens
             + task_loss(student logits, target)                       # hard labels (or Mixup targets)
    """

    def __init__(self, task_loss: nn.Module, kd_alpha: float = 1.0) -> None:
        """
        Args:
            task_loss: The hard-label loss (cross-entropy, label smoothing, or soft targets under Mixup).
            kd_alpha: Weight of the token MSE term.
        """
        super().__init__()
        self.task_loss = task_loss
        self.kd_alpha = kd_alpha
        self.soft_ce = SoftTargetCrossEntropy()

    def forward(
            self,
            student_logits: torch.Tensor,
            student_tokens: torch.Tensor,
            teacher_logits: torch.Tensor,
            teacher_tokens: torch.Tensor,
            target: torch.Tensor,
    ) -> Dict[str, torch.Tensor]:
        """The total loss and its three terms (``loss``, ``soft``, ``tokens``, ``task``)."""
        soft = self.soft_ce(student_logits, teacher_logits.detach().float().softmax(-1))
        tokens = F.mse_loss(student_tokens.float(), teacher_tokens.detach().float())
        task = self.task_loss(student_logits, target)
        return dict(loss=soft + self.kd_alpha * tokens + task, soft=soft, tokens=tokens, task=task)


class ArchitecturePenalty(nn.Module):
    """``λ · Σ_h c_h·|α_h| + λ_β · Σ_t c_t·|β_t|`` over a model's search-mode heads and MLPs.

    ``c_h`` is what head ``h`` saves by becoming Scaling and ``c_t`` what a token saves by losing its GeLU,
    in seconds of estimated secure latency (see :func:`timm_mpc.cost.head_costs`); without costs every
    weight is 1 and the penalty is the paper's plain L1.
    """

    def __init__(
            self,
            model: nn.Module,
            lam: float = 1e-5,
            lam_beta: float = 0.0,
            head_cost: Optional[float] = None,
            token_cost: Optional[float] = None,
    ) -> None:
        """
        Args:
            model: The supernet; its search-mode ``HeadKinds`` (α) and ``LinearizableMlp`` (β) are penalised.
            lam: λ for α.
            lam_beta: λ_β for β (MPCViT+); 0 leaves β unpenalised.
            head_cost: ``c_h`` (the same for every head of a model whose layers share a shape); None for 1.
            token_cost: ``c_t`` per token; None for 1.
        """
        super().__init__()
        parts = read_model(model)
        self.alphas = [m.alpha for _, m in parts.heads if m.searching]
        self.betas = [m.beta for _, m in parts.mlps if isinstance(m, LinearizableMlp) and m.searching]
        if not self.alphas and not self.betas:
            raise ValueError('the model has no search-mode heads or MLPs to penalise; create it with '
                             "attn_pattern='search' (and gelu_pattern='search' for MPCViT+)")
        self.lam, self.lam_beta = lam, lam_beta
        # normalise costs so that λ keeps the scale of the paper's plain L1 when costs are given
        self.head_weight = 1.0 if head_cost is None else head_cost / max(head_cost, token_cost or 0.0)
        self.token_weight = 1.0 if token_cost is None else token_cost / max(token_cost, head_cost or 0.0)

    def forward(self) -> torch.Tensor:
        total = sum(a.abs().sum() for a in self.alphas) * (self.lam * self.head_weight)
        if self.betas and self.lam_beta:
            total = total + sum(b.abs().sum() for b in self.betas) * (self.lam_beta * self.token_weight)
        return total

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep α and β in [0, 1] after an optimizer step (loading and binarizing require it)."""
        for p in self.alphas + self.betas:
            p.clamp_(0, 1)

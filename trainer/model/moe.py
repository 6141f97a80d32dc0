"""Llama-4 mixture of experts: sigmoid top-k router, routed experts, one always-on shared expert.

Shape legend: T tokens, D model dim, F expert FFN dim, E experts, K experts per token,
R = T * K routed token copies.

Llama 4 semantics (checked against the public reference): the router is a bias-free linear layer;
top-k is taken on the logits; the chosen expert's score is sigmoid(logit) and multiplies the
expert's INPUT, not its output; a shared expert of the same width always runs, ungated:
out = shared(x) + sum_k expert_k(score_k * x). Dropless: every token copy reaches its expert.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.model.config import ModelConfig
from trainer.model.numerics import upcast


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x). Dense layers and the shared expert."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def init_weights(self, std: float, out_std: float) -> None:
        for linear, s in ((self.w1, std), (self.w3, out_std), (self.w2, out_std)):
            nn.init.trunc_normal_(linear.weight, std=s, a=-3 * s, b=3 * s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def grouped_matmul(
    x_RD: torch.Tensor, w_EDF: torch.Tensor, offsets_E: torch.Tensor
) -> torch.Tensor:
    """Rows [offsets[e-1], offsets[e]) of x times w[e], for every expert e.

    One `torch._grouped_mm` kernel for the dtypes it takes; float64 (used by reference tests)
    loops over experts, never over tokens.
    """
    if x_RD.dtype not in _GROUPED_MM_DTYPES:
        counts = torch.diff(offsets_E, prepend=offsets_E.new_zeros(1)).tolist()
        pieces = torch.split(x_RD, counts)
        return torch.cat([piece @ w for piece, w in zip(pieces, w_EDF, strict=True)])
    out = torch._grouped_mm(x_RD, w_EDF, offs=offsets_E)
    if out.requires_grad:
        # The CPU kernel's backward rejects stride-0 gradients (as produced by `.sum()`).
        out.register_hook(lambda grad: grad.contiguous())
    return out


class GroupedExperts(nn.Module):
    """E SwiGLU experts as stacked weights, run with grouped GEMMs (no loop over tokens)."""

    def __init__(self, n_experts: int, dim: int, hidden_dim: int):
        super().__init__()
        self.w1_EDF = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))
        self.w3_EDF = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))
        self.w2_EFD = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))

    def init_weights(self, std: float, out_std: float) -> None:
        for w, s in ((self.w1_EDF, std), (self.w3_EDF, out_std), (self.w2_EFD, out_std)):
            nn.init.trunc_normal_(w, std=s, a=-3 * s, b=3 * s)

    def forward(self, x_RD: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        """x_RD holds the token copies sorted by expert, tokens_per_expert_E[e] of them for e."""
        offsets = torch.cumsum(tokens_per_expert_E, 0, dtype=torch.int32)
        w1, w3, w2 = (w.to(x_RD.dtype) for w in (self.w1_EDF, self.w3_EDF, self.w2_EFD))
        hidden_RF = F.silu(grouped_matmul(x_RD, w1, offsets)) * grouped_matmul(x_RD, w3, offsets)
        return grouped_matmul(hidden_RF, w2, offsets)


class Router(nn.Module):
    """Top-k over logits (plus a routing-only balance bias); score = sigmoid(chosen logit)."""

    def __init__(self, dim: int, n_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(dim, n_experts, bias=False)
        # Aux-loss-free balancing (DeepSeek-V3): shifts which experts are chosen, never the scores.
        self.register_buffer("expert_bias", torch.zeros(n_experts), persistent=True)

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits_TE = self.gate(x_TD)
        choice_TE = logits_TE.detach() + self.expert_bias.to(logits_TE.dtype)
        experts_TK = torch.topk(choice_TE, self.top_k, dim=-1).indices
        scores_TK = torch.sigmoid(upcast(logits_TE.gather(1, experts_TK))).to(x_TD.dtype)
        return scores_TK, experts_TK, logits_TE


def load_balance_loss(logits_TE: torch.Tensor, experts_TK: torch.Tensor) -> torch.Tensor:
    """Switch-style E * sum_e f_e * P_e with P from normalised sigmoid affinities (DeepSeek-V3)."""
    n_experts = logits_TE.shape[-1]
    affinity_TE = torch.sigmoid(upcast(logits_TE))
    share_E = (affinity_TE / affinity_TE.sum(-1, keepdim=True)).mean(0)
    counts_E = torch.bincount(experts_TK.reshape(-1), minlength=n_experts).float()
    fraction_E = counts_E / experts_TK.numel()
    return n_experts * (fraction_E * share_E).sum()


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(upcast(logits_TE), dim=-1).square().mean()


class MoE(nn.Module):
    """Routed experts plus the shared expert; counts tokens per expert for balancing/metrics."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_experts, cfg.top_k
        self.aux_loss_coef, self.z_loss_coef = cfg.router_aux_loss_coef, cfg.router_z_loss_coef
        self.router = Router(cfg.dim, cfg.n_experts, cfg.top_k)
        self.experts = GroupedExperts(cfg.n_experts, cfg.dim, cfg.expert_ffn_dim)
        self.shared_expert = FeedForward(cfg.dim, cfg.expert_ffn_dim)
        # Summed over forwards until the trainer reads and resets them (see `pop_expert_load`).
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.n_experts), persistent=False)

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.trunc_normal_(self.router.gate.weight, std=std, a=-3 * std, b=3 * std)
        self.router.expert_bias.zero_()
        self.experts.init_weights(std, out_std)
        self.shared_expert.init_weights(std, out_std)

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the layer output and this layer's weighted router loss (a scalar)."""
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        scores_TK, experts_TK, logits_TE = self.router(x_TD)
        routed_TD = self.route(x_TD, scores_TK, experts_TK)
        out_TD = self.shared_expert(x_TD) + routed_TD
        return out_TD.view_as(x_BSD), self.router_loss(logits_TE, experts_TK)

    def route(
        self, x_TD: torch.Tensor, scores_TK: torch.Tensor, experts_TK: torch.Tensor
    ) -> torch.Tensor:
        """Sort token copies by expert, scale them by their score, run the experts, sum back."""
        experts_R = experts_TK.reshape(-1)
        order_R = torch.argsort(experts_R, stable=True)
        token_R = order_R // self.top_k
        tokens_per_expert_E = torch.bincount(experts_R, minlength=self.n_experts)
        with torch.no_grad():
            self.tokens_per_expert += tokens_per_expert_E.to(self.tokens_per_expert.dtype)
        routed_in_RD = x_TD[token_R] * scores_TK.reshape(-1)[order_R, None]
        routed_out_RD = self.experts(routed_in_RD, tokens_per_expert_E)
        return torch.zeros_like(x_TD).index_add(0, token_R, routed_out_RD.to(x_TD.dtype))

    def router_loss(self, logits_TE: torch.Tensor, experts_TK: torch.Tensor) -> torch.Tensor:
        loss = logits_TE.new_zeros((), dtype=torch.float32)
        if self.aux_loss_coef:
            loss = loss + self.aux_loss_coef * load_balance_loss(logits_TE, experts_TK)
        if self.z_loss_coef:
            loss = loss + self.z_loss_coef * router_z_loss(logits_TE)
        return loss

    def pop_expert_load(self) -> torch.Tensor:
        """Token copies each expert received since the last call; resets the counter."""
        load = self.tokens_per_expert.clone()
        self.tokens_per_expert.zero_()
        return load

    @torch.no_grad()
    def update_expert_bias(self, load_E: torch.Tensor, rate: float) -> None:
        """Raise the bias of under-loaded experts and lower it for over-loaded ones.

        `load_E` must be the load summed over every data-parallel rank, so that all replicas of
        this (unsharded) buffer take the same step and stay identical.
        """
        self.router.expert_bias += rate * torch.sign(load_E.mean() - load_E)

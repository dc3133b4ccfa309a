"""Batched, differentiable optimal transport between token sets and label embeddings.

Graph optimal transport (GOT; Chen et al., ICML 2020) mixes a Wasserstein distance W between
two point clouds and a Gromov–Wasserstein distance GW between their internal structures.
Both are solved here with IPOT, the inexact proximal point method of Xie et al. (UAI 2019),
on whole batches at once, so the loss stays on the device and costs a few small batched
matrix products per iteration. Marginals are uniform. Every function takes (B, n, m) cost
batches and returns one value per batch element.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TINY = 1e-30  # floor of the IPOT denominators, so an all-but-masked row never divides by 0


def cosine_cost(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity between the rows of ``x`` (B, n, d) and ``y`` (B, m, d): (B, n, m)."""
    return 1.0 - F.normalize(x, dim=-1) @ F.normalize(y, dim=-1).transpose(1, 2)


def threshold_cost(cost: torch.Tensor, fraction: float) -> torch.Tensor:
    """Set each matrix's entries below ``min + fraction * (max - min)`` to 0 (GOT's pruning of
    near matches: they cost nothing). ``fraction=0`` leaves the cost unchanged."""
    if fraction == 0:
        return cost
    low = cost.amin(dim=(1, 2), keepdim=True)
    high = cost.amax(dim=(1, 2), keepdim=True)
    return cost * (cost >= low + fraction * (high - low)).to(cost.dtype)


def ipot(cost: torch.Tensor, weight: torch.Tensor | None, beta: float, iterations: int) -> torch.Tensor:
    """The IPOT transport plan (B, n, m) between uniform marginals.

    Each iteration is one Sinkhorn projection of ``exp(-cost / beta) * weight * plan``, so the
    plan converges to an exact optimal plan, not an entropic one. A ``weight`` in (0, 1]
    (e.g. a learned mask) restricts transport: it acts as an extra cost ``-beta * log(weight)``.
    """
    _, n, m = cost.shape
    kernel = torch.exp(-(cost - cost.amin(dim=(1, 2), keepdim=True).detach()) / beta)
    if weight is not None:
        kernel = kernel * weight
    sigma = cost.new_full((cost.shape[0], m, 1), 1.0 / m)
    plan = torch.ones_like(cost)
    for _ in range(iterations):
        q = kernel * plan
        delta = (1.0 / n) / (q @ sigma).clamp_min(TINY)
        sigma = (1.0 / m) / (q.transpose(1, 2) @ delta).clamp_min(TINY)
        plan = delta * q * sigma.transpose(1, 2)
    return plan


def wasserstein(
    cost: torch.Tensor, weight: torch.Tensor | None, beta: float, iterations: int, detach_plan: bool = False
) -> torch.Tensor:
    """<cost, plan> per batch element with the IPOT plan. ``detach_plan`` lets the gradient
    flow through the cost only (the envelope-theorem gradient of an optimal plan)."""
    if detach_plan:
        with torch.no_grad():
            plan = ipot(cost, weight, beta, iterations)
    else:
        plan = ipot(cost, weight, beta, iterations)
    return (cost * plan).sum(dim=(1, 2))


def _gw_cost(c1: torch.Tensor, c2: torch.Tensor, plan: torch.Tensor) -> torch.Tensor:
    """The square-loss GW cost matrix at ``plan`` for uniform marginals (Peyré, Cuturi &
    Solomon, ICML 2016, Prop. 1): sum_kl (c1_ik - c2_jl)^2 plan_kl for every (i, j)."""
    rows = (c1**2).mean(dim=2, keepdim=True)
    cols = (c2**2).mean(dim=2).unsqueeze(1)
    return rows + cols - 2.0 * c1 @ plan @ c2.transpose(1, 2)


def gromov_wasserstein(
    c1: torch.Tensor,
    c2: torch.Tensor,
    beta: float,
    iterations: int,
    outer: int,
    detach_plan: bool = False,
) -> torch.Tensor:
    """Square-loss GW discrepancy between intra-set costs ``c1`` (B, n, n) and ``c2`` (B, m, m).

    Starting from the independent plan, each of ``outer`` steps linearises GW at the current
    plan and solves that transport problem with IPOT (the scheme of Chen et al., 2020).
    """
    b, n, m = c1.shape[0], c1.shape[1], c2.shape[1]

    def solve() -> torch.Tensor:
        plan = c1.new_full((b, n, m), 1.0 / (n * m))
        for _ in range(outer):
            plan = ipot(_gw_cost(c1, c2, plan), None, beta, iterations)
        return plan

    if detach_plan:
        with torch.no_grad():
            plan = solve()
    else:
        plan = solve()
    return (_gw_cost(c1, c2, plan) * plan).sum(dim=(1, 2))


def got_distance(
    x: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor | None = None,
    *,
    gw_share: float = 0.9,
    threshold: float = 0.1,
    beta: float = 0.5,
    iterations: int = 30,
    gw_outer: int = 5,
    detach_plan: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(GOT, W, GW) per batch element between point clouds ``x`` (B, n, d) and ``y`` (B, m, d).

    Costs are cosine distances, pruned by :func:`threshold_cost`; ``weight`` (B, n, m)
    restricts W's transport; GOT = gw_share * GW + (1 - gw_share) * W. ``detach_plan`` applies
    to W; GW is always differentiated at its fixed plan (the gradient POT's
    ``gromov_wasserstein2`` gives), which spares the backward pass through its many iterations.
    """
    cross = threshold_cost(cosine_cost(x, y), threshold)
    w = wasserstein(cross, weight, beta, iterations, detach_plan)
    if gw_share == 0:
        gw = torch.zeros_like(w)
    else:
        c1 = threshold_cost(cosine_cost(x, x), threshold)
        c2 = threshold_cost(cosine_cost(y, y), threshold)
        gw = gromov_wasserstein(c1, c2, beta, iterations, gw_outer, detach_plan=True)
    return gw_share * gw + (1.0 - gw_share) * w, w, gw

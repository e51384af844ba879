"""Conditioner pieces shared by the flow families: dense networks, coupling masks, the circular
feature embedding and the permutation-equivariant attention conditioner over molecules.

- `mlp`: a dense network n_in -> hidden... -> n_out whose last layer may start at zero, so that a
  coupling conditioned by it starts at its raw = 0 map (the identity for every family here).
- `coupling_masks`: the alternating kept/transformed masks of a stack of couplings (Dinh et al.,
  "Density estimation using Real NVP", ICLR 2017).
- `circular_embedding`: kept features as the conditioner sees them, linear ones as they are and
  angles as (cos theta, sin theta), so that a coupling is 2 pi-periodic in the angles it keeps
  (Rezende et al., "Normalizing flows on tori and spheres", ICML 2020).
- `MoleculeTransformer`: self-attention over the molecule axis without positional encodings
  (Vaswani et al. 2017), f(P h) = P f(h) for every permutation P, the conditioner of the rigid-body
  flows (Köhler et al., "Rigid Body Flows for Sampling Molecular Crystal Structures", ICML 2023).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

ACTIVATIONS = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "elu": nn.ELU,
    "softplus": nn.Softplus,
}
SMOOTH_ACTIVATIONS = ("tanh", "silu", "gelu", "softplus")


def mlp(n_in: int, n_out: int, hidden: Sequence[int], activation: str, zero_last: bool) -> nn.Sequential:
    """A dense network n_in -> hidden... -> n_out; `zero_last` zeroes the output layer."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
    layers: list[nn.Module] = []
    width = n_in
    for h in hidden:
        layers += [nn.Linear(width, int(h)), ACTIVATIONS[activation]()]
        width = int(h)
    last = nn.Linear(width, n_out)
    if zero_last:
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
    layers.append(last)
    return nn.Sequential(*layers)


def coupling_masks(dim: int, n_couplings: int, split: str = "half", seed: int = 0) -> list[Tensor]:
    """Alternating masks: `half` keeps the first then the second half of the coordinates;
    `alternate` keeps even then odd indices; `random` draws a new random half (fixed by `seed`)
    for every pair of couplings, the second of the pair keeping the complement."""
    if dim < 2:
        raise ValueError(f"couplings need dim >= 2, got {dim}")
    idx = torch.arange(dim)
    if split == "half":
        bases = [idx < dim // 2]
    elif split == "alternate":
        bases = [idx % 2 == 0]
    elif split == "random":
        g = torch.Generator().manual_seed(seed)
        bases = []
        for _ in range((n_couplings + 1) // 2):
            base = torch.zeros(dim, dtype=torch.bool)
            base[torch.randperm(dim, generator=g)[: dim // 2]] = True
            bases.append(base)
    else:
        raise ValueError(f"unknown split {split!r}; choose 'half', 'alternate' or 'random'")
    return [bases[(k // 2) % len(bases)] if k % 2 == 0 else ~bases[(k // 2) % len(bases)]
            for k in range(n_couplings)]


def circular_embedding(x: Tensor, linear: Tensor, circular: Tensor) -> Tensor:
    """[x_linear, cos(x_circular), sin(x_circular)] of x [B, D] for index tensors `linear`,
    `circular`: the conditioner input, 2 pi-periodic in every circular feature."""
    angles = x[:, circular]
    return torch.cat([x[:, linear], torch.cos(angles), torch.sin(angles)], dim=-1)


def embedding_width(n_linear: int, n_circular: int) -> int:
    """Width of `circular_embedding`: one number per linear feature, two per angle."""
    return int(n_linear) + 2 * int(n_circular)


class _SelfAttentionLayer(nn.Module):
    """One post-norm transformer layer over the molecule axis of h [B, N, D]:

        h <- LayerNorm(h + MHA(h)),    h <- LayerNorm(h + W_2 SiLU(W_1 h + b_1) + b_2),

    MHA(h) = W_o concat_heads(softmax(Q K^T / sqrt(d)) V), Q = h W_q + b_q, K = h W_k, V = h W_v + b_v.
    The key projection has no bias: a key bias adds Q_i . b_k to every score of query i, a constant
    per row that the softmax cancels, so it would be a parameter without effect (and without
    gradient). No positional encoding and no mask: every operation is either per molecule or a
    softmax-weighted sum over all molecules, so the layer commutes with permutations of the molecules.
    """

    def __init__(self, hidden: int, n_heads: int):
        super().__init__()
        self.n_heads, self.head_dim = int(n_heads), int(hidden) // int(n_heads)
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden, bias=False)
        self.value = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)
        self.norm_attention = nn.LayerNorm(hidden)
        self.feed_forward = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.SiLU(), nn.Linear(2 * hidden, hidden))
        self.norm_feed_forward = nn.LayerNorm(hidden)

    def _heads(self, t: Tensor) -> Tensor:
        return t.unflatten(-1, (self.n_heads, self.head_dim)).transpose(-2, -3)  # [B, H, N, d]

    def forward(self, h: Tensor) -> Tensor:
        q, k, v = self._heads(self.query(h)), self._heads(self.key(h)), self._heads(self.value(h))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.head_dim), dim=-1)
        attended = (weights @ v).transpose(-2, -3).flatten(-2)  # [B, N, D]
        h = self.norm_attention(h + self.out(attended))
        return self.norm_feed_forward(h + self.feed_forward(h))


class MoleculeTransformer(nn.Module):
    """A permutation-equivariant conditioner over molecules: [B, N, in_features] -> [B, N, out_features].

    Per-molecule embedding Linear -> SiLU -> Linear (width `hidden`), then `n_layers` self-attention
    layers over the molecule axis (`_SelfAttentionLayer`: multi-head attention with `n_heads`
    heads, residual + LayerNorm, then a per-molecule SiLU MLP of width 2 hidden, residual +
    LayerNorm), then a per-molecule linear head. Without positional encodings the network is
    equivariant: f(P h) = P f(h) for every permutation P of the molecules, so a coupling
    conditioned by it treats identical molecules identically. The head's weight and bias start at
    zero, so the output is exactly 0 at initialisation (each coupling starts at its raw = 0 map,
    the identity or near it) while the gradient w.r.t. the head is non-zero. Smooth activations
    only (SiLU, softmax, LayerNorm), so the flows are C-infinity in their inputs.
    """

    def __init__(self, in_features: int, out_features: int, hidden: int = 64, n_heads: int = 4, n_layers: int = 2):
        super().__init__()
        for name, value, low in (("in_features", in_features, 1), ("out_features", out_features, 1),
                                 ("hidden", hidden, 1), ("n_heads", n_heads, 1), ("n_layers", n_layers, 0)):
            if int(value) != value or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value}")
        if hidden % n_heads:
            raise ValueError(f"hidden ({hidden}) must be divisible by n_heads ({n_heads})")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.embed = nn.Sequential(nn.Linear(in_features, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.layers = nn.ModuleList(_SelfAttentionLayer(hidden, n_heads) for _ in range(int(n_layers)))
        self.head = nn.Linear(hidden, out_features)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, features: Tensor) -> Tensor:
        if features.dim() != 3 or features.shape[-1] != self.in_features:
            raise ValueError(f"MoleculeTransformer expects features of shape [batch, n_molecules, "
                             f"{self.in_features}], got {tuple(features.shape)}")
        h = self.embed(features)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


__all__ = ["ACTIVATIONS", "SMOOTH_ACTIVATIONS", "MoleculeTransformer", "circular_embedding", "coupling_masks",
           "embedding_width", "mlp"]

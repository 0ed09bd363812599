"""Flax linen modules shared by every adacomp model: one concern per file, no training or I/O.

Parameters carry logical axis names (`nn.with_logical_partitioning`); `adacomp.sharding` maps
them to mesh axes. Activations are constrained with the `act_*` names.
"""
from layers.attention import MultiHeadAttention, causal_mask, dot_product_attention
from layers.duo import BIG, SKIP, SMALL, DuoFFN
from layers.embedding import Embed
from layers.mlp import DenseFFN, activation_fn
from layers.normalization import RMSNorm
from layers.pattention import Pattention, PattentionAttention, PattentionFFN
from layers.rope import apply_rope
from layers.forecaster import FeatureForecaster
from layers.routing import RoutedAttention, RoutedFFN

__all__ = [
    "BIG", "SKIP", "SMALL", "DuoFFN", "Embed", "DenseFFN", "MultiHeadAttention", "RMSNorm",
    "activation_fn", "apply_rope", "causal_mask", "dot_product_attention",
    "Pattention", "PattentionAttention", "PattentionFFN",
    "FeatureForecaster", "RoutedAttention", "RoutedFFN",
]

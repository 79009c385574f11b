"""Mixture of experts: the `FusedMoE` layer, its torch reference and Triton kernels."""

from runtime.moe.activation import ExpertActivation
from runtime.moe.layer import FusedMoE, select_moe_backend
from runtime.moe.partition import ExpertPartition
from runtime.moe.weights import FlatExperts

__all__ = ["ExpertActivation", "ExpertPartition", "FlatExperts", "FusedMoE", "select_moe_backend"]

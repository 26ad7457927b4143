"""CKKS homomorphic encryption of model updates: parameters, keys, packing, encryption and keyless sums."""

from lightning_fhe.he.context import HEContext, HEKeyError
from lightning_fhe.he.params import CKKSParams, HEConfigError

__all__ = ["CKKSParams", "HEConfigError", "HEContext", "HEKeyError"]

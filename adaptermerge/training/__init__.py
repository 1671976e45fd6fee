"""Training-time helpers that make adapters merge cleanly: OSRM initialisation and orthogonal adaptation.

Both plug into ordinary peft/diffusers training loops; torch is the only heavy import, and the host model is
whatever the caller passes.
"""

from .orthogonal import (
    Allocation,
    BasisAllocator,
    allocation_metadata,
    apply_orthogonal_basis,
    check_disjoint,
    orthogonal_basis,
    read_allocation,
    write_allocation,
)
from .osrm import OSRM

__all__ = [
    "OSRM",
    "Allocation",
    "BasisAllocator",
    "allocation_metadata",
    "apply_orthogonal_basis",
    "check_disjoint",
    "orthogonal_basis",
    "read_allocation",
    "write_allocation",
]

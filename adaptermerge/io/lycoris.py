"""LyCORIS LoHa and LoKr modules as exact low-rank updates, built from their factors at read time.

LoHa (`hada_w1_a/b`, `hada_w2_a/b`; Tucker convs add `hada_t1/t2`) stores `ΔW = s · (B1 A1) ⊙ (B2 A2)`. A Hadamard
product of two low-rank matrices is itself low-rank: `(B1 A1) ⊙ (B2 A2) = (B1 ⊙r B2)(A1 ⊙c A2)`, where `⊙r` takes
the Kronecker product of matching rows (row-wise Khatri-Rao, `out × r1 r2`) and `⊙c` of matching columns
(column-wise Khatri-Rao, `r1 r2 × in`). Rank `r1 · r2`, exact.

LoKr (`lokr_w1` or `lokr_w1_a/b`, `lokr_w2` or `lokr_w2_a/b`; Tucker convs add `lokr_t2`) stores
`ΔW = s · kron(W1, W2)`. With `W1 = U1 V1` and `W2 = U2 V2`, `kron(W1, W2) = kron(U1, U2) kron(V1, V2)`: rank
`rank(W1) · rank(W2)`, exact. A full half (`lokr_w1`, `lokr_w2`) is factored as itself times an identity on its
smaller side. The exact rank of a LoKr with a full `w2` can reach `min(out, in)`; a merge keeps it unless asked for
`rank` (the core SVD then truncates from the factors).

The scale `s` is `alpha / r` with `r` the rank of the factored halves (`hada_w1_b`, or `lokr_w1_b`/`lokr_w2_b`), as
LyCORIS, ComfyUI and A1111 read it; a LoKr with both halves full has `s = 1`. Merged outputs are plain LoRAs.
Convolutions are flattened to `(out, in · kh · kw)`; the kernel size is known from a Tucker core or a 4-D `w2`, and a
conv module stored with 2-D factors (LoHa without Tucker) is read as the flattened matrix.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..errors import AdapterFormatError, AdapterMergeWarning
from ..lowrank import LowRank
from ._source import TensorSource
from ._validate import alpha_tensor

__all__ = ["SUFFIXES", "LycorisEntry", "loha", "lokr"]

LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
SUFFIXES = tuple(f".{name}" for name in (*LOHA, *LOKR))


def _tucker_down(core: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """`A[i, (c, kh, kw)] = Σ_j core[i, j, kh, kw] down[j, c]`: the input side of a Tucker-factored conv half."""
    return torch.einsum("ij...,jc->ic...", core, down).reshape(core.shape[0], -1)


def khatri_rao_rows(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Row-wise Kronecker products: row `p` is `kron(left[p], right[p])`, shape `(n, r1 · r2)`."""
    return (left[:, :, None] * right[:, None, :]).reshape(left.shape[0], -1)


def loha(B1: torch.Tensor, A1: torch.Tensor, B2: torch.Tensor, A2: torch.Tensor) -> LowRank:
    """`(B1 A1) ⊙ (B2 A2)` as one LowRank of rank `r1 · r2` (no scale)."""
    return LowRank(khatri_rao_rows(A1.T, A2.T).T, khatri_rao_rows(B1, B2))


def _halves(full: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(U, V)` with `U V = full` and rank `min` of its sides: the matrix against an identity."""
    rows, columns = full.shape
    if columns <= rows:
        return full, torch.eye(columns, dtype=full.dtype)
    return torch.eye(rows, dtype=full.dtype), full


def lokr(U1: torch.Tensor, V1: torch.Tensor, U2: torch.Tensor, V2: torch.Tensor) -> LowRank:
    """`kron(U1 V1, U2 V2) = kron(U1, U2) kron(V1, V2)` as one LowRank of rank `r1 · r2` (no scale)."""
    return LowRank(torch.kron(V1.contiguous(), V2.contiguous()), torch.kron(U1.contiguous(), U2.contiguous()))


@dataclass(frozen=True)
class LycorisEntry:
    """Where one LoHa or LoKr module's tensors live in a source: role (`hada_w1_a`, ...) → key, and its alpha key."""

    keys: Mapping[str, str]
    alpha_key: str | None = None
    magnitude_key = None

    @property
    def kind(self) -> str:
        return "LoHa" if any(role.startswith("hada_") for role in self.keys) else "LoKr"

    def _shape(self, source: TensorSource, role: str) -> tuple[int, ...] | None:
        return source.shape(self.keys[role]) if role in self.keys else None

    def check(self, source: TensorSource, name: str) -> tuple[int, ...]:
        """The `(out, in_flat, *kernel)` shape, from the header; refuses incomplete or mismatched factors."""
        roles = set(self.keys)
        where = f"{source.name}: {self.kind} module {name!r}"
        if self.kind == "LoHa":
            if not {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= roles:
                raise AdapterFormatError(f"{where} lacks some of hada_w1_a/b, hada_w2_a/b (has {sorted(roles)})")
            if "hada_t1" in roles:  # Tucker: w_a (r, out), w_b (r, in), t (r, r, kh, kw)
                out, core = self._shape(source, "hada_w1_a")[1], self._shape(source, "hada_t1")
                return (out, self._shape(source, "hada_w1_b")[1] * math.prod(core[2:]), *core[2:])
            return (self._shape(source, "hada_w1_a")[0], self._shape(source, "hada_w1_b")[1])
        if not ({"lokr_w1"} <= roles or {"lokr_w1_a", "lokr_w1_b"} <= roles) or not (
            {"lokr_w2"} <= roles or {"lokr_w2_a", "lokr_w2_b"} <= roles
        ):
            raise AdapterFormatError(f"{where} lacks lokr_w1 (or lokr_w1_a/b) or lokr_w2 (or lokr_w2_a/b)")
        a, c = self._shape(source, "lokr_w1") or (
            self._shape(source, "lokr_w1_a")[0],
            self._shape(source, "lokr_w1_b")[1],
        )
        if "lokr_w2" in roles:
            b, d, *kernel = self._shape(source, "lokr_w2")
        elif "lokr_t2" in roles:  # Tucker: w2_a (r, b), w2_b (r, d), t2 (r, r, kh, kw)
            kernel = list(self._shape(source, "lokr_t2")[2:])
            b, d = self._shape(source, "lokr_w2_a")[1], self._shape(source, "lokr_w2_b")[1]
        else:
            b, d, kernel = self._shape(source, "lokr_w2_a")[0], self._shape(source, "lokr_w2_b")[1], []
        return (a * b, c * d * math.prod(kernel), *kernel) if kernel else (a * b, c * d)

    def rank(self, source: TensorSource) -> int:
        """The exact rank of the low-rank form: `r1 · r2`."""
        if self.kind == "LoHa":
            return self._shape(source, "hada_w1_b")[0] * self._shape(source, "hada_w2_b")[0]
        return self._half_rank(source, "1") * self._half_rank(source, "2")

    def _half_rank(self, source: TensorSource, half: str) -> int:
        if f"lokr_w{half}" in self.keys:
            rows, *columns = self._shape(source, f"lokr_w{half}")
            return min(rows, math.prod(columns))
        return self._shape(source, f"lokr_w{half}_b")[0]

    def dtype(self, source: TensorSource) -> torch.dtype:
        return source.dtype(next(iter(self.keys.values())))

    def factor_scale(self, source: TensorSource) -> float:
        """`alpha / r` (r of the factored halves); 1 without alpha, or for a LoKr with both halves full."""
        factored = [k for k in ("hada_w1_b", "lokr_w1_b", "lokr_w2_b") if k in self.keys]
        if not factored or self.alpha_key is None:
            return 1.0
        alpha = alpha_tensor(source, self.alpha_key, self.alpha_key.rpartition(".")[0])
        return alpha / self._shape(source, factored[0])[0] if alpha else 1.0

    def read(self, source: TensorSource, name: str) -> LowRank:
        """The module's exact low-rank update, scale folded into `B`."""
        shape = self.check(source, name)
        kernel = tuple(shape[2:])
        tensors = {
            role: source.get(key).to(torch.promote_types(source.dtype(key), torch.float32))
            for role, key in self.keys.items()
        }
        if self.kind == "LoHa":
            halves = []
            for half in "12":
                up, down = tensors[f"hada_w{half}_a"], tensors[f"hada_w{half}_b"]
                if f"hada_t{half}" in tensors:
                    halves += [up.T, _tucker_down(tensors[f"hada_t{half}"], down)]
                else:
                    halves += [up, down]
            lowrank = loha(*halves)
        else:
            U1, V1 = (
                _halves(tensors["lokr_w1"]) if "lokr_w1" in tensors else (tensors["lokr_w1_a"], tensors["lokr_w1_b"])
            )
            if "lokr_w2" in tensors:
                U2, V2 = _halves(tensors["lokr_w2"].reshape(tensors["lokr_w2"].shape[0], -1))
            elif "lokr_t2" in tensors:
                U2, V2 = tensors["lokr_w2_a"].T, _tucker_down(tensors["lokr_t2"], tensors["lokr_w2_b"])
            else:
                U2, V2 = tensors["lokr_w2_a"], tensors["lokr_w2_b"]
            lowrank = lokr(U1, V1, U2, V2)
        dtype = source.dtype(next(iter(self.keys.values())))
        return LowRank(lowrank.A.to(dtype), (lowrank.B * self.factor_scale(source)).to(dtype), kernel)


def warn_if_full_rank(source: TensorSource, name: str, entry: LycorisEntry) -> None:
    """Warn when a module's exact low-rank form is no smaller than the dense update (a full-matrix LoKr)."""
    out, in_flat, *_ = entry.check(source, name)
    rank = entry.rank(source)
    if rank > min(out, in_flat) / 2:
        warnings.warn(
            f"{source.name}: {entry.kind} module {name!r} has exact rank {rank} for a {out}×{in_flat} update; merged "
            "outputs keep it unless you pass rank= (--rank), which truncates through the core SVD",
            AdapterMergeWarning,
            stacklevel=3,
        )

"""`LowRankLinear`: y = A (B x) + b, the factored replacement of an `nn.Linear`, and the module swap.

Shipped next to the weights of factored checkpoints (see swiftsvd_cli/model/hf/__init__.py): imports only torch.
"""

from __future__ import annotations

import torch
from torch import nn


class LowRankLinear(nn.Module):
    """Two thin linears, B (in -> rank) then A (rank -> out, with the original bias).

    Stored as `B.weight` (k, n) and `A.weight` (m, k) so a checkpoint's state dict names say what they are.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.B = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.A = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_factors(
        cls, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
    ) -> LowRankLinear:
        """Build from A (m, k) and B (k, n), cast to the model's dtype."""
        module = cls(B.shape[1], A.shape[0], A.shape[1], bias is not None, device=A.device, dtype=dtype)
        with torch.no_grad():
            module.A.weight.copy_(A)
            module.B.weight.copy_(B)
            if bias is not None:
                module.A.bias.copy_(bias)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.A(self.B(x))
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def replace_module(root: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Put `new` at dotted `path` inside `root`; return what was there."""
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    old = getattr(parent, name)
    setattr(parent, name, new)
    return old  # type: ignore[no-any-return]


def factor_modules(model: nn.Module, ranks: dict[str, int]) -> None:
    """Replace each `nn.Linear` named in `ranks` (full module name -> rank) by an empty `LowRankLinear` of that rank.

    The new modules take the replaced weight's device and dtype (the meta device inside `from_pretrained`), so
    loading a factored state dict afterwards fills them.
    """
    for name, rank in ranks.items():
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name} is a {type(linear).__name__}, not the nn.Linear a rank map factors")
        weight = linear.weight
        replacement = LowRankLinear(
            linear.in_features,
            linear.out_features,
            rank,
            linear.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        replace_module(model, name, replacement)

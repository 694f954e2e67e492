"""Frozen helper networks (LPIPS, a frozen tokenizer, a vision encoder) held outside their owner's module tree.

A frozen network must not appear in the owner's `state_dict` (checkpoints stay small and loadable without it), in
`parameters()` (optimizers, EMA, DDP's gradient buckets never see it), nor be put back into training mode by the
owner's `.train()`; but it must follow the owner's `.to(device)`. `HoldsFrozen` gives exactly that to any nn.Module:

    class MyTask(HoldsFrozen, nn.Module):
        def __init__(self, lpips):
            super().__init__()
            self.add_frozen("lpips", lpips)     # eval mode, requires_grad False, not registered
        ... self.frozen("lpips")(x, y) ...
"""

from __future__ import annotations

from torch import nn


class HoldsFrozen:
    """Mixin for nn.Module subclasses (list it before nn.Module, or before a base that is one)."""

    def add_frozen(self, name: str, module: nn.Module | None) -> None:
        """Hold `module` frozen under `name` (None is allowed and stored as absent)."""
        store = self.__dict__.setdefault("_frozen_modules", {})
        if module is None:
            store.pop(name, None)
            return
        store[name] = module.eval().requires_grad_(False)

    def frozen(self, name: str) -> nn.Module | None:
        return self.__dict__.get("_frozen_modules", {}).get(name)

    def frozen_modules(self) -> dict[str, nn.Module]:
        return dict(self.__dict__.get("_frozen_modules", {}))

    def _apply(self, fn, *args, **kwargs):  # .to() / .cuda() / .float(): move the frozen networks along
        super()._apply(fn, *args, **kwargs)  # type: ignore[misc]
        for module in self.__dict__.get("_frozen_modules", {}).values():
            module._apply(fn)
        return self

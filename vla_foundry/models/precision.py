"""Buffers that must stay float32 when a model is cast to half precision."""

from __future__ import annotations

from torch import nn


class Float32Buffers(nn.Module):
    """A module whose buffers follow device moves but never dtype casts: tables such as DDPM's
    ``alphas_cumprod`` or sinusoidal frequencies lose the precision sampling needs in bf16, and VLA
    Foundry keeps them float32 (spec §2.4)."""

    def _apply(self, fn, *args, **kwargs):
        saved = dict(self._buffers)
        super()._apply(fn, *args, **kwargs)
        for name, table in saved.items():
            if table is not None:
                self._buffers[name] = table.to(self._buffers[name].device)
        return self

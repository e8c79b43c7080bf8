"""What a vision tower derives from ``grid_thw``, computed on the host by the collator (in the DataLoader workers)
with transformers' own functions, so the patched forward never asks the device for it.

transformers >= 5.15 lets a caller hand every such tensor to the tower (``transformers/vision_utils.py``: each
``get_vision_*`` pops a precomputed value from the kwargs; ``model(**batch)`` carries them as ``image_<name>`` /
``video_<name>``). Per modality with a grid, the batch gets::

    {m}_cu_seqlens  {m}_max_seqlen  {m}_position_ids           every tower (frames as attention segments, the
                                                               rotary's (h, w) per patch, block-major)
    {m}_window_index  {m}_cu_window_seqlens  {m}_max_window_seqlen
                                                               a windowed tower (Qwen2.5-VL)
    {m}_interp_indices  {m}_interp_weights                     a tower that resamples a learned position table
                                                               (Qwen3-VL, Qwen3.5, the Qwen3-Omni thinker)

and ``qwenvl.packing.HostMeta`` carries the host copies our attention dispatch needs (the boundaries of each vision
cu_seqlens, and the grids themselves where the tower reads nothing else from them). Which hooks a tower has is read
from transformers itself (its modeling module imports the ``get_vision_*`` function, the tower holds its
parameters), with the tower's own parameters, never restated here. Older releases get the host offsets only; their
towers compute the rest, with the host syncs that costs (``docs/benchmarks.md`` counts them).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

__all__ = ["VisionPreamble", "HOOKS_SINCE"]

HOOKS_SINCE = "5.15.0"  # the kwarg names below (5.9-5.14 had bilinear_* and no max_seqlen: not used there)


def _hooks_available() -> bool:
    import transformers
    from packaging.version import Version

    return Version(Version(transformers.__version__).base_version) >= Version(HOOKS_SINCE)


@dataclass(frozen=True)
class VisionPreamble:
    """How one model's vision tower derives its inputs from ``grid_thw`` (``of(model)``), and ``kwargs`` computing
    them on the host for a batch's grids."""

    merge: int
    window: tuple[int, int, int] | None = None  # (spatial_merge_size, window_size, patch_size): Qwen2.5-VL
    interpolation: tuple[int, str, bool] | None = None  # (num_grid_per_side, mode, align_corners)
    config: object = field(default=None, compare=False, repr=False)  # the model's config: its placeholder token ids

    @classmethod
    def of(cls, model) -> "VisionPreamble | None":
        """The preamble of ``model``'s vision tower, or ``None`` where the release has no hooks for it (the towers
        then compute it themselves) or the model has no tower."""
        from qwenvl.families import family_of_model

        spec = family_of_model(model)
        tower = spec.vision_tower_in(model)
        if tower is None or not _hooks_available():
            return None
        module = sys.modules[type(tower).__module__]
        window = None
        if hasattr(module, "get_vision_window_index") and hasattr(tower, "window_size"):
            window = (int(tower.spatial_merge_size), int(tower.window_size), int(tower.patch_size))
        interpolation = None
        if hasattr(module, "get_vision_interpolation_indices_and_weights") and hasattr(tower, "num_grid_per_side"):
            interpolation = (int(tower.num_grid_per_side), str(tower.interpolation_mode), bool(tower.interpolation_align_corners))
        return cls(int(tower.spatial_merge_size), window, interpolation, model.config)

    def check_placeholders(self, input_ids_1T: torch.Tensor, grids: dict[str, torch.Tensor]) -> torch.Tensor:
        """That the row holds as many placeholder tokens of each modality as its grids give features, checked on
        the host (transformers checks it on the device, a host sync per modality, and is then spared it); returns
        the placeholders' flat positions as ``(2, V)``: ascending (where deepstack adds its features), and in the
        features' order, the images' then the videos' (where their gradient is gathered: ``qwenvl.patches._visual``)."""
        from qwenvl.families import get_family
        from qwenvl.positions import mm_token_type_ids

        types = mm_token_type_ids(self.config, input_ids_1T)
        if {1, 2} <= set(types.unique().tolist()) and not get_family(self.config.model_type).mixes_media():
            from qwenvl.data.synthetic import mixing_error

            raise mixing_error(self.config.model_type, "a packed row")  # transformers would refuse it in the forward
        for kind, modality in ((1, "image"), (2, "video")):
            grid = grids.get(f"{modality}_grid_thw")
            features = 0 if grid is None else int(grid.prod(-1).sum()) // self.merge**2
            tokens = int((types == kind).sum())
            if tokens != features:
                raise ValueError(f"a packed row holds {tokens} {modality} placeholder tokens but its {modality} grids give {features} features")
        flat = types.flatten()
        by_modality = [torch.nonzero(flat == kind).flatten() for kind in (1, 2)]
        return torch.stack([torch.nonzero(flat > 0).flatten(), torch.cat(by_modality)])

    def kwargs(self, modality: str, grid_thw: torch.Tensor) -> tuple[dict, dict[str, tuple[int, ...]]]:
        """The tower's precomputed inputs for ``grid_thw`` (a CPU ``(n, 3)`` grid), named as ``model(**batch)``
        takes them (``image_cu_seqlens``, ...), and the host boundaries of each cu_seqlens among them."""
        from transformers import vision_utils as vu

        grid = grid_thw.to(torch.int64)
        cu = vu.get_vision_cu_seqlens(grid)
        out = {
            "cu_seqlens": cu,
            "max_seqlen": int(cu.diff().max()) if cu.numel() > 1 else 0,
            "position_ids": vu.get_vision_position_ids(grid, self.merge),
        }
        host = {f"{modality}_cu_seqlens": tuple(cu.tolist())}
        if self.window is not None:
            merge, window_size, patch_size = self.window
            index, cu_window = vu.get_vision_window_index(grid, merge, window_size, patch_size)
            out.update(window_index=index, cu_window_seqlens=cu_window, max_window_seqlen=int(cu_window.diff().max()))
            host[f"{modality}_cu_window_seqlens"] = tuple(cu_window.tolist())
        if self.interpolation is not None:
            side, mode, align_corners = self.interpolation
            indices, weights = vu.get_vision_interpolation_indices_and_weights(
                grid, side, mode=mode, align_corners=align_corners, spatial_merge_size=self.merge
            )
            out.update(interp_indices=indices, interp_weights=weights)
        return {f"{modality}_{name}": value for name, value in out.items()}, host

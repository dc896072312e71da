"""The device mesh: axes (data, fsdp, tensor) from config, Auto-typed so linen's logical constraints work.

Single device is a 1x1x1 mesh, not a separate code path. Axes that cross the slow network (DCN: between TPU
slices or GPU nodes) come first, so `data` is the outermost axis.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Fills at most one -1 entry with the remaining devices; the product must equal num_devices."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh.shape needs {len(MESH_AXES)} entries for axes {MESH_AXES}, got {shape}")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh.shape {shape}: use positive sizes and at most one -1 ('all remaining devices')")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"mesh.shape {shape} cannot use {num_devices} devices: {num_devices} is not "
                             f"divisible by {known}")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(f"mesh.shape {shape} needs {math.prod(shape)} devices but {num_devices} are used; "
                         f"valid shapes multiply to {num_devices} (e.g. ({num_devices}, 1, 1) or (-1, 1, 1))")
    return shape


def select_devices(num_devices: int = -1) -> list[jax.Device]:
    """All devices (-1) or the first `num_devices` of them."""
    devices = jax.devices()
    if num_devices == -1:
        return devices
    if not 1 <= num_devices <= len(devices):
        raise ValueError(f"mesh.num_devices={num_devices} but {len(devices)} devices exist; use -1 (all) or "
                         f"1..{len(devices)}")
    return devices[:num_devices]


def multislice_device_grid(devices: Sequence, shape: tuple[int, ...]) -> np.ndarray | None:
    """For devices on several TPU slices (or other DCN-joined granules with a `slice_index`): the device array with
    `data`, the outermost axis, split across slices and the rest inside each slice; None on a single slice."""
    slices = sorted({getattr(d, "slice_index", 0) for d in devices})
    if len(slices) < 2:
        return None
    if shape[0] % len(slices):
        raise ValueError(f"mesh.shape {shape} on {len(slices)} slices: the data axis ({shape[0]}) must be a multiple "
                         f"of the slice count, because `data` is the axis that crosses the slow network between slices")
    inside = (shape[0] // len(slices), *shape[1:])
    return mesh_utils.create_hybrid_device_mesh(inside, (len(slices), *([1] * (len(shape) - 1))), list(devices))


def make_mesh(shape: Sequence[int] = (-1, 1, 1), num_devices: int = -1) -> Mesh:
    """A (data, fsdp, tensor) mesh with AxisType.Auto on every axis (multi-slice: `data` spans the slices)."""
    devices = select_devices(num_devices)
    resolved = resolve_mesh_shape(shape, len(devices))
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    grid = multislice_device_grid(devices, resolved)
    if grid is not None:  # jax.make_mesh refuses multi-slice topologies
        return Mesh(grid, MESH_AXES, axis_types=axis_types)
    if len(devices) == len(jax.devices()):
        return jax.make_mesh(resolved, MESH_AXES, axis_types=axis_types)
    return Mesh(np.asarray(devices).reshape(resolved), MESH_AXES, axis_types=axis_types)


def batch_shard_count(mesh: Mesh) -> int:
    """How many ways the batch is split: data x fsdp."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)

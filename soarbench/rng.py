"""Random draws keyed by what they are for, not by who draws them.

Every random quantity of a training sample (its noise, timestep, sigma', rollout noise, crop, caption dropout) comes
from a generator seeded by (run seed, unit, purpose, global sample index). So a sample gets the same draws whether
it is trained on GPU 3 of 8 or in accumulation slot 3 of 8 on one GPU, and after a resume: a run on fewer GPUs
follows the run on more within float tolerance (the users' most frequent complaint about the reference trainers).
Draws are made on the CPU and moved to the device, so they are also the same on every kind of device.
"""
from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np
import torch


def _word(part) -> int:
    if isinstance(part, str):
        return zlib.crc32(part.encode())
    return int(part)


def key_seed(*key) -> int:
    """A 63-bit seed from a key of ints and strings (strings name the purpose of a draw)."""
    words = [_word(k) for k in key]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] % (2**63 - 1))


def keyed_generator(*key) -> torch.Generator:
    return torch.Generator().manual_seed(key_seed(*key))


def keyed_randn(shape: Sequence[int], keys: Sequence[tuple], device=None, dtype=torch.float32) -> torch.Tensor:
    """One N(0, I) tensor of `shape` per key, stacked: (len(keys), *shape)."""
    draws = [torch.randn(tuple(shape), generator=keyed_generator(*k), dtype=dtype) for k in keys]
    out = torch.stack(draws) if draws else torch.empty((0, *shape), dtype=dtype)
    return out.to(device) if device is not None else out


def keyed_rand(n: int, keys: Sequence[tuple], device=None) -> torch.Tensor:
    """n uniforms in [0, 1) per key: (len(keys), n)."""
    draws = [torch.rand(n, generator=keyed_generator(*k)) for k in keys]
    out = torch.stack(draws) if draws else torch.empty((0, n))
    return out.to(device) if device is not None else out

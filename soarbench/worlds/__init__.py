"""Procedural worlds: small synthetic text-to-image domains whose benchmarks can be scored exactly.

A world writes its own training data where a config's `data.jsonl` points (`data.generate = { world = NAME,
n_images, seed, image_size }`), and only into a folder it owns. It registers lazily, by name:

    WORLDS.add("my_world", "my_package.my_world:WORLD")    # WORLD = World(name="my_world", ...)

Its benchmarks and its GenEval backend register in their own registries (soarbench/benchmarks.py,
soarbench/geneval/backends.py); `soarbench data shapes` writes the shapes world's splits by hand.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from soarbench.registry import LazyRegistry


@dataclass(frozen=True)
class World:
    name: str
    manifest: str  # the file a generated folder holds: what world, split and draw wrote it
    owns_folder: Callable[[Path], bool]  # may the world write here (new, empty, or its own)?
    is_current: Callable[..., bool]  # (folder, n_images=, seed=, size=): does it hold exactly this draw?
    write: Callable[..., Path]  # (folder, n_images=, seed=, size=) -> the written train.jsonl


WORLDS = LazyRegistry("world")
WORLDS.add("shapes", "soarbench.worlds.shapes:WORLD")

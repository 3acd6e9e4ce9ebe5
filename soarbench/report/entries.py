"""What the experiment.toml in a report's folders asks of the report: its controls and its budget views.

`soarbench run` writes the experiment file into its output folder; the report reads two [experiment] entries
from it (soarbench/experiment.py checks them against the runs before any run starts):

    controls = { negative = "sft_lr0", positive = "flow_grpo_control" }   # checked by report/controls.py

Budget views: the same comparison under a second way of matching budgets, in a final table of its own.
The experiment's runs are matched in one budget unit (e.g. fwd_bwd_equiv, matched compute). A view adds runs
budgeted in another unit and names which groups it compares, e.g. matched data passes: SFT given exactly the
training images SOAR saw (SOAR's step costs about 7x SFT's, so at matched compute SFT sees 7x more data):

    [experiment.views.matched_data]
    title = "Matched data passes: the same number of training images seen (data_images)"
    reference = "sft_data"          # the group the view's paired tests compare against (a run made for the view)
    groups = ["soar"]               # the others (their runs may belong to the main comparison too)

A view's reference group is left out of the main final table: it was budgeted for the view, not the comparison.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from soarbench.errors import UserError, did_you_mean

CONTROL_KINDS = ("negative", "positive")
VIEW_KEYS = ("title", "reference", "groups")


@dataclass(frozen=True)
class View:
    name: str
    title: str
    reference: str
    groups: tuple[str, ...]

    @property
    def members(self) -> tuple[str, ...]:
        return (self.reference, *self.groups)


def validate_views(views: object, where: str) -> tuple[View, ...]:
    """The views of an experiment's `views` table; one clear line for anything else."""
    if views is None:
        return ()
    if not isinstance(views, Mapping):
        raise UserError(f"{where}: 'views' must be a table of [experiment.views.NAME] tables")
    out = []
    for name, view in views.items():
        at = f"{where} views.{name}"
        if not isinstance(view, Mapping):
            raise UserError(f"{at}: must be a table with {', '.join(VIEW_KEYS)}")
        for key in view:
            if key not in VIEW_KEYS:
                raise UserError(f"{at}: {did_you_mean('key', key, VIEW_KEYS)}")
        reference, groups = view.get("reference"), view.get("groups")
        if not isinstance(reference, str) or not reference:
            raise UserError(f"{at}: 'reference' must name a [runs.NAME] group, got {reference!r}")
        if not isinstance(groups, list) or not groups or not all(isinstance(g, str) and g for g in groups):
            raise UserError(f"{at}: 'groups' must be a non-empty list of [runs.NAME] groups, got {groups!r}")
        if reference in groups:
            raise UserError(f"{at}: the reference '{reference}' is also listed in 'groups'")
        title = view.get("title", name)
        if not isinstance(title, str):
            raise UserError(f"{at}: 'title' must be a string, got {title!r}")
        out.append(View(str(name), title, reference, tuple(groups)))
    return tuple(out)


def read_experiment_entry(paths: Iterable[Path | str], key: str, validate: Callable[[Any, str], Any]) -> Any:
    """`validate(value, where)` of [experiment] `key` in the first experiment.toml under the report's folders that
    gives a non-empty one (`soarbench run` writes the experiment file into its output folder); None if none does."""
    for path in map(Path, paths):
        exp = path / "experiment.toml"
        if not exp.is_file():
            continue
        try:
            doc = tomllib.loads(exp.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"{exp}: not valid TOML ({e})") from None
        value = validate(doc.get("experiment", {}).get(key), f"{exp} [experiment]")
        if value:
            return value
    return None


def read_views(paths: Iterable[Path | str]) -> tuple[View, ...]:
    return read_experiment_entry(paths, "views", validate_views) or ()


def validate_controls(controls: object, where: str) -> dict[str, str]:
    """{kind: group} from an experiment's `controls` table; one clear line for anything else."""
    if controls is None:
        return {}
    if not isinstance(controls, Mapping):
        raise UserError(f"{where}: 'controls' must be a table, e.g. "
                        f"{{ negative = \"sft_lr0\", positive = \"flow_grpo\" }}")
    out = {}
    for kind, group in controls.items():
        if kind not in CONTROL_KINDS:
            raise UserError(f"{where}: {did_you_mean('control', kind, CONTROL_KINDS)}")
        if not isinstance(group, str) or not group:
            raise UserError(f"{where}: controls.{kind} must be the name of a [runs.NAME] group, got {group!r}")
        out[kind] = group
    return out


def read_controls(paths: Iterable[Path | str]) -> dict[str, str]:
    """The controls named by experiment.toml in any of the report's folders (the first one that names them)."""
    return read_experiment_entry(paths, "controls", validate_controls) or {}

"""shapes_soft: a differentiable GenEval-style reward for the shapes world (soarbench.worlds.shapes).

    metric = build_metric("shapes_soft")
    values = metric.score_tensor(pixels, prompts, metadata)   # (B,), on the autograd graph of the pixels
    records = metric.score(pil_images, prompts, metadata)     # [{"score": ...}] (the same number, no graph)

GenEval's exact detector (the "shapes" backend) counts connected components, which has no gradient. Direct-Align
and SRPO need a reward whose gradient reaches the pixels, so this one scores the prompt's GenEval row (the
`metadata` of the training line: tag, include) with soft, smooth quantities read off the renderer's own colour
table (PALETTE and BACKGROUND of soarbench.worlds.shapes):

* membership of a pixel p (RGB in [0, 1]) in a colour c: m_c(p) = exp(-|p - c|^2 / (2 tau^2)); an entry with
  no colour uses "anything but background": m(p) = 1 - exp(-|p - background|^2 / (2 tau^2));
* presence of an included object: 1 - exp(-area / area0), area = mean_p m(p) (a shape of the 32 px world
  covers 3-12 % of the image; area0 = 0.02 makes a drawn shape count as present, 0.78-1.0);
* position ("left of", "right of", "above", "below" an earlier entry j): the membership-weighted centroids of
  the two entries, sigmoid(d / position_temperature) of their signed distance along the relation (image
  coordinates in [0, 1], y down);

score = the mean of all presence and position terms, in [0, 1] (1: every named colour present where asked).
Counts, shapes and excluded objects are not scored (they need components, which are not differentiable): this
is a training signal, not a benchmark; evaluate with GenEval. The arithmetic keeps the pixels' dtype (float64
for gradient checks).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from soarbench.errors import UserError
from soarbench.metrics.base import Metric, MetricInfo, check_protocol

RELATIONS = {"left of": (0, -1.0), "right of": (0, 1.0), "above": (1, -1.0), "below": (1, 1.0)}


def _table(dtype, device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    from soarbench.worlds.shapes import BACKGROUND, PALETTE

    palette = {name: torch.tensor(rgb, dtype=dtype, device=device) / 255.0 for name, rgb in PALETTE.items()}
    return palette, torch.tensor(BACKGROUND, dtype=dtype, device=device) / 255.0


class ShapesSoftMetric(Metric):
    differentiable = True

    def __init__(self, tau: float = 0.15, area0: float = 0.02, position_temperature: float = 0.05,
                 protocol: str = "official"):
        self.protocol = check_protocol("shapes_soft", protocol)  # one definition: both names mean the same
        for name, value in (("tau", tau), ("area0", area0), ("position_temperature", position_temperature)):
            if not float(value) > 0:
                raise UserError(f"shapes_soft: {name} must be > 0, got {value!r}")
        self.tau, self.area0, self.temperature = float(tau), float(area0), float(position_temperature)
        self.info = MetricInfo(name="shapes_soft", version=f"shapes-soft-1/tau{self.tau:g}/a{self.area0:g}",
                               scale="mean of soft colour-presence and position terms in [0, 1]")

    # ---- the pieces ----------------------------------------------------------------------------------------
    def membership(self, x: torch.Tensor, color: str | None) -> torch.Tensor:
        """(H, W) soft mask of one image x (3, H, W) in [0, 1]: pixels of `color`, or non-background pixels."""
        palette, background = _table(x.dtype, x.device)
        if color is not None and color not in palette:
            from soarbench.errors import did_you_mean

            raise did_you_mean("shapes_soft colour", str(color), list(palette))
        target = palette[color] if color is not None else background
        d2 = (x - target.view(3, 1, 1)).pow(2).sum(0)
        near = torch.exp(-d2 / (2 * self.tau**2))
        return near if color is not None else 1 - near

    def presence(self, mask: torch.Tensor) -> torch.Tensor:
        return 1 - torch.exp(-mask.mean() / self.area0)

    @staticmethod
    def centroid(mask: torch.Tensor) -> torch.Tensor:
        """(x, y) of the mask's weighted centre, in [0, 1] image coordinates (y down)."""
        h, w = mask.shape
        ys = (torch.arange(h, dtype=mask.dtype, device=mask.device) + 0.5) / h
        xs = (torch.arange(w, dtype=mask.dtype, device=mask.device) + 0.5) / w
        total = mask.sum().clamp_min(1e-8)
        return torch.stack([(mask * xs.view(1, w)).sum() / total, (mask * ys.view(h, 1)).sum() / total])

    def image_score(self, x: torch.Tensor, row: dict[str, Any], where: str) -> torch.Tensor:
        include = row.get("include") if isinstance(row, dict) else None
        if not include:
            raise UserError(f"shapes_soft: {where} has no GenEval 'include' list (the reward scores the prompt's "
                            "GenEval row)")
        masks = [self.membership(x, entry.get("color")) for entry in include]
        terms = [self.presence(mask) for mask in masks]
        for i, entry in enumerate(include):
            if "position" not in entry:
                continue
            relation, j = entry["position"]
            if relation not in RELATIONS or not 0 <= int(j) < len(include):
                raise UserError(f"shapes_soft: {where}: position {entry['position']!r} is not (one of "
                                f"{', '.join(RELATIONS)}, an earlier entry's index)")
            axis, sign = RELATIONS[relation]
            d = sign * (self.centroid(masks[i])[axis] - self.centroid(masks[int(j)])[axis])
            terms.append(torch.sigmoid(d / self.temperature))
        return torch.stack(terms).mean()

    # ---- the metric contract -------------------------------------------------------------------------------
    def score_tensor(self, images: torch.Tensor, prompts: Sequence[str],
                     metadata: Sequence[dict[str, Any]] | None = None) -> torch.Tensor:
        from soarbench.metrics.pixels import check_pixels

        check_pixels(images)
        if metadata is None or len(metadata) != len(images):
            raise UserError("shapes_soft needs the GenEval row (tag, include) of every image as metadata")
        x = ((images + 1) / 2).clamp(0, 1)  # the pixels' own dtype: float64 stays float64
        return torch.stack([self.image_score(x[i], metadata[i], f"image {i} ({prompts[i]!r})")
                            for i in range(len(images))])

    def score(self, images, prompts: Sequence[str], metadata: Sequence[dict[str, Any]] | None = None
              ) -> list[dict[str, Any]]:
        from soarbench.metrics.pixels import pil_unit_pixels

        pixels = torch.stack([pil_unit_pixels(im) * 2 - 1 for im in images]) if len(images) else torch.zeros(0, 3, 1, 1)
        with torch.no_grad():
            values = self.score_tensor(pixels, prompts, metadata)
        return [{"score": float(v)} for v in values]

"""Delivered against planned, per layer and per beam, before any simulation (issue 16.2).

Each layer's delivered spots (:mod:`mqi_moqui.ptn`) are matched to the plan's spots of that
layer: first to their nearest planned spot, which gives the layer's typical offset (the median
of those vectors), then again with that offset taken out, within ``match_radius_mm`` — so a
whole layer shifted by a few millimetres still matches spot for spot, and the shift is what is
reported. Several delivered spots on one planned spot (a layer restarted after an interlock
repeats its sequence) add their MU. The differences:

* position: per planned spot, the MU-weighted mean delivered position minus the planned one;
  per layer the mean (x, y), the maximum and the RMS of the distances;
* MU: per spot and per layer in percent of the plan; per beam the delivered total against the
  beam's meterset;
* missing spots (planned, nothing delivered), extra spots (delivered, nothing planned near),
  and restarts (a planned spot delivered again after later ones).

Levels: a difference above the *tolerance* is noted, one at or above the *action* level flags
the beam for the physicist. Defaults: position 1 mm / 2 mm, MU 1 % / 2 %.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import attrs
import numpy as np

from mqi_moqui.ptn import DeliveredLayer


@attrs.frozen
class Levels:
    """Tolerance and action levels of the delivery analysis."""

    #: a spot position difference above this (mm) is noted as out of tolerance
    position_tolerance_mm: float = 1.0
    #: a spot position difference at or above this (mm) flags the beam for the physicist
    position_action_mm: float = 2.0
    #: an MU difference above this (percent, per spot or per layer) is out of tolerance
    mu_tolerance_pct: float = 1.0
    #: an MU difference at or above this (percent, per spot, layer or beam) flags the beam
    mu_action_pct: float = 2.0
    #: a delivered spot further than this from every planned spot (after the layer's offset
    #: is taken out) is an extra spot
    match_radius_mm: float = 3.0


@attrs.frozen
class PlannedLayer:
    """One layer of the plan: energy (MeV), spot positions (mm) and MU."""

    energy: float
    x: np.ndarray
    y: np.ndarray
    mu: np.ndarray


def planned_layers(beam: Any, beam_meterset: Optional[float]) -> list[PlannedLayer]:
    """The layers (control points with spot weight) of a pydicom beam, their spot weights turned
    into MU with the fraction group's BeamMeterset (relative weights when the plan gives none)."""
    final = float(beam.get("FinalCumulativeMetersetWeight", 1.0) or 1.0)
    scale = (beam_meterset / final) if beam_meterset else 1.0
    layers, energy = [], 0.0
    for cp in beam.IonControlPointSequence:
        energy = float(cp.get("NominalBeamEnergy", energy) or energy)
        weights = np.atleast_1d(np.asarray(cp.get("ScanSpotMetersetWeights") or [], dtype=float))
        if weights.sum() <= 0:
            continue
        xy = np.asarray(cp.ScanSpotPositionMap, dtype=float).reshape(-1, 2)
        keep = weights > 0
        layers.append(PlannedLayer(energy, xy[keep, 0], xy[keep, 1], weights[keep] * scale))
    return layers


def _nearest(x: np.ndarray, y: np.ndarray, planned: PlannedLayer, shift: tuple[float, float] = (0.0, 0.0),
             chunk: int = 1024) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For each delivered spot (shifted by ``-shift``) its nearest planned spot: index, distance
    and the (dx, dy) to it; in chunks, so that a layer of many spots needs little memory."""
    index = np.empty(len(x), dtype=np.int64)
    distance, dx_out, dy_out = (np.empty(len(x)) for _ in range(3))
    for start in range(0, len(x), chunk):
        part = slice(start, start + chunk)
        dx = (x[part, None] - shift[0]) - planned.x[None, :]
        dy = (y[part, None] - shift[1]) - planned.y[None, :]
        d2 = dx * dx + dy * dy
        best = d2.argmin(axis=1)
        rows = np.arange(len(best))
        index[part], distance[part] = best, np.sqrt(d2[rows, best])
        dx_out[part], dy_out[part] = dx[rows, best], dy[rows, best]
    return index, distance, dx_out, dy_out


def compare_layer(number: int, planned: PlannedLayer, delivered: DeliveredLayer, levels: Levels) -> dict[str, Any]:
    """The differences of one layer (a JSON-able dict; numbers rounded for people)."""
    _, _, dx, dy = _nearest(delivered.x, delivered.y, planned)
    offset = (float(np.median(dx)), float(np.median(dy))) if len(dx) else (0.0, 0.0)
    index, distance, _, _ = _nearest(delivered.x, delivered.y, planned, offset)
    matched = distance <= levels.match_radius_mm
    n = len(planned.mu)
    mu = np.bincount(index[matched], weights=delivered.mu[matched], minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_x = np.bincount(index[matched], weights=(delivered.x * delivered.mu)[matched], minlength=n) / mu
        mean_y = np.bincount(index[matched], weights=(delivered.y * delivered.mu)[matched], minlength=n) / mu
    hit = mu > 0
    ex, ey = mean_x[hit] - planned.x[hit], mean_y[hit] - planned.y[hit]
    error = np.hypot(ex, ey)
    spot_pct = (mu[hit] - planned.mu[hit]) / planned.mu[hit] * 100
    order = index[matched]
    restarts = int(np.sum(np.diff(order) < -2)) if len(order) > 1 else 0  # a jump back: the sequence again
    layer_pct = (mu.sum() - planned.mu.sum()) / planned.mu.sum() * 100
    out = {
        "layer": number, "energy": planned.energy, "planned_spots": n, "delivered_spots": delivered.spots,
        "missing_spots": int(n - hit.sum()), "extra_spots": int((~matched).sum()), "restarts": restarts,
        "position_mean_mm": [round(float(ex.mean()), 3) if len(ex) else None, round(float(ey.mean()), 3) if len(ey) else None],
        "position_max_mm": round(float(error.max()), 3) if len(error) else None,
        "position_rms_mm": round(float(np.sqrt(np.mean(error ** 2))), 3) if len(error) else None,
        "mu_planned": round(float(planned.mu.sum()), 4), "mu_delivered": round(float(mu.sum()), 4),
        "mu_diff_pct": round(float(layer_pct), 3),
        "spot_mu_diff_pct_max": round(float(np.abs(spot_pct).max()), 3) if len(spot_pct) else None,
        "spots_out_of_mu_action": int((np.abs(spot_pct) >= levels.mu_action_pct).sum()),
        "position_errors_mm": [round(float(v), 3) for v in error],
        "spot_mu_diff_pct": [round(float(v), 3) for v in spot_pct],
    }
    out["level"] = _level(out, levels)
    return out


def _level(layer: dict[str, Any], levels: Levels) -> str:
    position = layer["position_max_mm"] or 0.0
    mu = max(abs(layer["mu_diff_pct"]), layer["spot_mu_diff_pct_max"] or 0.0)
    if layer["missing_spots"] or layer["extra_spots"] or position >= levels.position_action_mm or \
            mu >= levels.mu_action_pct:
        return "action"
    if position > levels.position_tolerance_mm or mu > levels.mu_tolerance_pct:
        return "tolerance"
    return "ok"


def analyse_beam(beam_number: int, planned: Sequence[PlannedLayer], delivered: dict[int, DeliveredLayer],
                 levels: Levels, beam_meterset: Optional[float] = None) -> dict[str, Any]:
    """The delivery analysis of one beam: every layer compared, the beam's totals and flags.
    ``delivered`` maps the plan's layer number (from 1) to its decoded layer."""
    layers = [compare_layer(n, planned[n - 1], layer, levels) for n, layer in sorted(delivered.items())
              if 1 <= n <= len(planned)]
    not_in_plan = sorted(n for n in delivered if not 1 <= n <= len(planned))
    not_delivered = [n for n in range(1, len(planned) + 1) if n not in delivered]
    planned_total = beam_meterset if beam_meterset else sum(float(layer.mu.sum()) for layer in planned)
    delivered_total = sum(layer["mu_delivered"] for layer in layers)
    total_pct = (delivered_total - planned_total) / planned_total * 100 if planned_total else math.nan
    flags = [f"layer {layer['layer']}: {_why(layer, levels)}" for layer in layers if layer["level"] == "action"]
    flags += [f"layer {n} is not in the plan" for n in not_in_plan]
    flags += [f"layer {n} was not delivered" for n in not_delivered]
    if abs(total_pct) >= levels.mu_action_pct:
        flags.append(f"total MU {delivered_total:.4g} is {total_pct:+.2f} % of the beam meterset {planned_total:.4g}")
    worst = max(layers, key=lambda layer: layer["position_max_mm"] or 0.0) if layers else None
    return {
        "beam": beam_number, "layers_planned": len(planned), "layers_delivered": len(delivered),
        "mu_planned": round(planned_total, 4), "mu_delivered": round(delivered_total, 4),
        "mu_diff_pct": round(total_pct, 3),
        "position_max_mm": worst["position_max_mm"] if worst else None,
        "restarts": sum(layer["restarts"] for layer in layers),
        "level": "action" if flags else ("tolerance" if any(layer["level"] == "tolerance" for layer in layers)
                                         else "ok"),
        "flags": flags,
        "layers": layers,
        "levels": attrs.asdict(levels),
    }


def _why(layer: dict[str, Any], levels: Levels) -> str:
    reasons = []
    if (layer["position_max_mm"] or 0) >= levels.position_action_mm:
        mean = layer["position_mean_mm"]
        reasons.append(f"spot position off by up to {layer['position_max_mm']:.2f} mm (mean {mean[0]:+.2f}, "
                       f"{mean[1]:+.2f} mm)")
    if abs(layer["mu_diff_pct"]) >= levels.mu_action_pct:
        reasons.append(f"layer MU {layer['mu_diff_pct']:+.2f} % of the plan")
    elif (layer["spot_mu_diff_pct_max"] or 0) >= levels.mu_action_pct:
        reasons.append(f"{layer['spots_out_of_mu_action']} spot(s) off in MU by up to {layer['spot_mu_diff_pct_max']:.2f} %")
    if layer["missing_spots"]:
        reasons.append(f"{layer['missing_spots']} planned spot(s) not delivered")
    if layer["extra_spots"]:
        reasons.append(f"{layer['extra_spots']} delivered spot(s) not in the plan")
    return "; ".join(reasons)

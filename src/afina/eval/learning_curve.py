"""How much data: a saturating power law fitted to the task metric against train rows.

    y(n) = a - b * n ** (-c)        (a: the ceiling more data approaches; b, c > 0)

for a metric where higher is better (the sign flips for a loss). Learning curves of supervised models
follow this shape closely over the range a fine-tuning run sees (Hestness et al. 2017; Kaplan et al.
2020); the fit (scipy's curve_fit, each point weighted by its bootstrap interval) gives the expected
gain from doubling the data, and its uncertainty comes from drawing the parameters from the fit's
covariance (seeded).

    fit = fit_power_law([100, 250, 500, 1000], [41.0, 55.2, 63.1, 68.9], sigma=[4, 4, 3, 3])
    fit["doubling"]   # {"from_rows": 1000, "to_rows": 2000, "gain": 4.9, "interval": [2.1, 7.4]}
"""

from __future__ import annotations

from typing import Any

import numpy as np


def power_law(n: Any, a: Any, b: Any, c: Any) -> Any:
    """a - b * n^-c, elementwise over arrays of n or of parameters."""
    return a - b * np.power(n, -c)


def fit_power_law(
    rows: list[int],
    values: list[float],
    sigma: list[float] | None = None,
    lower_is_better: bool = False,
    confidence: float = 0.95,
    draws: int = 4000,
    seed: int = 0,
    best: float | None = None,
) -> dict[str, Any]:
    """Fit y = a - b n^-c to (rows, values); the ceiling, the exponent and what doubling the largest n buys,
    each with an interval. Needs at least 3 points (4 or more to leave the fit a degree of freedom).

    best: the best value the metric can take (100 for a percentage, 0 for a loss): the ceiling stays within it.
    Without it, points still rising steeply (a curve far from saturation) fit a near-linear trend in log(n) with
    a ceiling far beyond any possible score."""
    from scipy.optimize import curve_fit

    n = np.asarray(rows, dtype=float)
    sign = -1.0 if lower_is_better else 1.0
    y = sign * np.asarray(values, dtype=float)
    if n.size < 3 or np.unique(n).size < 3:
        raise ValueError(f"a power-law fit needs 3 or more distinct data sizes; got {sorted(set(rows))}")
    s = None if sigma is None else np.maximum(np.asarray(sigma, dtype=float), 1e-6)
    spread = max(float(np.ptp(y)), 1e-6)
    a0 = float(y.max()) + 0.5 * spread
    c0 = 0.5
    b0 = max((a0 - float(y[np.argmin(n)])) * float(n.min()) ** c0, 1e-6)
    top = float(y.max()) + 20 * spread
    if best is not None:
        top = max(min(top, sign * best), float(y.max()) + 1e-6)
        a0 = min(a0, top - 1e-9)
        b0 = max((a0 - float(y[np.argmin(n)])) * float(n.min()) ** c0, 1e-6)
    bounds = ([float(y.max()) - spread, 0.0, 0.01], [top, np.inf, 3.0])
    p0 = np.clip([a0, b0, c0], [bounds[0][0] + 1e-9, 1e-9, 0.011], [bounds[1][0] - 1e-9, np.inf, 2.99])
    popt, pcov = curve_fit(power_law, n, y, p0=p0, sigma=s, absolute_sigma=s is not None, bounds=bounds, maxfev=20000)
    a, b, c = (float(v) for v in popt)
    if not np.all(np.isfinite(pcov)):
        pcov = np.diag(np.square(np.abs(popt) * 0.5 + 1e-9))  # a degenerate fit: wide, honest intervals
    rng = np.random.default_rng(seed)
    samples = rng.multivariate_normal(popt, pcov, size=draws, check_valid="ignore")
    samples = samples[(samples[:, 1] >= 0) & (samples[:, 2] > 0) & (samples[:, 0] <= top)]
    largest = float(n.max())
    tail = (1 - confidence) / 2 * 100

    def spread_of(values: np.ndarray) -> list[float]:
        low, high = np.percentile(values, [tail, 100 - tail])
        return (
            [round(sign * float(low), 3), round(sign * float(high), 3)]
            if sign > 0
            else [round(sign * float(high), 3), round(sign * float(low), 3)]
        )

    gain = power_law(np.array(2 * largest), a, b, c) - power_law(np.array(largest), a, b, c)
    gains = power_law(2 * largest, samples[:, 0], samples[:, 1], samples[:, 2]) - power_law(
        largest, samples[:, 0], samples[:, 1], samples[:, 2]
    )
    residuals = y - power_law(n, a, b, c)
    return {
        "form": "y = a - b * rows^(-c)" if sign > 0 else "y = a + b * rows^(-c)",
        "a": round(sign * a, 4),
        "b": round(b, 4),
        "c": round(c, 4),
        "ceiling_interval": spread_of(samples[:, 0]),
        "exponent_interval": [round(float(v), 4) for v in np.percentile(samples[:, 2], [tail, 100 - tail])],
        "rmse": round(float(np.sqrt(np.mean(residuals**2))), 4),
        # pinned at the metric's best value while the points are still well short of it: no saturation in sight
        "ceiling_at_best": bool(best is not None and a >= top - 1e-3 * spread and top - y.max() > 0.1 * spread),
        "doubling": {
            "from_rows": int(largest),
            "to_rows": int(2 * largest),
            "gain": round(sign * float(gain), 3),
            "interval": spread_of(gains),
        },
        "draws": int(samples.shape[0]),
    }


def predict(fit: dict[str, Any], rows: float) -> float:
    sign = -1.0 if fit["form"].startswith("y = a +") else 1.0
    return sign * float(power_law(np.array(rows, dtype=float), sign * fit["a"], fit["b"], fit["c"]))


def doubling_sentence(fit: dict[str, Any], label: str, points: list[dict[str, Any]] | None = None) -> str:
    """What doubling the data is expected to buy; for a curve with no saturation in sight (the fit's ceiling at
    the metric's best value, where its extrapolation means little), what the last step of the data bought."""
    d = fit["doubling"]
    if fit.get("ceiling_at_best") and points and len(points) >= 2:
        before, last = points[-2], points[-1]
        return (
            f"No saturation in sight: going from {before['rows']} to {last['rows']} train rows changed {label} by "
            f"{last['value'] - before['value']:+.1f} ({before['value']:.1f} -> {last['value']:.1f}), and a "
            "saturating power law through the points puts its ceiling at the metric's best possible value. More data "
            "should help; by how much, this curve cannot say."
        )
    low, high = d["interval"]
    return (
        f"Doubling the train data ({d['from_rows']} -> {d['to_rows']} rows) is expected to change {label} by "
        f"{d['gain']:+.1f} [{low:+.1f}, {high:+.1f}] (saturating power-law fit, ceiling about {fit['a']:.1f})."
    )


def learning_curve_chart(curve: dict[str, Any], label: str):
    """The metric against train rows (error bars), the fitted curve, and the prompting baselines as lines."""
    from afina.plots import figure

    points = curve["points"]
    fig, ax = figure(6, 3.4)
    rows = [p["rows"] for p in points]
    values = [p["value"] for p in points]
    errors = (
        [[p["value"] - p["interval"][0] for p in points], [p["interval"][1] - p["value"] for p in points]]
        if all(p.get("interval") for p in points)
        else None
    )
    ax.errorbar(rows, values, yerr=errors, fmt="o", color="#4c72b0", capsize=3, label="tuned (95% interval)")
    if curve.get("fit") and not curve["fit"].get("ceiling_at_best"):  # a pinned fit does not describe the points
        grid = np.geomspace(min(rows), 2 * max(rows), 50)
        ax.plot(grid, [predict(curve["fit"], g) for g in grid], "-", color="#4c72b0", alpha=0.6, label="power-law fit")
    else:
        ax.plot(rows, values, ":", color="#4c72b0", alpha=0.6, label="measured (no saturating fit)")
    colours = {"base": "#888888", "base_fewshot": "#dd8452", "base_rag": "#55a868", "tuned_rag": "#c44e52"}
    for system, value in (curve.get("baselines") or {}).items():
        ax.axhline(value, linestyle="--", color=colours.get(system, "#333333"), label=system)
    ax.set_xscale("log")
    from matplotlib.ticker import NullFormatter

    ax.set_xticks(rows, [str(n) for n in rows])  # the measured sizes, as plain numbers
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("train rows")
    ax.set_ylabel(label)
    ax.set_title("learning curve")
    ax.legend(fontsize=7)
    return fig

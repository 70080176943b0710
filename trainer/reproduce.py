"""``trainer fit --reproduce RUN --out NEW``: train a recorded run again (its data path, config
and seeds) and report how far each figure moved, and which of its inputs differ.

Exit status of the command: 0 when every figure is within ``--tolerance`` of the recorded one
(default 0: the same figures to the last digit, which the same code, data, packages and machine
give), :data:`EXIT_DIFFERS` when one is not, 2 for bad input. The comparison is also written to
``NEW/reproduction.json``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.errors import DermedgeError
from trainer.provenance import differences
from trainer.run import read_card

EXIT_DIFFERS = 3
REPORT_FILE = "reproduction.json"
# The card's headline figures (metrics.val), then the class offsets' before/cross-fitted scores.
CARD_FIGURES: tuple[str, ...] = (
    "balanced_accuracy", "accuracy", "melanoma_auc", "melanoma_average_precision",
    "melanoma_sensitivity", "melanoma_specificity", "sensitivity_at_specificity_0.90",
    "melanoma_threshold", "diagnosis_ece", "melanoma_ece")
CLASS_BIAS_FIGURES: tuple[str, ...] = ("balanced_accuracy_before",
                                       "balanced_accuracy_after_crossfit")


@dataclass(frozen=True)
class Figure:
    name: str
    recorded: float | None
    now: float | None

    @property
    def difference(self) -> float | None:
        if self.recorded is None or self.now is None:
            return None
        return self.now - self.recorded

    def within(self, tolerance: float) -> bool:
        if self.recorded is None and self.now is None:
            return True
        d = self.difference
        return d is not None and math.isfinite(d) and abs(d) <= tolerance + 1e-12


def recorded_config(run_dir: str | Path, data: str | None = None):
    """The config ``run_dir`` was trained with (its ``config.yaml``); ``data`` replaces its
    data path (the same dataset in another place)."""
    from trainer.config import RunConfig

    run = Path(run_dir)
    path = run / "config.yaml"
    if not path.is_file():
        raise DermedgeError(f"{run} has no config.yaml, so it cannot be reproduced. Pass the "
                            "folder of a finished `trainer fit` run.")
    config = RunConfig.from_yaml(path)
    if data is not None:
        config = config.replace(**{"data.path": str(Path(data).expanduser().resolve())})
    elif not config.data.path or not Path(config.data.path).exists():
        raise DermedgeError(f"The data {run} was trained on ({config.data.path}) is not here. "
                            "Pass the same dataset with --data PATH.")
    return config


def figures(run_dir: str | Path) -> dict[str, float | None]:
    """The figures compared: the card's ``metrics.val``, the class offsets' before and
    cross-fitted balanced accuracy, and each class's recall (``metrics.json``)."""
    run = Path(run_dir)
    card = read_card(run)  # the typed card: a read-only mapping of its sections
    val = (card.get("metrics") or {}).get("val") or {}
    out: dict[str, float | None] = {k: val.get(k) for k in CARD_FIGURES}
    bias = ((card.get("calibration") or {}).get("class_bias")) or {}
    for k in CLASS_BIAS_FIGURES:
        if k in bias:
            out[f"class_bias.{k}"] = bias[k]
    metrics = run / "metrics.json"
    if metrics.is_file():
        per_class = json.loads(metrics.read_text()).get("per_class") or {}
        for label, m in per_class.items():
            out[f"recall.{label}"] = m.get("recall")
    return out


def compare(recorded_run: str | Path, new_run: str | Path,
            tolerance: float = 0.0) -> dict[str, Any]:
    """Figures and inputs of two runs side by side (what ``reproduction.json`` holds)."""
    a, b = figures(recorded_run), figures(new_run)
    rows = [Figure(k, a.get(k), b.get(k)) for k in list(a) + [k for k in b if k not in a]]
    cards = [read_card(r) for r in (recorded_run, new_run)]
    inputs = differences(*cards)
    worst = max((r for r in rows if r.difference is not None),
                key=lambda r: abs(r.difference), default=None)
    wa, wb = ((c.get("reproducibility") or {}).get("model_weights_sha256") for c in cards)
    return {
        "recorded": str(Path(recorded_run).resolve()), "new": str(Path(new_run).resolve()),
        "tolerance": tolerance,
        "same_weights": None if not (wa and wb) else wa == wb,
        "reproduced": all(r.within(tolerance) for r in rows),
        "largest": None if worst is None else {"figure": worst.name,
                                               "difference": worst.difference},
        "figures": [{"name": r.name, "recorded": r.recorded, "now": r.now,
                     "difference": r.difference, "within": r.within(tolerance)} for r in rows],
        "inputs_differ": [{"what": w, "recorded": x, "now": y} for w, x, y in inputs],
    }


def _num(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "-"
    return f"{x:+.4f}" if signed else f"{x:.4f}"


def format_report(report: dict[str, Any]) -> str:
    """The comparison as a table, the inputs that differ, and the verdict."""
    width = max(len(f["name"]) for f in report["figures"])
    lines = [f"{'figure':<{width}}  {'recorded':>8}  {'now':>8}  {'diff':>8}",
             "-" * (width + 30)]
    for f in report["figures"]:
        flag = "" if f["within"] else "  *"
        lines.append(f"{f['name']:<{width}}  {_num(f['recorded']):>8}  {_num(f['now']):>8}  "
                     f"{_num(f['difference'], signed=True):>8}{flag}")
    if report["inputs_differ"]:
        lines.append("\ninputs that differ from the recorded run (each can move the figures):")
        for d in report["inputs_differ"]:
            lines.append(f"  {d['what']}: {_short(d['recorded'])} -> {_short(d['now'])}")
    else:
        lines.append("\ninputs: the same data, config, seeds, weights, code, packages and "
                     "machine as the recorded run")
    same = report.get("same_weights")
    if same is not None:
        lines.append("weights: " + ("identical to the recorded run's, bit for bit" if same
                                    else "differ from the recorded run's"))
    tol = report["tolerance"]
    n_out = sum(not f["within"] for f in report["figures"])
    if report["reproduced"]:
        lines.append(f"reproduced: every figure within {tol:g} of the recorded run")
    else:
        big = report["largest"]
        lines.append(f"NOT reproduced: {n_out} figure(s) differ by more than --tolerance {tol:g} "
                     f"(marked *; largest {big['figure']} {big['difference']:+.4f})")
    return "\n".join(lines)


def _short(x: Any) -> str:
    text = json.dumps(x) if not isinstance(x, str) else x
    return text if len(text) <= 70 else text[:67] + "..."

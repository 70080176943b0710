"""LiteRT latency, size and memory of a .tflite model or bundle (no TensorFlow needed)."""

from __future__ import annotations

import resource
import statistics
import time
from pathlib import Path

import numpy as np

from dermedge.artifacts import read_bundle
from dermedge.labels import INPUT_NAME
from dermedge.litert import LiteModel
from export.errors import BundleError


def _rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _rss_now_mb() -> float:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def resolve_model(path: str | Path) -> tuple[Path, str]:
    """A bundle folder or a .tflite file → (model path, mode or '?')."""
    path = Path(path)
    if path.is_dir():
        b = read_bundle(path)
        return b.model_path, str(b.mode or "?")
    if not path.is_file():
        raise BundleError(f"{path} is neither a bundle folder nor a .tflite file. Pass the --out "
                          "folder of `python -m export tflite` or a model.tflite path.")
    return path, "?"


def bench(path: str | Path, *, runs: int = 50, warmup: int = 5, threads: int | None = None,
          seed: int = 0) -> dict:
    """Median / p90 latency of one single-image invocation, model size, RSS growth."""
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs must be ≥ 1 and warmup ≥ 0; received runs={runs}, "
                         f"warmup={warmup}.")
    model_path, mode = resolve_model(path)
    rss0 = _rss_now_mb()
    model = LiteModel.load(model_path, threads)
    rng = np.random.default_rng(seed)
    x = model.feed(rng.integers(0, 256, size=[1, *model.input_shape[1:]], dtype=np.uint8))
    for _ in range(warmup):
        model.invoke(x)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        model.invoke(x)
        times.append((time.perf_counter() - t) * 1000.0)
    info = model.io["inputs"][INPUT_NAME]
    times.sort()
    p90 = times[min(len(times) - 1, int(np.ceil(0.9 * len(times))) - 1)]
    return {"model": str(model_path), "mode": mode, "size_bytes": model_path.stat().st_size,
            "input_dtype": info["dtype"], "input_shape": info["shape"],
            "threads": threads, "runs": runs, "warmup": warmup,
            "median_ms": statistics.median(times), "p90_ms": p90,
            "mean_ms": statistics.fmean(times), "min_ms": times[0],
            "rss_delta_mb": _rss_now_mb() - rss0, "peak_rss_mb": _rss_peak_mb()}


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A plain-text table: ``columns`` = [(header, key, format)]."""
    cells = [[h for h, _, _ in columns]]
    for r in rows:
        cells.append([("n/a" if r.get(k) is None else format(r[k], f)) for _, k, f in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in
                       enumerate(zip(row, widths, strict=True))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


BENCH_COLUMNS = [("model", "name", ""), ("mode", "mode", ""), ("size KB", "size_kb", ".1f"),
                 ("median ms", "median_ms", ".3f"), ("p90 ms", "p90_ms", ".3f"),
                 ("threads", "threads", ""), ("RSS Δ MB", "rss_delta_mb", ".1f")]


def bench_table(results: list[dict]) -> str:
    rows = [dict(r, name=Path(r["model"]).parent.name or r["model"],
                 size_kb=r["size_bytes"] / 1024) for r in results]
    return table(rows, BENCH_COLUMNS)

"""The serving benchmarks still run end to end (on the tiny bundles, a few requests): the
figures in benchmarks/serving.md come from these scripts, so they must not rot."""

from __future__ import annotations

import importlib.util
import json
import socket
import threading
from pathlib import Path

import pytest
from demo_fixtures import tiny_bundles

REPO = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bundles():
    return tiny_bundles()


def test_load_demo_reports_every_level_with_cpu_per_request(bundles, tmp_path, capsys):
    out = tmp_path / "load.json"
    rc = _script("load_demo").main(["--device", str(bundles["int8"]), "--requests", "12",
                                    "--seconds", "5", "--calls", "3", "--concurrency", "1,3",
                                    "--out", str(out)])
    assert rc == 0, capsys.readouterr()
    doc = json.loads(out.read_text())
    assert [(r["upload"], r["clients"]) for r in doc["rows"]] == [
        ("body", 1), ("body", 3), ("multipart", 1), ("multipart", 3)]
    for r in doc["rows"]:
        assert r["errors"] == 0 and r["ok"] == 12 and r["healthz_errors"] == 0
        assert r["server_cpu_ms"] >= 0 and r["client_cpu_ms"] >= 0  # 10 ms clock ticks
        assert r["p99_ms"] >= r["p50_ms"] > 0
    assert sum(r["server_cpu_ms"] for r in doc["rows"]) > 0
    assert doc["no_http"]["pipeline_cpu_ms"] > 0
    assert doc["no_http"]["jpeg_to_answer_ms"] > doc["no_http"]["inference_ms"] > 0
    assert "srv cpu" in capsys.readouterr().out


def test_server_overhead_splits_cpu_by_layer_for_both_upload_forms(bundles, tmp_path, capsys):
    out = tmp_path / "overhead.json"
    rc = _script("server_overhead").main(["--device", str(bundles["int8"]), "--rounds", "1",
                                          "--clients", "2", "--requests", "30", "--seconds",
                                          "5", "--log-json", "--out", str(out)])
    assert rc == 0, capsys.readouterr()
    doc = json.loads(out.read_text())
    assert [r["upload"] for r in doc["rows"]] == ["body", "multipart"]
    for r in doc["rows"]:
        assert r["errors"] == 0 and r["requests"] == 30
        assert r["cpu_ms"]["service"] > 0 and r["cpu_ms"]["flask"] > 0
        assert r["http_cpu_ms"] == pytest.approx(r["cpu_ms"]["waitress"] + r["cpu_ms"]["flask"],
                                                 abs=2e-3)
    assert set(doc["median_cpu_ms"]) == {"body", "multipart"}
    assert "waitress" in capsys.readouterr().out


def test_serving_before_after_alternates_two_trees(bundles, tmp_path, capsys):
    out = tmp_path / "ab.json"
    rc = _script("serving_before_after").main([
        "--before", str(REPO), "--device", str(bundles["int8"]), "--rounds", "2",
        "--clients", "2", "--upload", "both", "--requests", "10", "--seconds", "5",
        "--out", str(out)])
    assert rc == 0, capsys.readouterr()
    doc = json.loads(out.read_text())
    assert [(r["round"], r["server"], r["upload"]) for r in doc["rows"]] == [
        (1, "before", "body"), (1, "before", "multipart"), (1, "after", "body"),
        (1, "after", "multipart"), (2, "after", "body"), (2, "after", "multipart"),
        (2, "before", "body"), (2, "before", "multipart")]
    assert all(r["errors"] == 0 and r["server_cpu_ms"] >= 0 for r in doc["rows"])
    assert {(m["upload"], m["clients"]) for m in doc["medians"]} == {("body", 2),
                                                                     ("multipart", 2)}
    assert "median, body, 2 clients" in capsys.readouterr().out


def test_load_client_frames_responses_split_anywhere():
    """The load client's HTTP framing: two keep-alive responses arriving in arbitrary pieces,
    header names in any case, and a response that closes the connection."""
    mod = _script("load_demo")
    conn = mod.Conn.__new__(mod.Conn)
    stream = (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
              b"HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\nConnection: close\r\n\r\nno")
    for cut in range(1, len(stream)):
        conn.buf, got = b"", []
        for piece in (stream[:cut], stream[cut:]):
            conn.buf += piece
            while (done := conn.parse()) is not None:
                got.append(done)
        assert got == [(200, b"hello", False), (404, b"no", True)], cut
        assert conn.buf == b""


def test_load_level_counts_errors_and_keeps_going(bundles):
    """A level against a server that answers 500 counts every request as an error (no hang,
    no crash) and reports the CPU split."""
    mod = _script("load_demo")
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    port = srv.getsockname()[1]
    reply = b"HTTP/1.1 500 Oops\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                conn.sendall(reply)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        r = mod.run_level(port, b"x", "text/plain", 2, 6, 10, "device", timeout=5)
    finally:
        srv.close()
    assert r["requests"] == r["errors"] == 6 and r["ok"] == 0
    assert "HTTP 500" in r["error_samples"][0]


@pytest.mark.shared
def test_decode_fidelity_compares_against_the_reference_and_the_yardsticks(bundles, tmp_path,
                                                                           shared_dir, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    src = sorted((shared_dir / "data" / "ham10000_raw_600x450" / "images").glob("*.jpg"))[:4]
    for p in src:
        (photos / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "fid.json"
    rc = _script("decode_fidelity").main(["--device", str(bundles["int8"]), "--float",
                                          str(bundles["int8_reference"]), "--photos",
                                          str(photos), "--out", str(out)])
    assert rc == 0
    rows = {r["compare"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["decode-min-crop 2 vs reference"]["pixel_max_abs_diff"] >= 0
    one = rows["decode-min-crop 1 vs reference"]
    assert one["dct_scales"] == [8] and 0 < one["pixel_mean_abs_diff"] < 3  # 32-px model
    assert "re-saved at JPEG quality 90 vs reference" in rows
    assert 0 <= rows["float32 bundle vs int8 bundle, reference input"]["top1_agreement"] <= 1


def test_site_calibration_reports_the_promise_and_coverage_per_sample_size(bundles, tmp_path,
                                                                          capsys):
    """The site benchmark end to end on the tiny bundles and 63 synthetic photos."""
    import csv

    from demo_fixtures import LABELS, jpeg_bytes

    rows = []
    for ci, dx in enumerate(LABELS):
        for k in range(9):
            p = tmp_path / "img" / f"ISIC_{ci}{k:05d}.jpg"
            p.parent.mkdir(exist_ok=True)
            p.write_bytes(jpeg_bytes((48, 48), seed=ci * 20 + k))
            rows.append({"image_id": p.stem, "lesion_id": f"L{ci}{k}", "dx": dx,
                         "melanoma": int(dx == "mel"), "path": str(p), "split": "val"})
    splits = tmp_path / "splits.csv"
    with splits.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "site.json"
    argv = ["--device", str(bundles["int8"]), "--cloud", str(bundles["float32"]),
            "--splits", str(splits), "--raw", str(tmp_path / "none"), "--sizes", "20,120",
            "--target-sensitivity", "0.8", "--resamples", "4", "--others", "50",
            "--cache", str(tmp_path / "cache.json"), "--out", str(out)]
    assert _script("site_calibration").main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["pool"] == 63 and [r["n"] for r in doc["samples"]] == [20, 120]
    small, large = doc["samples"]
    assert small["refused_share"] == 1.0  # ~4 melanomas cannot bound a sensitivity of 0.8
    assert large["refused"] == 0 and large["melanomas_median"] >= 14
    fitted = large["resamples"] - large["refused"]
    for k, v in large["coverage_others"].items():
        assert v is None or 0.0 <= v <= 1.0, k
        above = large["above_others"][k]
        assert v is None or 0.0 <= above <= 1.0 - v + 1e-9, k
    assert fitted == 0 or large["sensitivity_bound_held"] is not None
    assert "site B (camera B, site mix)" in doc["validation_policy_elsewhere"]
    printed = capsys.readouterr().out
    assert "validation policy" in printed and "refused" in printed
    # a second run reuses the cached tier answers
    assert _script("site_calibration").main(argv) == 0
    assert "using cached tier answers" in capsys.readouterr().out


@pytest.mark.shared
def test_input_gate_benchmark_reports_every_set(chain_bundle, chain_run, shared_dir, tmp_path,
                                                capsys):
    out = tmp_path / "gate.json"
    rc = _script("input_gate").main([str(chain_bundle), "--run", str(chain_run), "--shared",
                                     str(shared_dir), "--limit", "3", "--synthetic", "3",
                                     "--cost-photos", "1", "--cost-runs", "1", "--out", str(out)])
    assert rc == 0, capsys.readouterr()
    doc = json.loads(out.read_text())
    assert [r["set"] for r in doc["real"]] == ["validation split", "600x450 originals"]
    kinds = {d["kind"] for d in doc["detection"]}
    assert kinds == {"everyday", "blur", "dark"}
    for d in doc["detection"]:
        assert d["n"] == 3 and 0 <= d["rate"] <= 1 and d["ci95"][0] <= d["rate"] <= d["ci95"][1]
    assert doc["black_frame"]["refused"] is True
    assert doc["cost"]["server"]["600x450"]["ratio"] > 0
    assert "AUROC" in capsys.readouterr().out


@pytest.mark.shared
def test_ood_choice_benchmark_scores_every_method(chain_run, shared_dir, tmp_path, capsys):
    out = tmp_path / "ood.json"
    rc = _script("ood_choice").main([str(chain_run), "--shared", str(shared_dir),
                                     "--fit-images", "40", "--out", str(out)])
    assert rc == 0, capsys.readouterr()
    doc = json.loads(out.read_text())
    scores = [r["score"] for r in doc["rows"]]
    assert scores[0] == "1 - top softmax probability"
    assert "PPCA 32 components + residual" in scores and len(scores) == 1 + 2 * 5
    for r in doc["rows"]:
        assert 0 <= r["auroc_everyday"] <= 1 and 0 <= r["detected_at_0.01"] <= 1
        assert r["detected_at_0.01"] <= r["detected_at_0.03"]
    assert all(0 < r["components"] <= 20 for r in doc["rows"][1:])  # at most half of 40
    assert doc["everyday_choose"] == "the first 150 by file name" and doc["fit_images"] == 40
    assert "AUROC" in capsys.readouterr().out

"""edge-demo calibrate: thresholds for a target fallback rate, written to a policy file."""

from __future__ import annotations

import csv
import io
import json

import pytest
from demo_fixtures import LABELS, jpeg_bytes, tiny_bundles

from edge_demo.app import create_app
from edge_demo.calibrate import evaluate, read_samples, run_tiers
from edge_demo.cli import main
from edge_demo.errors import CalibrationError
from edge_demo.policy import Policy
from edge_demo.tiers import Tier


@pytest.fixture(scope="module")
def bundles():
    return tiny_bundles()


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """A folder per class and an equivalent run-style splits.csv (4 images per class)."""
    root = tmp_path_factory.mktemp("labelled")
    rows = []
    for ci, dx in enumerate(LABELS):
        (root / "classes" / dx).mkdir(parents=True)
        for k in range(4):
            seed = ci * 10 + k
            p = root / "classes" / dx / f"ISIC_{seed:07d}.jpg"
            p.write_bytes(jpeg_bytes((48 + 4 * ci, 40 + 2 * k), seed=seed))
            rows.append({"image_id": p.stem, "lesion_id": f"L{seed}", "dx": dx,
                         "melanoma": int(dx == "mel"), "path": str(p),
                         "split": "val" if k < 3 else "train"})
    with (root / "splits.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root


@pytest.mark.parametrize("target", [0.2, 0.5])
def test_calibrate_meets_target_and_server_loads_it(bundles, labelled, tmp_path, capsys,
                                                    target):
    out = tmp_path / "policy.json"
    rc = main(["calibrate", "--device", str(bundles["int8"]), "--cloud",
               str(bundles["float32"]), "--data", str(labelled / "splits.csv"),
               "--target-fallback", str(target), "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "<- chosen" in printed and "fallback" in printed
    policy = Policy.load(out)
    assert policy.provenance["target_fallback"] == target
    assert policy.provenance["n_images"] == 21  # the val rows only
    chosen = [r for r in policy.coverage if r["chosen"]]
    assert len(chosen) == 1 and chosen[0]["fallback_rate"] <= target + 1e-9
    rates = [r["target_fallback"] for r in policy.coverage]
    assert rates == sorted(rates) and {0.0, 1.0} <= set(rates)
    for row in policy.coverage:
        assert row["fallback_rate"] <= row["target_fallback"] + 1e-9
    # Replaying the written policy on the same set gives the same fallback rate.
    device, cloud = Tier.from_bundle(bundles["int8"]), Tier.from_bundle(bundles["float32"])
    results = run_tiers(read_samples(labelled / "splits.csv", "val"), device, cloud)
    assert evaluate(policy, results, device, cloud)["fallback_rate"] <= target + 1e-9
    # The referral threshold keeps melanoma sensitivity >= 0.9 on the final path.
    assert chosen[0]["melanoma_sensitivity"] >= 0.9
    client = create_app({"DEVICE_BUNDLE": str(bundles["int8"]),
                         "CLOUD_BUNDLE": str(bundles["float32"]), "POLICY_FILE": str(out),
                         "LOG_JSON": False, "INTERPRETERS": 1}).test_client()
    models = client.get("/api/v1/models").get_json()
    assert models["policy"]["source"] == "file:policy.json"
    assert "note" not in models["policy"] and models["policy"]["coverage"]
    resp = client.post("/api/v1/classify", data={"image": (io.BytesIO(jpeg_bytes()), "a.jpg")},
                       content_type="multipart/form-data")
    assert resp.get_json()["models"]["policy"] == "file:policy.json"
    assert "conservative default" not in client.get("/").get_data(as_text=True)


def test_folder_per_class_and_errors(labelled, bundles, tmp_path):
    samples = read_samples(labelled / "classes")
    assert len(samples) == 28 and {s.dx for s in samples} == set(LABELS)
    with pytest.raises(CalibrationError, match=r"split='test'.*\['train', 'val'\]"):
        read_samples(labelled / "splits.csv", "test")
    with pytest.raises(CalibrationError, match="not found"):
        read_samples(tmp_path / "nothing.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(CalibrationError, match="lacks the columns"):
        read_samples(bad)
    rc = main(["calibrate", "--device", str(bundles["int8"]), "--cloud",
               str(bundles["float32"]), "--data", str(bad), "--out", str(tmp_path / "p.json")])
    assert rc == 2 and not (tmp_path / "p.json").exists()


def test_policy_json_is_plain(labelled, bundles, tmp_path):
    out = tmp_path / "p.json"
    assert main(["calibrate", "--device", str(bundles["int8"]), "--cloud",
                 str(bundles["float32"]), "--data", str(labelled / "classes"),
                 "--target-fallback", "0.1", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert set(doc) == {"version", "source", "policy", "gate", "temperature", "coverage",
                         "provenance"}
    assert doc["source"] == "calibrated" and doc["provenance"]["device"]["mode"] == "int8"

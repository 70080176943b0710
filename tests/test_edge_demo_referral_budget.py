"""edge-demo calibrate --referral-budget and the 95 % intervals of the operating point."""

from __future__ import annotations

import pytest
from demo_fixtures import LABELS, jpeg_bytes, tiny_bundles

from dermedge.metrics import wilson
from edge_demo.cli import main
from edge_demo.policy import Policy


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("labelled")
    for ci, dx in enumerate(LABELS):
        (root / dx).mkdir()
        for k in range(5):
            seed = ci * 10 + k
            (root / dx / f"ISIC_{seed:07d}.jpg").write_bytes(
                jpeg_bytes((48 + 4 * ci, 40 + 2 * k), seed=seed))
    return root


def test_wilson_interval():
    assert wilson(0, 0) is None
    lo, hi = wilson(19, 20)
    assert lo == pytest.approx(0.7639, abs=1e-3) and hi == pytest.approx(0.9911, abs=1e-3)
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-3)


@pytest.mark.parametrize("budget", [0.2, 0.5])
def test_referral_budget_caps_referrals_and_prints_the_tradeoff(labelled, tmp_path, capsys,
                                                                budget):
    b = tiny_bundles()
    out = tmp_path / "policy.json"
    rc = main(["calibrate", "--device", str(b["int8"]), "--cloud", str(b["float32"]),
               "--data", str(labelled), "--target-fallback", "0.3",
               "--referral-budget", str(budget), "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "referral budget vs melanoma sensitivity" in printed and "<- chosen" in printed
    pol = Policy.load(out)
    trade = pol.provenance["referral_tradeoff"]
    assert [r["referral_budget"] for r in trade] == sorted({0.1, 0.2, 0.3, 0.4, 0.5, 0.6,
                                                            budget})
    chosen = [r for r in trade if r["chosen"]]
    assert len(chosen) == 1 and chosen[0]["refer_threshold"] == pol.refer_threshold
    for r in trade:
        if r["within_budget"]:
            assert r["referral_rate"] <= r["referral_budget"] + 1e-9
        lo, hi = r["melanoma_sensitivity_ci"]
        assert lo <= r["melanoma_sensitivity"] <= hi
    sens = [r["melanoma_sensitivity"] for r in trade]
    assert sens == sorted(sens)  # a larger budget never lowers sensitivity
    row = next(r for r in pol.coverage if r["chosen"])
    assert row["n_melanoma"] == 5 and row["n"] == 35
    lo, hi = row["fallback_rate_ci"]
    assert lo <= row["fallback_rate"] <= hi
    assert pol.provenance["referral_budget"] == budget


def test_referral_budget_out_of_range_is_exit_2(labelled, tmp_path, capsys):
    b = tiny_bundles()
    rc = main(["calibrate", "--device", str(b["int8"]), "--cloud", str(b["float32"]),
               "--data", str(labelled), "--referral-budget", "30", "--out",
               str(tmp_path / "p.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "--referral-budget must be a share of cases in (0, 1]" in err

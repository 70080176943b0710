"""A site's cases end to end, on the real waitress server, a real SQLite file and a real
headless Chromium: a tester's cases flow from the phone page into the case log, survive a
kill -9 of the server, get their labels on the /cases page (behind the printed token) and
from a CSV, and come back out through `cases export`; `calibrate --cases` refuses the small
sample and `report` runs on it.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import json
import os
import re
import signal
import sqlite3
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from conftest import demo_process
from demo_fixtures import jpeg_bytes, tiny_bundles
from test_browser_device import _start, _upload
from test_browser_e2e import browser_bundles, chromium, ensure_runtime

from edge_demo.cli import main


@contextlib.contextmanager
def serve(args: list[str], log: Path, timeout: float = 90):
    """`python -m edge_demo serve` on a free port: yields (process, URL, token)."""
    with demo_process(args, log, timeout) as (proc, url):
        deadline = time.monotonic() + timeout
        found = None
        while found is None and time.monotonic() < deadline:
            found = re.search(r"/cases\?token=(\S+)", log.read_text())
            time.sleep(0.1)
        assert found, log.read_text()
        yield proc, url, found.group(1)


def _rows(folder: Path) -> list[dict]:
    db = sqlite3.connect(folder / "cases.sqlite3")
    db.row_factory = sqlite3.Row
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return [dict(r) for r in db.execute("SELECT * FROM cases")]
    finally:
        db.close()


def _kill9(proc) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=20)
    assert proc.returncode == -signal.SIGKILL


def test_kill_9_loses_no_committed_case(tmp_path):
    """Two clients post cases as fast as the server answers; the server is killed with
    SIGKILL mid-stream. Every case it answered as logged is in the file, which is intact."""
    b = tiny_bundles()
    cases = tmp_path / "cases"
    acked, stop = [], threading.Event()

    def client(url: str, seed: int) -> None:
        i = 0
        while not stop.is_set():
            cid = str(uuid.uuid4())
            req = urllib.request.Request(f"{url}/api/v1/classify?case_id={cid}",
                                         data=jpeg_bytes(seed=seed * 100 + i % 50),
                                         headers={"Content-Type": "image/jpeg"})
            i += 1
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    body = json.load(r)
            except (OSError, urllib.error.URLError, ValueError):
                return  # the server is gone
            if body["case"]["logged"]:
                acked.append(cid)

    with serve(["--device", str(b["int8"]), "--cloud", str(b["float32"]), "--cases",
                str(cases), "--threads", "2"], tmp_path / "s.log") as (proc, url, _):
        workers = [threading.Thread(target=client, args=(url, s)) for s in range(2)]
        for w in workers:
            w.start()
        deadline = time.monotonic() + 30
        while len(acked) < 40 and time.monotonic() < deadline:
            time.sleep(0.05)
        _kill9(proc)
        stop.set()
        for w in workers:
            w.join(timeout=20)
    assert len(acked) >= 40
    stored = {r["id"] for r in _rows(cases)}
    assert set(acked) <= stored  # nothing answered as logged was lost
    assert len(stored) - len(acked) <= 2  # at most the requests in flight at the kill


@pytest.mark.browser
def test_a_testers_cases_from_the_page_to_export_calibrate_and_report(tmp_path, capsys):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    ensure_runtime()
    b = browser_bundles()
    cases = tmp_path / "cases"
    photos = []
    for i in range(3):
        p = tmp_path / f"photo{i}.jpg"
        p.write_bytes(jpeg_bytes((600, 450), seed=40 + i))
        photos.append(p)
    args = ["--device", str(b["int8"]), "--cloud", str(b["float32"]), "--cases", str(cases),
            "--keep-photos", "--site-id", "clinic-a", "--threads", "1"]
    codes = []
    with chromium(tmp_path / "profile") as browser:
        browser.set_script_timeout(120)
        with serve(args, tmp_path / "s1.log") as (proc, url, _):
            _start(browser, url)
            # the tester's id (the site id is left to the server's --site-id)
            browser.find_element(By.CSS_SELECTOR, "#tester summary").click()
            browser.find_element(By.ID, "tester-id").send_keys("tester-7")
            for photo in photos:
                last = _upload(browser, photo, keep=True)
                case = last["body"]["case"]
                assert case["logged"] and not case["duplicate"]
                status = browser.find_element(By.ID, "case-status")
                code = status.get_attribute("data-code")
                assert code == case["code"] == browser.find_element(
                    By.ID, "case-code-value").text
                assert "logged in the site's case log" in status.text
                codes.append(code)
            # the same photo sent again (a retry): the first answer, not a second case
            browser.execute_script("document.getElementById('submit').click();")
            WebDriverWait(browser, 30).until(
                lambda d: "already answered" in d.find_element(By.ID, "case-status").text)
            assert len(_rows(cases)) == 3
            _kill9(proc)
        rows = {r["code"]: r for r in _rows(cases)}  # every answered case survived
        assert set(rows) == set(codes)
        for r in rows.values():
            assert (r["tester_id"], r["site_id"], r["consent_keep"]) == ("tester-7",
                                                                       "clinic-a", 1)
            assert r["photo"] and (cases / "photos" / r["photo"]).is_file()
            assert r["device_computed_on"] == "browser" and r["client_model_sha256"]
            assert json.loads(r["client"])["runtime"].startswith("litert.js")
        with serve(args, tmp_path / "s2.log") as (proc, url, token):
            browser.get(url + "/cases?token=wrong")
            assert "Wrong token" in browser.find_element(By.TAG_NAME, "body").text
            browser.get(f"{url}/cases?token={token}")
            assert browser.current_url == url + "/cases"  # the token left the address bar
            WebDriverWait(browser, 20).until(lambda d: len(d.find_elements(
                By.CSS_SELECTOR, "#cases-table tbody tr")) == 3)
            form = browser.find_element(By.ID, "label-form")
            form.find_element(By.ID, "label-case").send_keys(codes[0].lower())
            Select(form.find_element(By.ID, "label-diagnosis")).select_by_value("mel")
            Select(form.find_element(By.ID, "label-source")).select_by_value("histopathology")
            browser.execute_script("document.getElementById('label-date').value ="
                                   " '2026-11-28';")
            browser.find_element(By.ID, "label-submit").click()
            WebDriverWait(browser, 20).until(lambda d: d.find_element(
                By.ID, "label-status").get_attribute("data-ok") == "1")
            row = browser.find_element(By.CSS_SELECTOR, f'tr[data-code="{codes[0]}"]')
            WebDriverWait(browser, 20).until(lambda d: "mel (histopathology" in d.find_element(
                By.CSS_SELECTOR, f'tr[data-code="{codes[0]}"] td.label').text)
            delete = browser.find_element(By.CSS_SELECTOR,
                                          f'tr[data-code="{codes[2]}"] button.delete')
            delete.click()
            assert delete.text == "Confirm delete"
            delete.click()
            WebDriverWait(browser, 20).until(lambda d: len(d.find_elements(
                By.CSS_SELECTOR, "#cases-table tbody tr")) == 2)
            report = browser.find_element(By.ID, "report-body").text
            assert "2 cases" in report and "1 with a reference diagnosis" in report
            assert row is not None
    assert not (cases / "photos" / rows[codes[2]]["photo"]).exists()  # deleted with its case
    labels = tmp_path / "labels.csv"
    labels.write_text("case,diagnosis,other,source,date\n"
                      f"{codes[1]},nv,,dermatologist,{dt.date.today().isoformat()}\n")
    assert main(["cases", "import", str(labels), "--cases", str(cases)]) == 0
    out = tmp_path / "cases.csv"
    assert main(["cases", "export", "--cases", str(cases), "--out", str(out)]) == 0
    exported = {r["code"]: r for r in csv.DictReader(out.read_text().splitlines())}
    assert set(exported) == set(codes[:2])
    assert exported[codes[0]]["label_diagnosis"] == "mel"
    assert exported[codes[1]]["label_source"] == "dermatologist"
    for r in exported.values():
        assert r["device_top"] and r["device_computed_on"] == "browser"
        assert r["tester_id"] == "tester-7" and r["photo_kept"] == "1"
    capsys.readouterr()
    rc = main(["calibrate", "--cases", str(cases), "--device", str(b["int8"]), "--cloud",
               str(b["float32"]), "--out", str(tmp_path / "site.json")])
    err = capsys.readouterr().err
    assert rc == 3 and "1 labelled melanoma," in err and "Label 28 more melanomas" in err
    assert main(["report", "--cases", str(cases), "--out", str(tmp_path / "report")]) == 0
    rep = json.loads((tmp_path / "report" / "report.json").read_text())
    assert rep["cases"]["total"] == 2 and rep["labelled"]["n"] == 2
    builds = {json.loads(rows[c]["client"])["build"] for c in codes[:2]}  # what the page ran
    assert len(builds) == 1 and [r["build"] for r in rep["latency"]] == sorted(builds)

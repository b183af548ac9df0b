"""The review page served on a shared login node (issue 43): 127.0.0.1 only, the review's own files only, decisions
only with the session's token; and the page, served, sends its export there (headless Chromium)."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from spinecohort import layout
from spinecohort.cohort_qc import review_page
from spinecohort.review import read_decisions
from spinecohort.review_server import make_server

PNG = b"\x89PNG\r\n\x1a\n" + b"0" * 32


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, str, Path, Path]]:
    """A results folder with a two-image review page whose snapshots lie in a work folder; the server on it."""
    summary = tmp_path / "results" / "summary"
    summary.mkdir(parents=True)
    for name in ("a", "b"):
        path = tmp_path / "results" / "work" / "b0001" / "levels" / f"{name}_snp.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(PNG)
    (tmp_path / "results" / "work" / "b0001" / "levels" / "secret.png").write_bytes(PNG)
    (summary / "qc.parquet").write_bytes(b"not for the browser")
    table = pd.DataFrame({"image_id": ["a", "b"], "region": ["lumbar", "cervical"], "numbering": ["sacrum", "C2"],
                          "score": [0.3, 0.1], "fold_agreement": [0.9, 0.95], "flags": ["canal_gap", ""]})  # fmt: skip
    snapshots = {i: f"../work/b0001/levels/{i}_snp.png" for i in ("a", "b")}
    (summary / layout.QC_REVIEW).write_text(review_page(table, snapshots, 20, key="k"))
    decisions = tmp_path / "decisions.tsv"
    server, token = make_server(summary, decisions)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", token, decisions, summary
    finally:
        server.shutdown()
        server.server_close()


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def post(url: str, body: bytes) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST"), timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_it_binds_to_localhost_and_serves_the_page_and_its_snapshots_only(served):
    base, _, _, summary = served
    assert base.startswith("http://127.0.0.1:")
    assert get(base + "/")[0] == 200 and b"QC review" in get(base + "/" + layout.QC_REVIEW)[1]
    assert get(base + "/work/b0001/levels/a_snp.png") == (200, PNG)
    for path in ("/qc.parquet", "/work/b0001/levels/secret.png", "/../summary/qc.parquet", "/work/b0001/levels/../levels/a_snp.png",
                 "/%2e%2e/%2e%2e/etc/passwd", "/etc/passwd", "//etc/passwd", "/work/b0001/levels/a_snp.png/.."):
        assert get(base + path)[0] == 404, path


def test_decisions_need_the_token_and_are_checked_before_they_are_written(served):
    base, token, decisions, _ = served
    good = b"image_id\tdecision\tnote\na\treject\tL4 merged\n"
    assert post(base + "/decisions", good)[0] == 403
    assert post(base + "/decisions?token=" + token[:-1] + "x", good)[0] == 403
    assert post(base + "/elsewhere?token=" + token, good)[0] == 403
    status, text = post(base + "/decisions?token=" + token, b"image_id\tdecision\na\tmaybe\n")
    assert status == 400 and "row 2: decision 'maybe' is not one of accept, reject, fix" in text and not decisions.exists()
    assert post(base + "/decisions?token=" + token, good) == (200, f"1 decisions written to {decisions}\n")
    assert read_decisions(decisions).values.tolist() == [["a", "reject", "L4 merged"]]


def test_the_served_page_sends_its_export_with_the_token(served):
    from browser import chromium
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    base, token, decisions, _ = served
    with chromium() as browser:
        browser.get(f"{base}/#token={token}")
        body = browser.find_element(By.TAG_NAME, "body")
        for key in "ae":
            body.send_keys(key)
        WebDriverWait(browser, 10).until(lambda b: b.find_element(By.ID, "saved").text)
        saved = browser.find_element(By.ID, "saved").text
    assert saved == f"1 decisions written to {decisions}"
    assert read_decisions(decisions).values.tolist() == [["a", "accept", ""]]

"""The gate's Data Docs read well offline: nothing loads from a CDN, and Chromium, with every
non-file request blocked, renders the styled pages with the index table filled in."""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.sync_api import Request, expect, sync_playwright

from data_layer.data_docs import ASSETS, BUNDLED, external_assets, missing_local_assets
from data_layer.validation import ensure_valid
from tests.data_layer.test_validation import RULES, build_dataset

CHROMIUM = "/usr/bin/chromium"  # installed by `make test` when missing (tests/setup_system.sh)


def test_every_bundled_asset_is_shipped() -> None:
    assert all((ASSETS / file).is_file() for file in BUNDLED.values())


@pytest.fixture
def docs(tmp_path: Path, write_dicom) -> Path:
    """The Data Docs site the gate writes for a clean dataset."""
    dataset = build_dataset(tmp_path / "dataset", write_dicom)
    return Path(ensure_valid(dataset, RULES, tmp_path / "report").docs_path).parent


def test_pages_load_nothing_from_outside(docs: Path) -> None:
    assert len(list(docs.rglob("*.html"))) == 5
    assert external_assets(docs) == []
    assert missing_local_assets(docs) == []


def test_pages_render_offline_in_chromium(docs: Path, tmp_path: Path) -> None:
    blocked: list[str] = []
    failed: list[str] = []

    def offline(route, request: Request) -> None:
        if request.url.startswith("file://"):
            route.continue_()
        else:
            blocked.append(request.url)
            route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.route("**/*", offline)
        page.on("requestfailed", lambda request: failed.append(request.url))
        page.goto((docs / "index.html").as_uri())
        rows = page.locator("#section-1-content-block-2-1-body-table tbody tr")
        expect(rows).to_have_count(2)  # bootstrap-table filled the validation results from JavaScript
        expect(rows.first).to_contain_text("dataset-")
        assert page.evaluate("getComputedStyle(document.querySelector('.navbar')).display") == "flex"  # Bootstrap CSS
        assert page.evaluate("document.fonts.check('900 16px \"Font Awesome 6 Free\"')")
        page.screenshot(path=tmp_path / "data-docs-index.png", full_page=True)
        browser.close()
    assert blocked == [] and failed == []

"""Great Expectations Data Docs that read well offline.

GX's page templates load Bootstrap, jQuery, bootstrap-table, Font Awesome and the GX logo from
CDNs. On a network without internet the pages come out unstyled, and the index table is empty
(bootstrap-table fills it from JavaScript). `make_offline` copies the bundled copies
(`data_docs_assets/`, sources and licenses in its SOURCES.md) into the site and points every page
at them; what is not bundled (the dark theme, Vega for charts) is dropped from the pages.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

from great_expectations.data_context import EphemeralDataContext
from great_expectations.data_context.types.base import (
    DataContextConfig,
    InMemoryStoreBackendDefaults,
    ProgressBarsConfig,
)

import great_expectations as gx

log = logging.getLogger(__name__)

ASSETS = Path(__file__).with_name("data_docs_assets")
VENDOR_DIR = "static/vendor"
_FILTER_CONTROL_CSS = "bootstrap-table-filter-control.min.css"

BUNDLED = {
    "https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css": "bootstrap.min.css",
    "https://stackpath.bootstrapcdn.com/bootstrap/4.3.1/js/bootstrap.min.js": "bootstrap.min.js",
    "https://cdnjs.cloudflare.com/ajax/libs/popper.js/1.12.9/umd/popper.min.js": "popper.min.js",
    "https://code.jquery.com/jquery-3.7.1.min.js": "jquery.min.js",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.css": "bootstrap-table.min.css",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.js": "bootstrap-table.min.js",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/extensions/filter-control/bootstrap-table-filter-control.min.js":
        "bootstrap-table-filter-control.min.js",
    "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/bootstrap-table-filter-control.css":
        _FILTER_CONTROL_CSS,
    "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/bootstrap-table-filter-control.min.css":
        _FILTER_CONTROL_CSS,
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/css/bootstrap-datepicker.min.css":
        "bootstrap-datepicker.min.css",
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/js/bootstrap-datepicker.min.js":
        "bootstrap-datepicker.min.js",
    "https://cdnjs.cloudflare.com/ajax/libs/font-awesome/6.6.0/css/all.min.css": "fontawesome/css/all.min.css",
}
"""CDN URL in GX's templates → bundled file under `data_docs_assets/`."""

NOT_BUNDLED = (
    "https://cdn.jsdelivr.net/npm/@forevolve/bootstrap-dark@1.1.0/dist/css/bootstrap-prefers-dark.css",
    "https://cdn.jsdelivr.net/npm/vega@5",
    "https://cdn.jsdelivr.net/npm/vega-lite@5",
    "https://cdn.jsdelivr.net/npm/vega-embed@6",
)
"""Loaded by the templates but dropped offline: the dark theme and Vega (charts only)."""

_GX_LOGO = re.compile(r"https://great-expectations-web-assets\.s3\.us-east-2\.amazonaws\.com/(?:logo-long|full_logo_dark)\.png(?:\?d=[\w.]+)?")
_LOCAL_LOGO = "static/images/logo-long.png"  # GX's site builder copies its static/ folder into the site
_INTEGRITY = re.compile(r'\s(?:integrity|crossorigin)="[^"]*"')
_SITE_STATIC = re.compile(r"""(["'(])(?:\./|(?:\.\./)+)static/""")
"""A relative link into the site's static/ folder; GX miscounts the `../` on validation pages (favicon)."""


def data_docs_context(docs_dir: Path | None) -> EphemeralDataContext:
    """A throwaway in-memory GX context (nothing global, safe to run concurrently); with
    `docs_dir`, its Data Docs site is a folder there."""
    sites = {} if docs_dir is None else {
        "local_site": {
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir.resolve())},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }
    }
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        data_docs_sites=sites,
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def build_offline_data_docs(context: EphemeralDataContext, docs_dir: Path) -> list[str]:
    """Build the site afresh into `docs_dir` and make it offline; returns `external_assets`."""
    shutil.rmtree(docs_dir, ignore_errors=True)
    context.build_data_docs()
    return make_offline(docs_dir)


def make_offline(docs_dir: Path) -> list[str]:
    """Point every page of the site at the bundled assets; returns what still loads from outside
    (logged as a warning: it means a GX upgrade changed its templates)."""
    shutil.copytree(ASSETS, docs_dir / VENDOR_DIR, dirs_exist_ok=True, ignore=shutil.ignore_patterns("SOURCES.md"))
    for page in docs_dir.rglob("*.html"):
        page.write_text(_offline_page(page.read_text(encoding="utf-8"), _root_of(page, docs_dir)), encoding="utf-8")
        if "vegaEmbed(" in page.read_text(encoding="utf-8"):
            log.warning("%s draws charts with Vega, which is not bundled: they stay empty offline", page)
    remaining = external_assets(docs_dir)
    if remaining:
        log.warning("Data Docs still load from outside: %s (GX's templates changed; update data_layer/data_docs.py)",
                    ", ".join(remaining))
    return remaining


def external_assets(docs_dir: Path) -> list[str]:
    """Every stylesheet, script or image URL a page of the site loads from another host."""
    found: set[str] = set()
    for page in docs_dir.rglob("*.html"):
        found.update(url for url in _asset_urls(page.read_text(encoding="utf-8")) if "://" in url or url.startswith("//"))
    return sorted(found)


def missing_local_assets(docs_dir: Path) -> list[str]:
    """Local asset paths a page loads that are not in the site (a broken offline page)."""
    missing = set()
    for page in docs_dir.rglob("*.html"):
        for url in _asset_urls(page.read_text(encoding="utf-8")):
            if "://" not in url and not url.startswith(("//", "data:")) and not (page.parent / url).is_file():
                missing.add(f"{page.relative_to(docs_dir)}: {url}")
    return sorted(missing)


def _root_of(page: Path, docs_dir: Path) -> str:
    return Path(os.path.relpath(docs_dir, page.parent)).as_posix()


def _offline_page(html: str, root: str) -> str:
    for url in NOT_BUNDLED:
        html = re.sub(rf'<(script|link)\b[^>]*"{re.escape(url)}"[^>]*>(?:</script>)?\s*', "", html)
    for url, file in BUNDLED.items():
        html = html.replace(f'"{url}"', f'"{root}/{VENDOR_DIR}/{file}"')
    html = _GX_LOGO.sub(f"{root}/{_LOCAL_LOGO}", html)
    html = _SITE_STATIC.sub(lambda link: f"{link.group(1)}{root}/static/", html)
    return re.sub(r"<(script|link)\b[^>]*>", lambda tag: _INTEGRITY.sub("", tag.group(0)), html)


class _AssetParser(HTMLParser):
    """Collects what a page loads: `<link href>`, `<script src>`, `<img src>` and CSS `url(...)`."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        wanted = {"link": "href", "script": "src", "img": "src", "source": "srcset"}.get(tag)
        self.urls += [value for key, value in attrs if key == wanted and value]

    def handle_data(self, data: str) -> None:
        self.urls += re.findall(r"url\(\s*['\"]?([^'\")]+)['\"]?\s*\)", data)


def _asset_urls(html: str) -> list[str]:
    parser = _AssetParser()
    parser.feed(html)
    return parser.urls

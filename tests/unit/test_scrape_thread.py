"""A /metrics scrape runs Runtime.health in the HTTP server's thread, and can arrive while the
worker starts: it must not make Faust's consumer (``app.consumer`` is created on first access).
Made in the scrape thread, it was a second consumer that never started (the table manager's
start died with ConsumerNotStarted) or one bound to the scrape thread's event loop."""

from __future__ import annotations

import threading
from pathlib import Path

from prometheus_client import CollectorRegistry

from streamagg.app import build_app
from streamagg.settings import Settings
from streamagg.telemetry import Telemetry


def test_a_scrape_before_the_start_leaves_the_consumer_to_faust(tmp_path: Path) -> None:
    app, runtime = build_app(Settings(), Telemetry(CollectorRegistry()), tmp_path)
    scraped: list[object] = []
    scrape = threading.Thread(target=lambda: scraped.append(runtime.health()))
    scrape.start()
    scrape.join()
    assert scraped == [[]]  # no partition owned yet
    assert app._consumer is None  # Faust makes it on the event loop, at the start

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402


@pytest.fixture(scope="session")
def demo_api():
    api = harness.DemoApi()
    yield api
    api.stop()


@pytest.fixture
def envoy_factory(demo_api):
    started = []

    def start(http_filters, **kw):
        e = harness.Envoy(http_filters, kw.pop("upstream_port", demo_api.port), **kw)
        started.append(e)
        return e

    yield start
    for e in started:
        e.stop()

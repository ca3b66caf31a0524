"""Shared test settings: a fixed hypothesis profile (derandomized in CI), and a
certificate directory of the test run's own."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

from hypothesis import HealthCheck, settings

# `dht ctl`, `dht cluster` and `dht simulate` use the certificates in $DHT_CERTS_DIR, else
# ~/.config/dht/certs (docs/security.md): the tests never read or write the user's. A
# test that wants certificates there sets its own directory.
_CERTS = tempfile.mkdtemp(prefix="dht-tests-certs-")
atexit.register(shutil.rmtree, _CERTS, True)
os.environ["DHT_CERTS_DIR"] = _CERTS

settings.register_profile(
    "ci",
    max_examples=200,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=200, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))

import os
import sys

from hypothesis import HealthCheck, settings

# Make tests/strategies.py importable as a plain module.
sys.path.insert(0, os.path.dirname(__file__))

# Deterministic in CI: same examples every run, no shrinking database needed.
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=100,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", deadline=None, max_examples=100,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

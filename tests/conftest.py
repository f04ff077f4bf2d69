import os
import sys

from hypothesis import settings

# Make tests/strategies.py importable as a plain module.
sys.path.insert(0, os.path.dirname(__file__))

# Deterministic in CI: same examples every run, no shrinking database needed. All health checks are
# on: the strategies draw shapes, seeds and special values and build arrays with NumPy, so generation
# is cheap. deadline=None because no test asserts wall-clock time (a per-example deadline would be one).
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=100)
settings.register_profile("dev", deadline=None, max_examples=100)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

"""Test-wide settings."""

import os

from hypothesis import settings

# Hypothesis draws its examples from the tests' own source rather than fresh randomness, so a clean
# clone (no example database) runs exactly the examples every other run does. Exploring new
# examples is a separate, deliberate run: HYPOTHESIS_PROFILE=explore.
settings.register_profile("replayable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "replayable"))

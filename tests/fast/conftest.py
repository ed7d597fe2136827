"""Tests of the optional accelerator collapselab.fast: skipped as a whole where it is absent
(a default installation need not have it)."""

import importlib.util

collect_ignore_glob = [] if importlib.util.find_spec("collapselab.fast") else ["test_*.py"]

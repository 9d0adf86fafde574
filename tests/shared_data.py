"""Where the benchmark data (DSG-1K, TIFA v1.0) and KubeRay's CRDs are: ``$SELMA_SHARED_DATA``, else
``../shared/data`` beside the checkout. Tests that need them skip, saying where they looked."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SELMA_SHARED_DATA") or REPO.parent / "shared" / "data")
BENCHMARKS = SHARED_DATA / "benchmarks"
CRD_DIR = SHARED_DATA / "kuberay-crds"
needs_benchmarks = pytest.mark.skipif(not (BENCHMARKS / "dsg-1k-anns.csv").is_file(),
                                      reason=f"no benchmark data in {BENCHMARKS} (set SELMA_SHARED_DATA)")

"""The examples stay runnable."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_federate_existing_trainer_runs_a_local_federation():
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "federate_existing_trainer.py"), "--local"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("federated training done after 6 epochs") == 2
    assert result.stderr.count("fhe round 3/3") == 2

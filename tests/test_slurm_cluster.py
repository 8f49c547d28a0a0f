"""The real single-node SLURM cluster (tests/slurm_harness.py): array jobs, afterok dependencies, final states."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slurm


def test_array_then_afterok_dependent(slurm_cluster, tmp_path):
    array = slurm_cluster.sbatch([
        "--array=0-1", f"--chdir={tmp_path}", "--output=array_%a.log",
        "--wrap", "echo $SLURM_ARRAY_TASK_ID > task_$SLURM_ARRAY_TASK_ID.txt",
    ])
    dependent = slurm_cluster.sbatch([
        f"--dependency=afterok:{array}", "--kill-on-invalid-dep=yes", f"--chdir={tmp_path}", "--output=dep.log",
        "--wrap", "cat task_0.txt task_1.txt > all.txt",
    ])
    slurm_cluster.wait([array, dependent], timeout=120)

    assert (tmp_path / "task_0.txt").read_text() == "0\n"
    assert (tmp_path / "task_1.txt").read_text() == "1\n"
    assert (tmp_path / "all.txt").read_text() == "0\n1\n"
    assert slurm_cluster.states([array, dependent]) == {
        f"{array}_0": "COMPLETED", f"{array}_1": "COMPLETED", dependent: "COMPLETED",
    }


def test_failed_task_cancels_afterok_dependent(slurm_cluster, tmp_path):
    """Resubmission relies on this: one failed array task makes the afterok dependent's dependency unsatisfiable,
    and --kill-on-invalid-dep=yes cancels it (state CANCELLED, never started) instead of leaving it pending."""
    array = slurm_cluster.sbatch([
        "--array=0-1", f"--chdir={tmp_path}", "--output=array_%a.log",
        "--wrap", "touch task_$SLURM_ARRAY_TASK_ID.ran; exit $SLURM_ARRAY_TASK_ID",
    ])
    dependent = slurm_cluster.sbatch([
        f"--dependency=afterok:{array}", "--kill-on-invalid-dep=yes", f"--chdir={tmp_path}", "--output=dep.log",
        "--wrap", "touch dependent.ran",
    ])
    slurm_cluster.wait([array, dependent], timeout=120)

    assert (tmp_path / "task_0.ran").exists() and (tmp_path / "task_1.ran").exists()
    assert not (tmp_path / "dependent.ran").exists()
    assert slurm_cluster.states([array, dependent]) == {
        f"{array}_0": "COMPLETED", f"{array}_1": "FAILED", dependent: "CANCELLED",
    }

"""Retry from the UI resumes at the failed stage: a served deployment (`npd serve`) on a real
`prefect server start`, NPD_FAIL_AT fails one stage of round 2 once, the failed flow run is
set to AwaitingRetry exactly as Prefect 3.9's Retry dialog does, and the served process runs
it again under the same flow run id."""

from __future__ import annotations

import pytest
from resume_checks import (
    STAGE_NAMES,
    all_stages,
    assert_nothing_duplicated_or_orphaned,
    assert_same_as_reference,
    flow_run,
    only_run_id,
    retry_like_ui,
    served,
    stage_counts,
    stage_states,
    start_run,
    subflow_runs,
    wait_final,
    write_config,
)


@pytest.mark.parametrize(
    "stage", [s if s == "train" else pytest.param(s, marks=pytest.mark.slow) for s in STAGE_NAMES]
)
def test_ui_retry_resumes_at_failed_stage(stage, tmp_path, tiny_world, prefect_api, reference):
    failed = (stage, 2)
    out = tmp_path / "out"
    cfg = write_config(tmp_path, tiny_world)
    with served(prefect_api, cfg, out, f"retry-{stage}", NPD_FAIL_AT=f"{stage}:2") as dep:
        run = start_run(prefect_api, dep)
        first = wait_final(prefect_api, run)
        assert first["state_type"] == "FAILED", first["state"]
        run_id = only_run_id(out)
        ran_first = stage_counts(out, run_id)
        assert ran_first[failed] == 1

        accepted = retry_like_ui(prefect_api, run)
        assert accepted["status"] == "ACCEPT", accepted
        second = wait_final(prefect_api, run, min_runs=2)
    assert second["state_type"] == "COMPLETED", second["state"]
    assert flow_run(prefect_api, run)["id"] == run and second["run_count"] == 2

    # (a) what finished before the failure came back Cached and its body did not run again;
    # the failed stage and everything after it ran once more
    subflows = subflow_runs(prefect_api, run)
    assert len(subflows) == 2  # the failed distill subflow run and the retried one
    before, after = (stage_states(prefect_api, s) for s in subflows)
    assert before[failed] == "Failed"
    done_first = {k for k, n in ran_first.items() if k != failed}
    assert {k for k, v in after.items() if v == "Cached"} == done_first
    assert {k for k, v in after.items() if v == "Completed"} == all_stages() - done_first
    counts = stage_counts(out, run_id)
    assert set(counts) == all_stages()
    assert {k: n for k, n in counts.items() if n != 1} == {failed: 2}

    # (b) the same tables and weights as a clean run; (c) nothing twice, nothing left over
    rows = assert_same_as_reference(out, run_id, reference)
    assert rows["samples"] == 2 * 32 and rows["evals"] == 3
    assert_nothing_duplicated_or_orphaned(out, run_id)

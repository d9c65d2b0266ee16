"""Retry from the UI resumes at the failed stage: a served deployment (`npd serve`) on a real
`prefect server start`; NPD_FAIL_AT fails each stage of round 2 once, in turn, so one flow run
fails six times; after each failure it is set to AwaitingRetry exactly as Prefect 3.9's Retry
dialog does, and the served process runs it again under the same flow run id."""

from __future__ import annotations

from collections import Counter

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


def test_ui_retry_resumes_at_each_failed_stage(tmp_path, tiny_world, prefect_api, reference):
    """Attempt k fails at stage k of round 2. Each retry brings back Cached exactly what the
    attempts before it finished (their bodies do not run again) and runs the failed stage and
    what follows; the last retry completes the run, with the tables and weights of a clean run."""
    out = tmp_path / "out"
    cfg = write_config(tmp_path, tiny_world)
    fail_at = ",".join(f"{s}:2" for s in STAGE_NAMES)
    finished: set[tuple[str, int]] = set()  # stages whose body ran to the end, so far
    counts: Counter = Counter()
    with served(prefect_api, cfg, out, "retry-chain", NPD_FAIL_AT=fail_at) as dep:
        run = start_run(prefect_api, dep)
        for k in range(len(STAGE_NAMES) + 1):
            state = wait_final(prefect_api, run, min_runs=k + 1)
            failed = (STAGE_NAMES[k], 2) if k < len(STAGE_NAMES) else None
            want = "FAILED" if failed else "COMPLETED"
            assert state["state_type"] == want, (k, state["state"])
            assert flow_run(prefect_api, run)["id"] == run and state["run_count"] == k + 1
            subflows = subflow_runs(prefect_api, run)
            assert len(subflows) == k + 1  # one distill subflow run per attempt
            states = stage_states(prefect_api, subflows[-1])
            now = stage_counts(out, only_run_id(out))
            ran = {key for key in now if now[key] > counts[key]}
            assert all(now[key] - counts[key] == 1 for key in ran)
            # what earlier attempts finished came back Cached and did not run again
            assert {key for key, v in states.items() if v == "Cached"} == finished
            assert not ran & finished
            if failed:
                assert states[failed] == "Failed" and failed in ran
            if k:  # the stage the previous attempt failed at ran again
                assert (STAGE_NAMES[k - 1], 2) in ran
            finished |= ran - {failed}
            counts = now
            if failed:
                accepted = retry_like_ui(prefect_api, run)
                assert accepted["status"] == "ACCEPT", accepted
    assert finished == all_stages()
    assert {k: n for k, n in counts.items() if n != 1} == {(s, 2): 2 for s in STAGE_NAMES}

    # the same tables and weights as a clean run; nothing twice, nothing left over
    run_id = only_run_id(out)
    rows = assert_same_as_reference(out, run_id, reference)
    assert rows["samples"] == 2 * 32 and rows["evals"] == 3
    assert_nothing_duplicated_or_orphaned(out, run_id)

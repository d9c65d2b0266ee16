"""Scale-out measured side by side in one run (``npd bench scale``): a round's generation and
scoring on K = 1 and K = 2 Ray workers, and its training on N = 1 and N = 2 torchrun ranks
(gloo), one thread each; seconds, speedups, the one-time overheads apart, and whether the
results are the same.

Nothing here is a second implementation: a shard is ``stages.generate_stage`` /
``score_stage`` with a ``Shard``, made visible by ``stages.commit_stage``, as the distill flow's
shard tasks do; the learner is ``stages.train_stage`` with ``train.nproc`` N, on the persistent
ranks of ``pipeline.workers``. The shards go to Ray as plain remote functions (one CPU each), so
the dispatch measured is Ray's; the flow's shard tasks add Prefect's task engine on each worker.

What is measured (``time.perf_counter`` / ``time.time`` on this machine):

- ``ray_start_s``: ``ray.init`` of a local cluster (None when this process had joined one);
- ``workers_start_s``: K workers importing the stages (once per cluster, before the arms);
- per arm K: ``seconds`` from the first shard's submission to the score commit's end, and
  ``dispatch_s``, the longest wait from a shard's submission to its body's start, per stage;
- ``torchrun_start_s``: starting the N ranks (the first train job pays it; a flow run once);
- per arm N: ``seconds``, the train stage's time less the ranks' start.

Speedups are the K = 1 (N = 1) seconds over the K = 2 (N = 2) seconds, as reported. The results
must agree: the ``samples`` tables identical, the ``scores`` within 1e-5 (the issue's tolerance),
the weights of N = 2 within 1e-5 of N = 1's (ddp) per 10 optimizer steps.

Ray is imported only where shards run (the ``ray`` extra); the learner half needs none.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from safetensors.torch import load_file

from npd_core.config import NPDConfig
from npd_core.pipeline import stages, workers
from npd_core.pipeline.spec import RunSpec
from npd_core.store import SCORE_COLUMNS, Shard

PROV = {"flow_run_id": "bench-scale", "task_run_id": "bench-scale"}
# Small settings of `npd bench scale --tiny` (the tiny toy world): a round of 16 prompts
TINY_SCALE = dict(
    data={"prompts_per_round": 16, "eval_size": 8},
    generate={"max_new_tokens": 24, "n_per_prompt": 2},
    filter={"rule": "none", "drop_unfinished": False},
    pack={"max_seq_len": 64},
    train={"steps_per_round": 4, "rows_per_step": 4},
)
TOLERANCE = 1e-5  # scores and weights (ddp), the issue's
VOLATILE = ("run_id", "created_at", "flow_run_id", "task_run_id")
SAMPLE_FLOATS = ("sample_logprob_sum",)  # the generator's own sum: within 1e-6 relative
SCORE_FLOATS = (*SCORE_COLUMNS, "student_forward_kl_sum", "topk_logprobs")
SAMPLE_KEY = [("prompt_id", "ascending"), ("sample_idx", "ascending")]
Log = Callable[[str], None]


def arm_spec(base: RunSpec, run_id: str, threads: int = 1, **sections: dict[str, Any]) -> RunSpec:
    """``base`` as run ``run_id`` on ``threads`` torch threads a stage, with ``sections``
    (config section → fields) merged into its config."""
    config = dict(base.config)
    for name, fields in sections.items():
        config[name] = {**config.get(name, {}), **fields}
    cfg = NPDConfig.model_validate(config)
    return dataclasses.replace(
        base, run_id=run_id, config=cfg.model_dump(mode="json"), threads=threads
    )


# ---------------------------------------------------------------- shards on Ray
def _shard(stage: str, spec: RunSpec, r: int, shard: Shard, submitted: float) -> dict[str, Any]:
    """One shard of ``stage`` on a Ray worker; its result plus when it was submitted."""
    fn = stages.generate_stage if stage == "generate" else stages.score_stage
    return {**fn(spec, r, PROV, shard=shard).to_dict(), "submitted": submitted}


def _ready() -> float:
    """A worker's first task: the stages imported (this module imports them)."""
    return time.time()


def _sharded_stage(remote: Any, ray: Any, spec: RunSpec, stage: str, k: int) -> dict[str, Any]:
    """``stage`` of round 1 in ``k`` shards on Ray, then its commit; its seconds and dispatch."""
    t0 = time.perf_counter()
    refs = [remote.remote(stage, spec, 1, Shard(i, k), time.time()) for i in range(k)]
    parts = ray.get(refs)
    res = stages.commit_stage(spec, 1, stage, parts)
    return {
        "seconds": time.perf_counter() - t0,
        "dispatch_s": max(p["started"] - p["submitted"] for p in parts),
        "shard_seconds": [p["seconds"] for p in parts],
        "commit_s": res.metrics.commit_s,
    }


def shard_arms(base: RunSpec, shards: Sequence[int], log: Log) -> dict[str, Any]:
    """Round 1 generated and scored in K shards on Ray, K in ``shards`` (run ``scale-k<K>``),
    each shard on one worker with one CPU and one torch thread."""
    import ray

    started = not ray.is_initialized()
    t0 = time.perf_counter()
    if started:
        ray.init(num_cpus=max(shards), include_dashboard=False, log_to_driver=False)
    ray_start_s = time.perf_counter() - t0 if started else None
    try:
        remote = ray.remote(num_cpus=1, max_retries=0)(_shard)
        t0 = time.perf_counter()
        ray.get([ray.remote(num_cpus=1)(_ready).remote() for _ in range(max(shards))])
        workers_start_s = time.perf_counter() - t0
        arms = []
        for k in shards:
            spec = arm_spec(base, f"scale-k{k}", orchestration={"shards": k})
            gen = _sharded_stage(remote, ray, spec, "generate", k)
            sc = _sharded_stage(remote, ray, spec, "score", k)
            arm = {
                "k": k,
                "seconds": gen["seconds"] + sc["seconds"],
                "generate": gen,
                "score": sc,
                "dispatch_s": gen["dispatch_s"] + sc["dispatch_s"],
            }
            log(f"K={k}: generate + score {arm['seconds']:.2f} s, dispatch {arm['dispatch_s']:.2f}")
            arms.append(arm)
    finally:
        if started:
            ray.shutdown()
    one, two = (arm_spec(base, f"scale-k{k}") for k in (shards[0], shards[-1]))
    return {
        "ray_start_s": ray_start_s,
        "ray_cluster": "started" if started else "joined",
        "workers_start_s": workers_start_s,
        "arms": arms,
        "speedup": arms[0]["seconds"] / arms[-1]["seconds"],
        **same_tables(one, two),
    }


def same_tables(a: RunSpec, b: RunSpec) -> dict[str, Any]:
    """Round 1 of runs ``a`` and ``b`` compared: samples (every column but the provenance and
    the generator's own log-prob sum, which is compared within 1e-6 relative) and scores."""
    sa, sb = (_table(x, "generate", "samples") for x in (a, b))
    rel = _max_diff(sa, sb, SAMPLE_FLOATS, relative=True)
    drop = [*VOLATILE, *SAMPLE_FLOATS]
    samples_identical = sa.drop_columns(drop).equals(sb.drop_columns(drop)) and rel <= 1e-6
    ca, cb = (_table(x, "score", "scores") for x in (a, b))
    floats = [c for c in SCORE_FLOATS if c in ca.column_names]
    diff = _max_diff(ca, cb, floats)
    rest = [*VOLATILE, *floats]
    return {
        "samples": sa.num_rows,
        "samples_identical": bool(samples_identical),
        "sample_logprob_max_rel_diff": rel,
        "scores_max_abs_diff": diff,
        "scores_agree": bool(
            diff <= TOLERANCE and ca.drop_columns(rest).equals(cb.drop_columns(rest))
        ),
        "tolerance": TOLERANCE,
    }


def _table(spec: RunSpec, stage: str, name: str) -> pa.Table:
    return spec.store.read_stage(spec.run_id, 1, stage, name).sort_by(SAMPLE_KEY)


def _max_diff(a: pa.Table, b: pa.Table, columns: Sequence[str], relative: bool = False) -> float:
    """Largest absolute (or relative) difference of the float ``columns`` (lists flattened);
    inf where one table has a value that the other lacks."""
    worst = 0.0
    for c in columns:
        x, y = (_flat(t.column(c)) for t in (a, b))
        if x.shape != y.shape or not np.array_equal(np.isnan(x), np.isnan(y)):
            return float("inf")
        d = np.abs(x - y) / (np.abs(x) if relative else 1.0)
        worst = max(worst, float(np.nanmax(d, initial=0.0)))
    return worst


def _flat(col: pa.ChunkedArray) -> np.ndarray:
    """A float column's values, lists flattened, nulls as NaN."""
    arr = col.combine_chunks()
    while pa.types.is_list(arr.type):
        arr = arr.flatten()
    return arr.to_numpy(zero_copy_only=False).astype(np.float64)


# ---------------------------------------------------------------- the learner on N ranks
def train_arms(spec: RunSpec, nprocs: Sequence[int], log: Log) -> dict[str, Any]:
    """Round 1 of ``spec`` (its samples through pack already stored) trained once per N in
    ``nprocs`` (ddp, one thread a rank; each arm rewrites θ_1); seconds and the weights."""
    arms, weights = [], []
    for n in nprocs:
        arm = arm_spec(spec, spec.run_id, n, train={"nproc": n, "strategy": "ddp"})  # 1 a rank
        res = stages.train_stage(arm, 1, PROV)
        start = res.metrics.ranks_start_s
        arms.append(
            {
                "nproc": n,
                "seconds": res.seconds - (start or 0.0),
                "torchrun_start_s": start,
                "steps": res.metrics.steps,
            }
        )
        weights.append(load_file(Path(spec.checkpoint(1)) / "model.safetensors"))
        log(f"N={n}: train {arms[-1]['seconds']:.2f} s (ranks start {start or 0:.2f} s)")
    diff = max(float((weights[0][k] - weights[-1][k]).abs().max()) for k in weights[0])
    # the 1e-5 is for a 10-step round; the all-reduce's float32 summation order adds a
    # little with every step (toy round, 71 steps: 1.6e-5), so the bound grows with the steps
    tolerance = TOLERANCE * max(1.0, arms[-1]["steps"] / 10)
    return {
        "strategy": "ddp",
        "arms": arms,
        "torchrun_start_s": arms[-1]["torchrun_start_s"],
        "speedup": arms[0]["seconds"] / arms[-1]["seconds"],
        "weights_max_abs_diff": diff,
        "weights_agree": diff <= tolerance,
        "tolerance": tolerance,
    }


def run_bench(
    base: RunSpec,
    *,
    shards: Sequence[int] = (1, 2),
    nprocs: Sequence[int] = (1, 2),
    log: Log = print,
) -> dict[str, Any]:
    """Both halves on ``base`` (a one-round run spec in a fresh output directory): the shard
    arms on Ray, then the learner arms on the K = ``shards[0]`` run's round 1 (filtered and
    packed here; produced here without Ray when ``shards`` is empty)."""
    out: dict[str, Any] = {"threads_per_worker": 1}
    one = arm_spec(base, f"scale-k{shards[0] if shards else 1}")
    if shards:
        out["shards"] = shard_arms(base, shards, log)
    else:
        for stage in (stages.generate_stage, stages.score_stage):
            stage(one, 1, PROV)
    if nprocs:
        for stage in (stages.filter_stage, stages.pack_stage):
            stage(one, 1, PROV)
        with workers.scope():
            out["train"] = train_arms(one, nprocs, log)
    return out


def scale_spec(out: Path, config: Path | None, tiny: bool, log: Log) -> RunSpec:
    """The one-round run the bench measures, in ``out/bench-scale`` (emptied first): the toy world
    (``tiny``: the tiny one and ``TINY_SCALE``) under ``config``'s settings, one thread a stage,
    float32 (the layouts' results are compared), teacher and student scored per sequence as a run
    on CPU scores."""
    import shutil

    from npd_core.config import load_config
    from npd_core.pipeline.kernels import choose_attention
    from npd_core.store import Store
    from npd_core.toy.world import ToySpec, build_toy_world

    overrides: dict[str, Any] = {**(TINY_SCALE if tiny else {}), "rounds": 1, "threads": 1}
    overrides["models"] = {"bf16": False}
    cfg = load_config(config, overrides)
    Store(out)
    world = build_toy_world(out / "toy", ToySpec.tiny() if tiny else None, log=log)
    root = out / "bench-scale"
    shutil.rmtree(root, ignore_errors=True)
    Store(root)
    paths = (world.teacher, world.student, world.train_prompts, world.eval_prompts)
    base = RunSpec(str(root), "scale", cfg.model_dump(mode="json"), *map(str, paths))
    return choose_attention(base, log, roles=("score_teacher", "score_student"))

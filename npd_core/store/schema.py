"""The store's tables and views: one Arrow schema per Parquet table, one SQL statement per view.

Where the files live and why the views read them this way is told in :mod:`npd_core.store.store`;
this module is the data model alone (pyarrow, no DuckDB). Change a schema or a view and bump
SCHEMA_VERSION: stores written by an older npd then get their placeholders and views rebuilt.
"""

from __future__ import annotations

import pyarrow as pa

from npd_core.config import DEFAULT_EVAL_SET
from npd_core.errors import StoreError, first_line

SCHEMA_VERSION = 7
# 2: derived best/regressed checkpoints, run lineage columns
# 3: Δ-IFD columns nullable (not computed when the filter rule needs none), the student's
#    forward KL per sample, the filter rule and its parameters per row, dropped KL per round
# 4: the eval set of each evaluation and eval prompt (eval.sets); checkpoints score the run's
#    eval.primary set
# 5: the generate and score stages of a sharded round hold one file per shard
#    (samples-00000-of-00002.parquet, …; orchestration.shards): the views read them all
# 6: where each training sequence comes from (samples.source: student, teacher or reference,
#    data.mix; null in older files reads as student), the generator's log-prob of each sampled
#    token (samples.token_logprobs) and the teacher's (scores.teacher_token_logprobs), both
#    stored where train.loss sampled_reverse_kl reads them
# 7: each sample's learner ratio and weight in each train step (step_weights, written by the
#    train stage where filter.score learner_ratio weighs the steps)
STAGES = ("generate", "score", "filter", "pack", "train", "evaluate", "summary")

# --------------------------------------------------------------------------------------------
# Column schemas. Non-nullable fields are required by table_from_rows and write_stage.
# --------------------------------------------------------------------------------------------

_TS = pa.timestamp("us", tz="UTC")


def _req(name: str, type_: pa.DataType) -> pa.Field:
    return pa.field(name, type_, nullable=False)


def _opt(name: str, type_: pa.DataType) -> pa.Field:
    return pa.field(name, type_, nullable=True)


_RUN_ROUND = [_req("run_id", pa.string()), _req("round", pa.int32())]
_SAMPLE_KEY = [*_RUN_ROUND, _req("prompt_id", pa.string()), _req("sample_idx", pa.int32())]
_PROVENANCE = [
    _opt("flow_run_id", pa.string()),
    _opt("task_run_id", pa.string()),
    _req("created_at", _TS),
]

SAMPLES_SCHEMA = pa.schema(
    [
        *_SAMPLE_KEY,
        _req("prompt", pa.string()),
        _req("response", pa.string()),
        _req("prompt_token_ids", pa.list_(pa.int32())),
        _req("response_token_ids", pa.list_(pa.int32())),
        _req("generator_checkpoint", pa.string()),
        _req("backend", pa.string()),
        _req("temperature", pa.float32()),
        _req("top_p", pa.float32()),
        _opt("seed", pa.int64()),
        _opt("teacher", pa.string()),
        _req("prompt_tokens", pa.int32()),
        _req("response_tokens", pa.int32()),
        _req("finished", pa.bool_()),  # EOS seen
        _opt("sample_logprob_sum", pa.float32()),  # generator's log-prob of its sampled tokens
        # student | teacher | reference (data.mix; schema 6) | junk-stale | junk-loop (plant_junk)
        _opt("source", pa.string()),
        _opt("token_logprobs", pa.list_(pa.float32())),  # (response_tokens,) the generator's
        *_PROVENANCE,
    ]
)

# Sums are over response tokens; "cond." = conditioned on the prompt, "resp" = after the
# prompt-less view (filter.view). ifd_* are log IFD (resp vs conditioned, per token);
# delta_ifd = ifd_teacher - ifd_student. All but the teacher's conditional sum are null where the
# round scored no prompt-less view (filter.rule none without compute_delta_ifd).
SCORE_COLUMNS = (
    "teacher_logprob_sum",
    "student_logprob_sum",
    "teacher_resp_logprob_sum",
    "student_resp_logprob_sum",
    "ifd_teacher",
    "ifd_student",
    "delta_ifd",
)
SCORES_SCHEMA = pa.schema(
    [
        *_SAMPLE_KEY,
        _req(SCORE_COLUMNS[0], pa.float32()),
        *(_opt(name, pa.float32()) for name in SCORE_COLUMNS[1:]),
        _opt("student_forward_kl_sum", pa.float32()),  # Σ_t KL(teacher top-k ‖ generator)
        _opt("topk_ids", pa.list_(pa.list_(pa.int32()))),  # (response_tokens, k)
        _opt("topk_logprobs", pa.list_(pa.list_(pa.float32()))),  # (response_tokens, k)
        _opt("teacher_token_logprobs", pa.list_(pa.float32())),  # (response_tokens,) schema 6
        *_PROVENANCE,
    ]
)

FILTER_SCHEMA = pa.schema(
    [
        *_SAMPLE_KEY,
        _req("kept", pa.bool_()),
        _opt("filter_reason", pa.string()),  # null when kept
        _opt("rule", pa.string()),  # filter.rule of the round (null: written before schema 3)
        _opt("rule_params", pa.string()),  # its parameters, JSON
        *_PROVENANCE,
    ]
)

RUNS_SCHEMA = pa.schema(
    [
        _req("run_id", pa.string()),
        _opt("name", pa.string()),
        _req("status", pa.string()),
        _req("config_json", pa.string()),
        _req("config_hash", pa.string()),
        _opt("flow_run_id", pa.string()),
        _opt("mlflow_run_id", pa.string()),
        _opt("mlflow_uri", pa.string()),
        _opt("teacher", pa.string()),
        _opt("student", pa.string()),
        _opt("deployment", pa.string()),  # lineage of scheduled runs: "<flow>/<deployment>"
        _opt("parent_run_id", pa.string()),  # the run whose checkpoint is this run's θ_0
        _opt("parent_round", pa.int32()),
        _opt("start_score", pa.float64()),
        _opt("final_score", pa.float64()),
        _req("created_at", _TS),
        _opt("finished_at", _TS),
    ]
)

PROMPTS_SCHEMA = pa.schema(
    [
        _req("run_id", pa.string()),
        _req("prompt_id", pa.string()),
        _req("prompt", pa.string()),
        _opt("answer", pa.string()),
        _req("split", pa.string()),  # 'train' | 'eval'
        _opt("eval_set", pa.string()),  # the eval set of an 'eval' prompt (schema 4)
    ]
)

ROUNDS_SCHEMA = pa.schema(
    [
        *_RUN_ROUND,
        _req("n_generated", pa.int32()),
        _req("n_kept", pa.int32()),
        _opt("train_tokens", pa.int64()),
        _opt("mean_loss", pa.float64()),
        _opt("score", pa.float64()),
        _opt("kept_fraction", pa.float64()),
        _opt("filter_rule", pa.string()),
        _opt("dropped_kl_share", pa.float64()),  # share of the round's forward-KL mass dropped
        _opt("delta_ifd_q05", pa.float64()),
        _opt("delta_ifd_q50", pa.float64()),
        _opt("delta_ifd_q95", pa.float64()),
        _opt("stage_seconds_json", pa.string()),
        _opt("flow_run_id", pa.string()),
        _req("created_at", _TS),
    ]
)

CHECKPOINTS_SCHEMA = pa.schema(
    [
        *_RUN_ROUND,
        _req("path", pa.string()),  # relative to the output directory
        _req("step", pa.int64()),
        _req("train_tokens", pa.int64()),
        _req("created_at", _TS),
    ]
)
# Columns the checkpoints view derives from evals and the run's config (never stored, so a later
# evaluation or a better round never rewrites a train shard).
CHECKPOINT_DERIVED = ("eval_set", "metric", "score", "best_before", "is_best", "regressed")

EVALS_SCHEMA = pa.schema(
    [
        *_RUN_ROUND,
        _opt("eval_set", pa.string()),  # null in files written before schema 4: the one set
        _req("checkpoint", pa.string()),
        _req("metric", pa.string()),
        _req("score", pa.float64()),
        _req("n", pa.int32()),
        _opt("flow_run_id", pa.string()),
        _req("created_at", _TS),
    ]
)

PACK_SCHEMA = pa.schema(
    [
        *_SAMPLE_KEY[:2],
        _req("row", pa.int32()),  # packed row index
        _req("slot", pa.int32()),  # position of the sample within its row
        *_SAMPLE_KEY[2:],
        _req("length", pa.int32()),  # tokens (prompt + response, after the overlong policy)
    ]
)

# One row per sample and train step where filter.score learner_ratio weighs the steps: the
# sample's mean per-token log p_learner − log p_generator in that step (null: a fixed source,
# data.mix, exempt) and the weight its loss took (0: beyond the rule's bounds).
STEP_WEIGHTS_SCHEMA = pa.schema(
    [
        *_RUN_ROUND,
        _req("step", pa.int64()),  # the learner's optimizer step (checkpoints.step counts them)
        *_SAMPLE_KEY[2:],
        _opt("ratio", pa.float32()),
        _req("weight", pa.float32()),
        _req("created_at", _TS),
    ]
)

# Table name (= file stem) -> schema. Tables with these names are cast to them on write.
SCHEMAS: dict[str, pa.Schema] = {
    "samples": SAMPLES_SCHEMA,
    "scores": SCORES_SCHEMA,
    "filter": FILTER_SCHEMA,
    "runs": RUNS_SCHEMA,
    "prompts": PROMPTS_SCHEMA,
    "rounds": ROUNDS_SCHEMA,
    "checkpoints": CHECKPOINTS_SCHEMA,
    "evals": EVALS_SCHEMA,
    "pack": PACK_SCHEMA,
    "step_weights": STEP_WEIGHTS_SCHEMA,
}

# --------------------------------------------------------------------------------------------
# View SQL. Paths are relative to the output directory (resolved through file_search_path).
# --------------------------------------------------------------------------------------------

STORE_META_VIEW_SQL = f"""
CREATE OR REPLACE VIEW store_meta AS SELECT CAST({SCHEMA_VERSION} AS INTEGER) AS schema_version
"""
RUNS_VIEW_SQL = """
CREATE OR REPLACE VIEW runs AS
SELECT * FROM read_parquet(['.npd/empty/runs.parquet', 'runs/*/run/runs.parquet'],
                           hive_partitioning = false, allow_empty = true, union_by_name = true)
"""
PROMPTS_VIEW_SQL = f"""
CREATE OR REPLACE VIEW prompts AS
SELECT * REPLACE (CASE WHEN split = 'eval' THEN coalesce(eval_set, '{DEFAULT_EVAL_SET}') END
                  AS eval_set)
FROM read_parquet(['.npd/empty/prompts.parquet', 'runs/*/run/prompts.parquet'],
                  hive_partitioning = false, allow_empty = true, union_by_name = true)
"""
ROUNDS_VIEW_SQL = """
CREATE OR REPLACE VIEW rounds AS
SELECT * FROM read_parquet(['.npd/empty/rounds.parquet', 'runs/*/round=*/summary/rounds.parquet'],
                           hive_partitioning = false, allow_empty = true, union_by_name = true)
"""
# Evaluations written before schema 4 scored the run's one set: they read as the default set.
EVALS_VIEW_SQL = f"""
CREATE OR REPLACE VIEW evals AS
SELECT * REPLACE (coalesce(eval_set, '{DEFAULT_EVAL_SET}') AS eval_set)
FROM read_parquet(['.npd/empty/evals.parquet', 'runs/*/round=*/evaluate/evals.parquet'],
                  hive_partitioning = false, allow_empty = true, union_by_name = true)
"""
# Every evaluated checkpoint of a run, θ_0 (round 0, the run's starting student) included, with
# its score on the run's primary eval set (eval.primary; runs without it have only the default
# set). is_best: the run's highest score (ties: the later round). best_before: the best
# score of the earlier rounds; regressed: more than the run's eval.regression_margin below it.
# union_by_name: shards of schema 1 still carry the score/is_best placeholders they had then.
CHECKPOINTS_VIEW_SQL = f"""
CREATE OR REPLACE VIEW checkpoints AS
WITH primary_evals AS (
    SELECT e.* FROM evals AS e LEFT JOIN runs AS r ON r.run_id = e.run_id
    WHERE e.eval_set = coalesce(json_extract_string(r.config_json, '$.eval.primary'),
                                '{DEFAULT_EVAL_SET}')
), trained AS (
    SELECT run_id, round, path, step, train_tokens, created_at
    FROM read_parquet(['.npd/empty/checkpoints.parquet',
                       'runs/*/round=*/train/checkpoints.parquet'],
                      hive_partitioning = false, allow_empty = true, union_by_name = true)
), scored AS (
    SELECT coalesce(t.run_id, e.run_id) AS run_id, coalesce(t.round, e.round) AS round,
           coalesce(t.path, e.checkpoint) AS path, coalesce(t.step, 0) AS step,
           coalesce(t.train_tokens, 0) AS train_tokens,
           coalesce(t.created_at, e.created_at) AS created_at, e.eval_set, e.metric, e.score
    FROM trained AS t FULL OUTER JOIN primary_evals AS e
      ON t.run_id = e.run_id AND t.round = e.round
), ranked AS (
    SELECT *,
           max(score) OVER (PARTITION BY run_id ORDER BY round
                            ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS best_before,
           score IS NOT NULL AND row_number() OVER (
               PARTITION BY run_id ORDER BY score DESC NULLS LAST, round DESC) = 1 AS is_best
    FROM scored
)
SELECT k.*,
       k.score < k.best_before - TRY_CAST(
           json_extract_string(r.config_json, '$.eval.regression_margin') AS DOUBLE) AS regressed
FROM ranked AS k LEFT JOIN runs AS r ON r.run_id = k.run_id
"""
SCORES_VIEW_SQL = """
CREATE OR REPLACE VIEW scores AS
SELECT * FROM read_parquet(['.npd/empty/scores.parquet', 'runs/*/round=*/score/scores*.parquet'],
                           hive_partitioning = false, allow_empty = true, union_by_name = true)
"""
# Samples written before schema 6 have no source: they are the student's.
SAMPLES_VIEW_SQL = """
CREATE OR REPLACE VIEW samples AS
SELECT g.* REPLACE (coalesce(g.source, 'student') AS source),
       s.teacher_logprob_sum, s.student_logprob_sum,
       s.teacher_resp_logprob_sum, s.student_resp_logprob_sum,
       s.ifd_teacher, s.ifd_student, s.delta_ifd, s.student_forward_kl_sum,
       f.kept, f.filter_reason, f.rule AS filter_rule, f.rule_params AS filter_rule_params
FROM read_parquet(['.npd/empty/samples.parquet', 'runs/*/round=*/generate/samples*.parquet'],
                  hive_partitioning = false, allow_empty = true, union_by_name = true) AS g
LEFT JOIN scores AS s
       ON s.run_id = g.run_id AND s.round = g.round
      AND s.prompt_id = g.prompt_id AND s.sample_idx = g.sample_idx
LEFT JOIN read_parquet(['.npd/empty/filter.parquet', 'runs/*/round=*/filter/filter.parquet'],
                       hive_partitioning = false, allow_empty = true, union_by_name = true) AS f
       ON f.run_id = g.run_id AND f.round = g.round
      AND f.prompt_id = g.prompt_id AND f.sample_idx = g.sample_idx
"""
FILTERED_VIEW_SQL = """
CREATE OR REPLACE VIEW filtered AS SELECT * FROM samples WHERE kept
"""
STEP_WEIGHTS_VIEW_SQL = """
CREATE OR REPLACE VIEW step_weights AS
SELECT * FROM read_parquet(['.npd/empty/step_weights.parquet',
                            'runs/*/round=*/train/step_weights.parquet'],
                           hive_partitioning = false, allow_empty = true, union_by_name = true)
"""
# In dependency order: scores before samples before filtered.
VIEW_SQL = (
    STORE_META_VIEW_SQL,
    RUNS_VIEW_SQL,
    PROMPTS_VIEW_SQL,
    ROUNDS_VIEW_SQL,
    EVALS_VIEW_SQL,
    CHECKPOINTS_VIEW_SQL,
    SCORES_VIEW_SQL,
    SAMPLES_VIEW_SQL,
    FILTERED_VIEW_SQL,
    STEP_WEIGHTS_VIEW_SQL,
)
VIEWS = (
    "store_meta",
    "runs",
    "prompts",
    "rounds",
    "evals",
    "checkpoints",
    "scores",
    "samples",
    "filtered",
    "step_weights",
)  # the names VIEW_SQL creates, in the same order


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def _schema(name: str) -> pa.Schema:
    try:
        return SCHEMAS[name]
    except KeyError:
        known = ", ".join(SCHEMAS)
        raise StoreError(f"unknown table {name!r}; known tables: {known}") from None


def empty_table(name: str) -> pa.Table:
    """A zero-row table with the schema of ``name``: what a view shows before any run."""
    return _schema(name).empty_table()


def table_from_rows(name: str, rows: list[dict]) -> pa.Table:
    """Build table ``name`` from dict rows, so callers never spell Arrow types.

    Missing keys of nullable columns become null; unknown keys and missing required
    values raise StoreError naming the column.
    """
    schema = _schema(name)
    unknown = sorted({key for row in rows for key in row} - set(schema.names))
    if unknown:
        raise StoreError(
            f"table {name!r}: unknown column(s) {', '.join(unknown)}; "
            f"its columns are {', '.join(schema.names)}"
        )
    arrays = []
    for field in schema:
        values = [row.get(field.name) for row in rows]
        try:
            arrays.append(pa.array(values, type=field.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError) as exc:
            raise StoreError(
                f"table {name!r} column {field.name!r}: values do not fit {field.type} "
                f"({first_line(exc)}); fix the values"
            ) from None
    return conform(name, pa.Table.from_arrays(arrays, names=schema.names))


def conform(name: str, table: pa.Table) -> pa.Table:
    """Cast ``table`` to the schema of ``name`` (columns reordered), so every file of a view agrees.

    Raises StoreError naming the column for missing/unknown columns, failed casts and nulls
    in required columns.
    """
    schema = _schema(name)
    missing = [n for n in schema.names if n not in table.column_names]
    extra = [n for n in table.column_names if n not in schema.names]
    if missing or extra:
        raise StoreError(
            f"table {name!r}: missing column(s) [{', '.join(missing)}], "
            f"unknown column(s) [{', '.join(extra)}]; match npd_core.store.SCHEMAS[{name!r}]"
        )
    columns = []
    for field in schema:
        column = table.column(field.name)
        try:
            column = column.cast(field.type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
            raise StoreError(
                f"table {name!r} column {field.name!r}: cannot cast {column.type} to {field.type} "
                f"({first_line(exc)}); fix the values or their type"
            ) from None
        if not field.nullable and column.null_count:
            raise StoreError(
                f"table {name!r} column {field.name!r}: {column.null_count} null value(s) in a "
                "required column; fill it in"
            )
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=schema)

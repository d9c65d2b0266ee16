"""The toy task's tokenizer survives AutoTokenizer (which imposes Qwen2's pre-tokenizer on every
Qwen2 checkpoint) and makes one token per word; the checker sorts."""

from transformers import AutoTokenizer, Qwen2Config

from npd_core.toy import task as toy_task


def test_autotokenizer_tokenizes_like_ours(tmp_path):
    ours = toy_task.build_tokenizer()
    ours.save_pretrained(tmp_path)
    Qwen2Config(vocab_size=len(ours)).save_pretrained(tmp_path)
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    for ex in toy_task.make_examples(50, seed=3):
        text = ex["prompt"] + toy_task.response_text(ex["answer"])
        assert theirs(text)["input_ids"] == ours(text)["input_ids"]
    resp = ours(toy_task.response_text("ab ab dc ej"))["input_ids"]
    assert len(resp) == 4  # one token per word
    assert theirs.decode(resp).strip() == "ab ab dc ej"
    assert len(ours) == 318


def test_solve_and_examples():
    assert toy_task.solve("sort dc ab ej ab =") == "ab ab dc ej"
    exs = toy_task.make_examples(200, seed=1)
    assert len({e["prompt"] for e in exs}) == 200
    assert all(5 <= len(e["answer"].split()) <= 8 for e in exs)

"""vLLM backend of the generate and score stages (``generate.backend: vllm | auto``).

Each model role, ``student`` (the generator) and ``teacher``, gets one vLLM engine in a child
process of its own, started on first use and kept until the npd process exits:

- vLLM wants a spawned interpreter, its own threads and a single caller, while a Prefect stage
  runs in a worker thread of the npd process. The engine process is spawned from whatever thread
  asks first; every call then goes through a pipe under the role's lock. Inside it vLLM runs its
  engine core in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): one process per engine.
- Sparse updates: a new student snapshot of the same architecture is loaded in place
  (``collective_rpc("reload_weights")``, then the prefix cache is dropped), instead of starting a
  new engine; a checkpoint of another architecture, or other engine options, start a new one.
  ``start_s`` and ``refresh_s`` of each call say which happened and how long it took.

Rows match the HF backend's (:mod:`npd_core.method.generate`, :mod:`npd_core.method.score`):
response token ids with EOS when seen, the log-prob of each sampled token under the model at
temperature 1 (vLLM's default ``raw_logprobs``), the teacher's top-k log-probs and its log-prob
of the response token per response position, and the conditional and response-only
log-likelihoods, all from ``prompt_logprobs``. Each sample draws from its own seed, derived
from (stage seed, prompt index, sample index), so a sample does not depend on how vLLM batches
it.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import multiprocessing as mp
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from npd_core.errors import BackendError, ConfigError
from npd_core.method.generate import Generation
from npd_core.method.score import Scores
from npd_core.models import use_bf16

if TYPE_CHECKING:
    from npd_core.config import NPDConfig

INSTALL = "make vllm (scripts/install-vllm.sh)"
Role = Literal["student", "teacher"]
# Defaults for the engine process; the user's environment wins. KV cache space is in GiB (CPU).
ENGINE_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_LOGGING_LEVEL": "ERROR",
}
# Two engines (student, teacher) and the learner share one GPU.
GPU_MEMORY_UTILIZATION = 0.3
# config.json keys that change between snapshots of one architecture
_VOLATILE = {"transformers_version", "_name_or_path", "dtype", "torch_dtype"}


def available() -> bool:
    """Whether vLLM is importable here (without importing it: that takes ~20 s)."""
    return importlib.util.find_spec("vllm") is not None


def resolve(backend: str, field: str) -> str:
    """``hf`` or ``vllm`` for a configured backend; an explicit ``vllm`` without the extra is a
    one-line error naming the install command."""
    if backend == "hf" or (backend == "auto" and not available()):
        return "hf"
    if not available():
        raise ConfigError(
            f"{field}: 'vllm' needs the vllm extra, which is not installed; "
            f"install it with `{INSTALL}` or set {field}: auto"
        )
    return "vllm"


@dataclass(frozen=True)
class EngineOptions:
    """What an engine is started with; other options start another engine."""

    dtype: str  # "float32" | "bfloat16"
    max_num_seqs: int  # sequences decoded together
    max_logprobs: int  # largest top-k asked for
    threads: int  # OMP threads of the engine (CPU)
    tensor_parallel_size: int = 1  # GPUs a layer is split over (GPU only)
    data_parallel_size: int = 1  # model replicas in the engine (GPU only)

    @classmethod
    def of(cls, cfg: NPDConfig) -> EngineOptions:
        """The options a run's config asks for (bf16 as the HF backend's autocast does)."""
        return cls(
            dtype="bfloat16" if use_bf16(cfg.models.bf16) else "float32",
            max_num_seqs=cfg.generate.batch_size,
            max_logprobs=max(20, cfg.score.top_k),
            threads=cfg.stage_threads(concurrent=cfg.staleness > 0),
            tensor_parallel_size=cfg.orchestration.tensor_parallel_size,
            data_parallel_size=cfg.orchestration.data_parallel_size,
        )

    @property
    def gpus(self) -> int:
        """GPUs one engine occupies (what a shard task asks its cluster for)."""
        return self.tensor_parallel_size * self.data_parallel_size


def engine_args(model_dir: str, options: EngineOptions) -> dict[str, Any]:
    """The keyword arguments of ``vllm.LLM`` for ``model_dir`` under ``options``."""
    return dict(
        model=model_dir,
        dtype=options.dtype,
        max_num_seqs=options.max_num_seqs,
        max_logprobs=options.max_logprobs,
        tensor_parallel_size=options.tensor_parallel_size,
        data_parallel_size=options.data_parallel_size,
        gpu_memory_utilization=GPU_MEMORY_UTILIZATION,
        enforce_eager=True,
        # vLLM 0.32 on CPU: a seeded request whose prompt is split across steps rewinds its
        # torch.Generator (set_offset), which CPU generators refuse ("CPU Generator does not
        # use offset"); whole prompts only.
        enable_chunked_prefill=False,
        use_tqdm_on_load=False,
        seed=0,
    )


@dataclass
class EngineTimes:
    """How the call found its engine: started now (``start_s``), refreshed to a new snapshot
    in place (``refresh_s``), or neither (both 0)."""

    start_s: float = 0.0
    refresh_s: float = 0.0


def generate(
    model_dir: str,
    prompts: list[list[int]],
    *,
    n_per_prompt: int,
    max_new_tokens: int,
    eos_ids: set[int],
    temperature: float,
    top_p: float,
    seeds: list[list[int]] | None,
    options: EngineOptions,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[list[Generation]], EngineTimes]:
    """``n_per_prompt`` samples per prompt from the student engine, loaded with ``model_dir``;
    sample k of prompt i is vLLM's request seeded with ``seeds[i][k]``, the seed the HF backend
    uses for the same sample (the two engines' random streams differ, the seed does not).

    Returns ``out[prompt_index][sample_idx]`` like :func:`npd_core.method.generate.generate`.
    """
    jobs = [(i, k) for i in range(len(prompts)) for k in range(n_per_prompt)]
    with _engine("student", model_dir, options) as (engine, times):
        res = engine.call(
            "generate",
            progress,
            prompts=[prompts[i] for i, _ in jobs],
            seeds=[seeds[i][k] for i, k in jobs] if seeds and temperature > 0 else None,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            stop_ids=sorted(eos_ids),
        )
    out: list[list[Generation]] = [[] for _ in prompts]
    for (i, _), (ids, lps, finished) in zip(jobs, res, strict=True):
        out[i].append(Generation(ids, lps, finished))
    return out, times


def score(
    model_dir: str,
    role: Role,
    prompts: list[list[int]],
    responses: list[list[int]],
    *,
    view: list[int] | None,
    top_k: int | None,
    options: EngineOptions,
    progress: Callable[[int], None] | None = None,
) -> tuple[Scores, EngineTimes]:
    """Score ``responses[i]`` after ``prompts[i]`` and, unless ``view`` is None, after ``view``,
    like :func:`npd_core.method.score.score` (no KL to targets: vLLM returns no log-probs at
    given ids), with the ``role``'s engine loaded with ``model_dir``."""
    vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
    k = min(top_k, vocab) if top_k else 0
    with _engine(role, model_dir, options) as (engine, times):
        cond, resp, tk_ids, tk_lps, tok_lps = engine.call(
            "score", progress, prompts=prompts, responses=responses, view=view, k=k
        )
    return Scores(cond, resp, tk_ids if k else None, tk_lps if k else None, None, tok_lps), times


def shutdown() -> None:
    """Stop every engine process (also done when the npd process exits)."""
    with _REGISTRY_LOCK:
        engines = list(_ENGINES.values())
        _ENGINES.clear()
    for e in engines:
        e.close()


# ------------------------------------------------------------------ parent side
class _Engine:
    """One engine process and the pipe to it; the caller holds the role's lock."""

    def __init__(self, model_dir: str, options: EngineOptions) -> None:
        t0 = time.perf_counter()
        ctx = mp.get_context("spawn")  # never fork a process that runs Prefect/torch threads
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_serve, args=(child, model_dir, asdict(options)), name="npd-vllm", daemon=True
        )
        self.proc.start()
        child.close()
        self.options = options
        self.loaded = _fingerprint(model_dir)
        self.arch = _architecture(model_dir)
        self._reply(None)
        self.start_s = time.perf_counter() - t0  # spawn, imports, model load, warm-up

    def call(self, op: str, progress: Callable[[int], None] | None, **kw: Any) -> Any:
        self.conn.send((op, kw))
        return self._reply(progress)

    def _reply(self, progress: Callable[[int], None] | None) -> Any:
        while True:
            try:
                kind, value = self.conn.recv()
            except (EOFError, OSError):
                self.proc.join(5)
                raise BackendError(
                    f"the vLLM engine process exited (code {self.proc.exitcode}); its log is "
                    "above (set VLLM_LOGGING_LEVEL=INFO for more)"
                ) from None
            if kind == "progress":
                if progress:
                    progress(value)
            elif kind == "error":
                raise BackendError(f"vLLM: {value}")
            else:
                return value

    def close(self) -> None:
        with suppress(OSError):  # already closed, or the process is gone
            self.conn.send(None)
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


_ENGINES: dict[str, _Engine] = {}
_REGISTRY_LOCK = threading.Lock()
_ROLE_LOCKS = {"student": threading.Lock(), "teacher": threading.Lock()}


def _fingerprint(model_dir: str) -> tuple[str, int, int]:
    """Path plus inode and mtime: a checkpoint rewritten in place (retried round) reloads."""
    st = os.stat(model_dir)
    return str(Path(model_dir).resolve()), st.st_ino, st.st_mtime_ns


def _architecture(model_dir: str) -> dict[str, Any]:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return {k: v for k, v in cfg.items() if k not in _VOLATILE}


@contextmanager
def _engine(
    role: Role, model_dir: str, options: EngineOptions
) -> Iterator[tuple[_Engine, EngineTimes]]:
    """The role's engine loaded with ``model_dir`` (started, refreshed in place, or as it
    was), held for the caller alone until the ``with`` block ends."""
    with _ROLE_LOCKS[role]:
        with _REGISTRY_LOCK:
            engine = _ENGINES.get(role)
        times = EngineTimes()
        if engine and (engine.options != options or engine.arch != _architecture(model_dir)):
            engine.close()
            engine = None
        if engine is None:
            engine = _Engine(model_dir, options)
            times.start_s = engine.start_s
            atexit.register(engine.close)
        elif engine.loaded != _fingerprint(model_dir):
            times.refresh_s = engine.call("reload", None, model_dir=model_dir)
            engine.loaded = _fingerprint(model_dir)
        with _REGISTRY_LOCK:
            _ENGINES[role] = engine
        yield engine, times


# ------------------------------------------------------------------ engine process
def _serve(conn: Any, model_dir: str, options: dict[str, Any]) -> None:
    """Engine process: start vLLM on ``model_dir``, then answer (op, kwargs) until told to stop
    or the parent goes away."""
    os.dup2(2, 1)  # vLLM logs to stdout; `npd … --json` keeps stdout for its one JSON object
    for k, v in ENGINE_ENV.items():
        os.environ.setdefault(k, v)
    os.environ["OMP_NUM_THREADS"] = str(options["threads"])
    try:
        from vllm import LLM

        llm = LLM(**engine_args(model_dir, EngineOptions(**options)))
        conn.send(("ok", None))
    except Exception as e:  # reported to the parent as one line, then this process ends
        conn.send(("error", f"cannot start on {model_dir}: {type(e).__name__}: {e}"))
        return
    ops = {"generate": _generate, "score": _score, "reload": _reload}
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        op, kw = msg
        try:
            conn.send(("ok", ops[op](llm, conn, **kw)))
        except Exception as e:
            conn.send(("error", f"{op}: {type(e).__name__}: {e}"))


def _progress_bar(conn: Any) -> Any:
    """A tqdm class for ``LLM.generate(use_tqdm=…)`` that reports finished requests to the
    parent instead of drawing a bar (the stage's own progress bar shows them). vLLM also uses
    it for "Rendering prompts" before running them; only "Processed prompts" counts."""
    from tqdm import tqdm

    class PipeBar(tqdm):
        def __init__(self, *a: Any, **kw: Any) -> None:
            self.counts = kw.get("desc") == "Processed prompts"
            kw["file"] = open(os.devnull, "w")  # noqa: SIM115 (closed with the bar)
            super().__init__(*a, **kw)

        def update(self, n: float | None = 1) -> bool | None:
            if self.counts:
                conn.send(("progress", int(n or 0)))
            return super().update(n)

        def close(self) -> None:
            super().close()
            self.fp.close()

    return PipeBar


def _reload(llm: Any, conn: Any, model_dir: str) -> float:
    """Load a new snapshot of the same architecture in place; returns the seconds it took."""
    t0 = time.perf_counter()
    llm.collective_rpc("reload_weights", kwargs={"weights_path": model_dir})
    llm.apply_model(_repack_lm_head)
    llm.reset_prefix_cache()  # cached KV of the old weights must not be reused
    return time.perf_counter() - t0


def _repack_lm_head(model: Any) -> None:
    """Redo the output layer's post-load processing after ``reload_weights``.

    vLLM on CPU packs every linear layer's weight for its GEMM kernels once loaded. A reload
    repacks the layers it loaded, but a tied ``lm_head`` is loaded through ``embed_tokens`` and
    kept its old pack: the new embeddings with the old output layer (measured: 84% of greedy
    answers still equal to HF's after a refresh, 100% with this). Elsewhere this is a no-op.
    """
    head = getattr(model, "lm_head", None)
    method = getattr(head, "quant_method", None)
    if method is not None:
        method.process_weights_after_loading(head)


def _generate(
    llm: Any,
    conn: Any,
    prompts: list[list[int]],
    seeds: list[int] | None,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    stop_ids: list[int],
) -> list[tuple[list[int], list[float], bool]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = [
        SamplingParams(
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_new_tokens,
            seed=seeds[i] if seeds else None,
            stop_token_ids=stop_ids,
            logprobs=0,  # the sampled token's own log-prob only
            flat_logprobs=True,
            detokenize=False,
        )
        for i in range(len(prompts))
    ]
    outs = llm.generate(
        [TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=_progress_bar(conn)
    )
    res = []
    for o in outs:
        c = o.outputs[0]
        ids, lps = list(c.token_ids), list(c.logprobs.logprobs)
        assert len(ids) == len(lps), (len(ids), len(lps))
        res.append((ids, lps, c.finish_reason == "stop"))
    return res


def _score(
    llm: Any,
    conn: Any,
    prompts: list[list[int]],
    responses: list[list[int]],
    view: list[int] | None,
    k: int,
) -> tuple[np.ndarray, np.ndarray | None, list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Each sample's views as prompt-only requests with ``prompt_logprobs``: per position vLLM
    returns the actual token's log-prob first, then the top ``k`` by rank (conditional view).
    Returns both views' sums, the top-k and the conditional view's per-token log-probs."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    n = len(prompts)

    def params(top: int) -> Any:
        return SamplingParams(
            max_tokens=1, prompt_logprobs=top, flat_logprobs=True, detokenize=False
        )

    seqs = [p + r for p, r in zip(prompts, responses, strict=True)]
    seqs += [view + r for r in responses] if view is not None else []
    outs = llm.generate(
        [TokensPrompt(prompt_token_ids=s) for s in seqs],
        [params(k)] * n + [params(0)] * (len(seqs) - n),
        use_tqdm=_progress_bar(conn),
    )
    sums = np.zeros(len(seqs))
    tk_ids: list[np.ndarray] = []
    tk_lps: list[np.ndarray] = []
    tok_lps: list[np.ndarray] = []  # (r,) per sample, conditional view
    for j, o in enumerate(outs):
        width = 1 + (k if j < n else 0)
        r = len(responses[j % n])
        pl = o.prompt_logprobs
        assert len(pl.logprobs) == (len(seqs[j]) - 1) * width, (j, len(pl.logprobs), width)
        lp = np.asarray(pl.logprobs[len(pl.logprobs) - r * width :], np.float32).reshape(r, width)
        sums[j] = lp[:, 0].astype(np.float64).sum()
        if j < n:
            tok_lps.append(lp[:, 0].copy())
        if j < n and k:
            ids = pl.token_ids[len(pl.token_ids) - r * width :]
            tk_ids.append(np.asarray(ids, np.int32).reshape(r, width)[:, 1:])
            tk_lps.append(lp[:, 1:].copy())
    return sums[:n], sums[n:] if view is not None else None, tk_ids, tk_lps, tok_lps

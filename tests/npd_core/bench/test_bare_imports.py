"""The packing bench runs on a bare GPU box (torch and transformers, no pydantic, pyarrow,
DuckDB, Prefect or MLflow), and what it times is the learner's own step with the default
config's settings."""

from __future__ import annotations

import json
import subprocess
import sys

from npd_core.config import TrainConfig
from npd_core.train_spec import StepSpec

BLOCKED = ("pydantic", "pyarrow", "duckdb", "prefect", "mlflow")

# A None entry in sys.modules makes `import x` (and `import x.y`) raise ImportError and
# importlib.util.find_spec("x") answer None, so optional-dependency checks see a bare box.
BARE_RUN = f"""
import json, sys
for name in {BLOCKED!r}:
    sys.modules[name] = None
try:
    import npd_core.config
except ImportError:
    pass
else:
    raise SystemExit("the block did not bite: npd_core.config imported without pydantic")

from npd_core.bench import packing

res = packing.run_bench(
    n_samples=8, median_len=6, p99_len=20, rows_per_step=2, calib_steps=2, device="cpu", seed=0
)
print(json.dumps({{
    "res": res,
    "modules": sorted(m for m in sys.modules if m.startswith("npd_core") and sys.modules[m]),
}}))
"""


def test_packing_bench_runs_without_pydantic_pyarrow_duckdb_prefect_mlflow():
    r = subprocess.run(
        [sys.executable, "-c", BARE_RUN], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    res, modules = out["res"], out["modules"]
    assert "npd_core.method.train" in modules and "npd_core.config" not in modules
    assert res["n_kept"] == 8 and res["steps_packed"] >= 1 and res["steps_padded"] >= 1
    assert res["packed_mean_loss"] > 0 and res["padded_mean_loss"] > 0


def test_the_bench_step_is_the_default_configs():
    """StepSpec() (what the bench trains with) is what the default config produces."""
    assert TrainConfig().step_spec() == StepSpec()


def test_generation_bench_imports_without_pydantic_pyarrow_duckdb_prefect_mlflow():
    code = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in BLOCKED)
    code += "import npd_core.bench.generate\nprint('npd_core.config' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "False"

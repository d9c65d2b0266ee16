"""The docs say what the code and the stored results say: the config reference is the generated
one, the figures the results pages and the README quote are those of docs/*.json, every
relative link resolves, and the README stays short."""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from npd_core.config import build_config

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
PAGES = [README, *sorted(DOCS.rglob("*.md"))]
RESULTS = DOCS / "results"
BENCH_PAGES = {
    "toy": "2026-12-07-bench-toy.md",
    "long": "2026-11-27-bench-long.md",
    "views": "2026-12-07-bench-views.md",
}


def _text(path: Path) -> str:
    """A page with its whitespace collapsed, so a figure may wrap across lines."""
    return " ".join(path.read_text(encoding="utf-8").split())


def _json(name: str) -> dict:
    return json.loads((DOCS / name).read_text())


def _assert_quoted(page: Path, *expected: str) -> None:
    """Each figure appears in the page, a minus sign written as − or -."""
    text = _text(page)
    for want in expected:
        assert want in text or want.replace("-", "−") in text, f"{page.name} lacks {want!r}"


def _ci(mean: float, ci: list[float]) -> str:
    return f"{mean:.1f} ({ci[0]:.1f}–{ci[1]:.1f})"


def _rule_cells(a: dict) -> str:
    """An ablation's cells by the lever rule (``ablations_vs_npd``): score, margin over npd's
    seed mean, 2 SE and the call; the margin's minus sign written − (the name keeps its hyphen)."""
    margin = f"{a['margin']:+.1f}".replace("-", "−")
    return (
        f"{a['score']:.1f} | {margin} | {2 * a['se']:.1f} | {'yes' if a['qualifies'] else 'no'} |"
    )


def test_config_md_is_generated_from_the_config_fields():
    """docs/config.md is what scripts/config_md.py writes (regenerate it after changing a field)."""
    spec = importlib.util.spec_from_file_location("config_md", ROOT / "scripts" / "config_md.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (DOCS / "config.md").read_text(encoding="utf-8") == module.render(), (
        f"docs/config.md is stale; run {module.COMMAND}"
    )


def test_readme_is_short_and_its_minimal_config_is_valid():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    block = re.search(r"```yaml\n(.*?)```", text, re.S).group(1)
    cfg = build_config(yaml.safe_load(block))
    assert cfg.models.teacher == "teacher" and cfg.data.eval_prompts == "eval.jsonl"


def test_readme_quick_start_is_the_two_make_targets():
    """.ci/run runs `make test`, the README's test command."""
    blocks = re.findall(
        r"## Quick start\n.*?```bash\n(.*?)```.*?```bash\n(.*?)```", README.read_text(), re.S
    )
    assert blocks == [("make demo\n", "make test\n")]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def _links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\]\(([^)\s]+)\)", text)


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    heads = re.findall(r"^#+ (.+)$", path.read_text(encoding="utf-8"), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    for link in _links(page):
        if re.match(r"[a-z]+:", link):
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        assert path.exists(), f"{page.name}: broken link {link}"
        if anchor:
            assert anchor in _anchors(path), f"{page.name}: no heading for {link}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_speak_of_the_software_and_its_users(page):
    words = re.findall(r"\b(sessions?|helpers?|issues?|sittings?)\b", page.read_text(), re.I)
    assert not words, f"{page.name}: {words}"


def test_every_results_page_is_dated_and_indexed():
    index = (RESULTS / "index.md").read_text(encoding="utf-8")
    for page in RESULTS.glob("*.md"):
        if page.name == "index.md":
            continue
        date = re.match(r"\d{4}-\d{2}-\d{2}", page.name)
        assert date and date.group() in page.read_text().splitlines()[0], page.name
        assert f"({page.name})" in index, f"{page.name} is not linked from results/index.md"


@pytest.mark.parametrize("world", list(BENCH_PAGES))
def test_bench_figures_match_their_json(world):
    bench = _json(f"bench-{world}.json")
    page = RESULTS / BENCH_PAGES[world]
    v = bench["variants"]
    main = ["npd", "sft", "onpolicy", "trl"]
    _assert_main_rows(page, v, main)
    for name in set(v) - set(main):
        _assert_quoted(
            page,
            f"{name}` {v[name]['final_score']:.1f}"
            if world == "long"
            else f"| {name} | 1 | {v[name]['final_score']:.1f} |",
        )
    _assert_rule_rows(page, bench.get("ablations_vs_npd", {}))
    sft, on = (bench[f"npd_minus_{b}_points_ci95"] for b in ("sft", "onpolicy"))
    if world in ("toy", "views"):
        for b, ci in (("sft", sft), ("onpolicy", on)):
            d = bench[f"npd_minus_{b}_points"]
            _assert_quoted(page, f"`npd_minus_{b}_points` {d:+.1f} ({ci[0]:+.1f} to {ci[1]:+.1f})")
        d = bench["npd_minus_sft_points"]
        _assert_quoted(README, f"{d:+.1f} points ({sft[0]:+.1f} to {sft[1]:+.1f})")
        reached = [
            (s, t)
            for s, t in zip(bench["speedups"], bench["teacher_token_ratios"], strict=True)
            if s["ratio"] is not None
        ]
        for s, t in reached:
            _assert_quoted(
                page,
                f"| {s['fraction']:.0%} | {s['target_score']:.1f} | {s['ratio']:.2f}× "
                f"({s['ci95'][0]:.2f}–{s['ci95'][1]:.2f}) | {t['ratio']:.2f}× "
                f"({t['ci95'][0]:.2f}–{t['ci95'][1]:.2f}) |",
            )
        s = bench["speedups"][-1]
        if s["ratio"] is None:  # npd never reached onpolicy's final score: the page says why
            _assert_quoted(page, f"none: {s['reason']}")
        else:
            _assert_quoted(README, f"{s['ratio']:.2f}× ({s['ci95'][0]:.2f}–{s['ci95'][1]:.2f})")
        p = bench["predicted_vs_measured_75"]
        _assert_quoted(
            page,
            f"{p['predicted']:.2f}× predicted, {p['measured_seeds_1_2']:.2f}× measured "
            f"({p['relative_error']:+.0%})",
        )
    else:
        assert bench["speedup_vs_onpolicy"] is None
        d_sft, d_on = bench["npd_minus_sft_points"], bench["npd_minus_onpolicy_points"]
        _assert_quoted(
            page,
            f"npd - sft = {d_sft:.1f} ({sft[0]:.1f} to {sft[1]:.1f})",
            f"npd - onpolicy = {d_on:.1f} ({on[0]:.1f} to {on[1]:.1f})",
        )


def _assert_main_rows(page: Path, variants: dict, names: list[str]) -> None:
    """Each main variant's final score with its 95% CI and per-seed scores on the page, and the
    same CI in the README's results table."""
    for name in names:
        seeds = ", ".join(f"{s:.1f}" for s in variants[name]["final_scores"])
        ci = _ci(variants[name]["final_score"], variants[name]["final_score_ci95"])
        _assert_quoted(page, ci, seeds)
        _assert_quoted(README, f"| {ci} ")


def _assert_rule_rows(page: Path, ablations: dict) -> None:
    """Each one-seed ablation's row with the lever rule's call on it (``ablations_vs_npd``)."""
    for name, a in ablations.items():
        row = f"| {name} | 1 | {_rule_cells(a)}"
        assert row in _text(page), f"{page.name} lacks {row!r}"


def test_smol_bench_figures_match_their_json():
    """The real-model comparison (npd and sft at 2 seeds, mix-teacher by the lever rule)."""
    bench = _json("bench-smol.json")
    page = RESULTS / "2026-12-07-bench-smol.md"
    v = bench["variants"]
    assert set(v) == {"npd", "sft", "mix-teacher"} and bench["budget_s"] == 480
    _assert_main_rows(page, v, ["npd", "sft"])
    _assert_rule_rows(page, bench["ablations_vs_npd"])
    d, ci = bench["npd_minus_sft_points"], bench["npd_minus_sft_points_ci95"]
    for where in (page, README):
        _assert_quoted(where, f"{d:+.1f} points ({ci[0]:+.1f} to {ci[1]:+.1f})")


def test_views_ablation_figures_match_their_json():
    """Each ablation's row: its score, its margin over npd's seed mean, 2 SE and the rule's call."""
    bench = _json("bench-views-ablations.json")
    page = RESULTS / "2026-12-07-bench-views-ablations.md"
    npd = bench["variants"]["npd"]
    seeds = ", ".join(f"{s:.1f}" for s in npd["final_scores"])
    _assert_quoted(page, f"{_ci(npd['final_score'], npd['final_score_ci95'])}, per seed {seeds}")
    assert bench["ablations_vs_npd"], "the bench JSON lacks the lever rule"
    for name, a in bench["ablations_vs_npd"].items():
        rounds = bench["variants"][name]["settings"][0]["rounds"]
        row = f"| {name} | {_rule_cells(a)} {rounds} |"
        assert row in _text(page), f"{page.name} lacks {row!r}"
    if not any(a["qualifies"] for a in bench["ablations_vs_npd"].values()):
        _assert_quoted(page, "No ablation qualifies")


def test_cost_model_figures_match_their_json():
    page = RESULTS / "2026-11-27-cost-model.md"
    for name, label in (
        ("cost-toy", "toy"),
        ("cost-long-run1", "long, run 1"),
        ("cost-long", "long, run 2"),
    ):
        cost = _json(f"{name}.json")
        for variant in ("npd", "sft", "onpolicy"):
            runs = cost[variant]["runs"]
            pred = ", ".join(f"{r['predicted']['clock_s']:.0f}" for r in runs)
            meas = ", ".join(f"{r['measured']['clock_s']:.0f}" for r in runs)
            _assert_quoted(page, f"| {label} | {variant} | {pred} | {meas} |")
    sp = _json("cost-toy.json")["speedup"]
    quoted = f"{sp['predicted']:.2f}× against the {sp['measured_seeds_1_2']:.2f}×"
    _assert_quoted(page, quoted, f"{sp['relative_error']:+.0%}")
    _assert_quoted(
        README, f"{sp['predicted']:.2f}× against {sp['measured_seeds_1_2']:.2f}× measured"
    )


def test_filter_study_figures_match_their_json():
    page = RESULTS / "2026-11-26-filter-study.md"
    screen = {(c["rule"], c["staleness"]): c for c in _json("filter-screen.json")["summary"]}
    for rule in ("band", "fence", "upper", "lower", "none", "none-keep"):
        s1, s4 = screen[rule, 1], screen[rule, 4]
        _assert_quoted(
            page,
            f"| {rule} | {s1['final_score']:.1f} | {s4['final_score']:.1f} | "
            f"{s4['kept_fraction']:.2f} | {s4['dropped_kl_share']:.2f} | {s4['max_drop']:.1f} |",
        )
    confirm = _json("filter-confirm.json")
    for c in confirm["summary"]:
        ci = _ci(c["final_score"], c["final_score_ci95"])
        _assert_quoted(page, f"| {c['rule']} | {c['staleness']} | {ci} |")
    for comp in confirm["decision"]["comparisons"].values():
        for d in comp["by_staleness"].values():
            lo, hi = d["ci95"]
            _assert_quoted(page, f"{d['mean_diff']:+.1f} [{lo:+.1f}, {hi:+.1f}]")
    assert confirm["decision"]["default"] == "none-keep"


def test_ifd_view_figures_match_their_json():
    page = RESULTS / "2026-11-26-ifd-views.md"
    views = _json("ifd-views.json")
    for view, mean in views["mean_spearman"].items():
        rho = [views["checkpoints"][k][view]["spearman"] for k in ("3", "6")]
        _assert_quoted(page, f"{rho[0]:.3f} | {rho[1]:.3f} |", f"{mean:.3f}")
    assert views["best"] == "eos"


def test_gpu_bench_figures_match_their_json():
    page = RESULTS / "2026-11-26-gpu-bench-h100.md"
    gpu = _json("gpu-bench.json")
    for kernel in ("torch_varlen", "flex_document", "sdpa", "sdpa_varlen"):
        c = gpu["train"]["choices"][kernel]
        _assert_quoted(page, f"{c['tokens_per_s'] / 1000:.1f} k tokens/s, MFU {c['mfu']:.1%}")
    decode = " / ".join(f"{b['tokens_per_s']:,.0f}" for b in gpu["generate"]["batches"].values())
    step = gpu["onpolicy_step"]
    f = step["fractions"]
    _assert_quoted(
        page,
        f"{decode} tokens/s",
        f"{gpu['score']['tokens_per_s'] / 1000:.1f} k tokens/s",
        f"{step['total_s']:.1f} s: generate {f['generate']:.0%}, teacher {f['teacher_score']:.0%}, "
        f"update {f['student_update']:.0%}",
        f"student decoding {gpu['projection']['per_sample']['fractions']['student_decode']:.0%}",
    )


def test_scale_bench_figures_match_their_json():
    page = RESULTS / "2026-11-27-scale-bench.md"
    now, run1 = _json("scale-bench.json"), _json("scale-bench-run1.json")
    k1, k2 = (a["seconds"] for a in now["shards"]["arms"])
    r1, r2 = (a["seconds"] for a in run1["shards"]["arms"])
    n1, n2 = (a["seconds"] for a in now["train"]["arms"])
    _assert_quoted(
        page,
        f"| {k1:.1f} (run 1: {r1:.1f}) | {k2:.1f} ({r2:.1f}) | {now['shards']['speedup']:.2f}× "
        f"({run1['shards']['speedup']:.2f}×) |",
        f"Ray start {now['shards']['ray_start_s']:.1f} s",
        f"{n1:.1f} ({run1['train']['arms'][0]['seconds']:.1f}) | {n2:.1f}",
        f"{now['train']['speedup']:.2f}×",
        f"torchrun start {now['train']['torchrun_start_s']:.1f} s",
        f"{now['train']['weights_max_abs_diff']:.1e}".replace("e-05", "e-5"),
    )


def test_readme_command_table_names_every_command():
    """Each `npd` command and subcommand has its row (or its group's row) in the README's table."""
    from flows.cli import app

    text = README.read_text(encoding="utf-8")
    table = text[text.index("## Commands") :].split("\n## ")[0]
    rows = {line.split("`")[1].split()[1]: line for line in table.splitlines() if "| `npd " in line}
    for command in app.registered_commands:
        assert (command.name or command.callback.__name__) in rows
    for group in app.registered_groups:
        row = rows[group.name]
        for sub in group.typer_instance.registered_commands:
            assert (sub.name or sub.callback.__name__.replace("_", "-")) in row, (group.name, sub)
    assert set(rows) == {c.name or c.callback.__name__ for c in app.registered_commands} | {
        g.name for g in app.registered_groups
    }


def test_filter_junk_figures_match_their_json():
    page = RESULTS / "2026-12-06-filter-junk-views.md"
    junk = _json("filter-junk.json")
    for score, kinds in junk["summary"].items():
        cells = [
            f"{d['mean']:.3f} [{d['ci95'][0]:.3f}, {d['ci95'][1]:.3f}]" for d in kinds.values()
        ]
        _assert_quoted(page, f"| {score} | " + " | ".join(cells) + " |")
    assert (junk["n"], junk["junk_share"]) == (1024, 0.15)


def test_filter_trained_figures_match_their_json():
    """Every row of the page's tables, the decision, and the clock-free reading (mean score over
    rounds 8-10, which every cell reached) come from docs/filter-trained.json."""
    page = RESULTS / "2026-12-07-filter-trained.md"
    study = _json("filter-trained.json")
    for r in study["summary"]:
        lo, hi = r["final_score_ci95"]
        junk_kept = "—" if r["junk_kept_share"] is None else f"{r['junk_kept_share']:.2f}"
        _assert_quoted(
            page,
            f"| {r['rule']} | {r['score'] or '—'} | {r['final_score']:.1f} [{lo:.1f}, {hi:.1f}] "
            f"| {r['kept_share']:.2f} | {junk_kept} | {r['rounds']:.1f} |",
        )
    interval = lambda c: "—" if c is None else f"[{c[0]:+.1f}, {c[1]:+.1f}]"  # noqa: E731
    for name, c in study["decision"]["comparisons"].items():
        rule, score = name.split("-", 1)
        _assert_quoted(
            page,
            f"| {rule} | {score} | {interval(c['vs_random_ci95'])} | "
            f"{interval(c['vs_conditional_ci95'])} | {c['clean_vs_reference']:+.1f} | "
            f"{'yes' if c['recommended'] else 'no'} |",
        )
    assert study["decision"]["recommended"] == []
    late: dict[tuple, list[float]] = {}
    for cell in study["cells"]:
        by_round = {r["round"]: r["score"] for r in cell["rounds"]}
        late.setdefault((cell["junk"], cell["rule"], cell["score"]), []).append(
            sum(by_round[k] for k in (8, 9, 10)) / 3
        )
    mean = {k: sum(v) / len(v) for k, v in late.items()}
    others = [v for k, v in mean.items() if k[1] != "none-keep"]
    band = [v for k, v in mean.items() if k[1] == "band"]
    none_junk, none_clean = mean[("junk", "none-keep", None)], mean[("clean", "none-keep", None)]
    _assert_quoted(
        page,
        f"is {none_junk:.1f} for `none` with junk and {none_clean:.1f} without, and "
        f"{min(others):.1f}–{max(others):.1f}",
        f"({min(band):.1f}–{max(band):.1f} over rounds 8–10)",
    )


def test_the_views_gate_table_is_the_reports():
    """worlds.md's gate table for the views world's spec quotes docs/views-gates.json's report,
    and that report is of the spec the code builds."""
    from npd_core.toy.world import ViewsSpec

    g = _json("views-gates.json")
    assert g["digest"] == ViewsSpec().digest() and all(g["passed"].values()) and g["M5"]["pass"]
    m1 = " / ".join(f"{s['share']['generate']:.1%}" for s in g["M1"]["steps"])
    m2, m3, m4 = g["M2"], g["M3"], g["M4"]
    on = g["M5"]["variants"]["onpolicy"]
    _assert_quoted(
        DOCS / "worlds.md",
        f"digest `views-{g['digest']}`",
        f"batch {' / '.join(str(b) for b in g['M1']['batches'])} | {m1} |",
        f"| {m2['teacher_lines']:.1f} | ≥ 90 |",
        f"0.0 → {m2['student_curve_end']:.1f}, +{m2['student_gain_last_quarter']:.2f}",
        f"{m2['teacher_lines']:.2f} − {m2['student_lines']:.2f} = "
        f"{m2['teacher_lines'] - m2['student_lines']:.2f} points",
        f"{m3['teacher_from_prompt']:.1f} / {m3['teacher_off_path']:.1f} (drop {m3['drop']:.1f})",
        f"{m4['finished']:.1%}; {m4['mean_sample_tokens']:.1f} vs {m4['mean_true_tokens']:.1f}",
        f"{on['start']:.2f} → {on['best_after_start']:.2f} (best), {on['final_score']:.2f} final",
    )


def test_the_views_rebuild_figures_are_the_reports():
    """worlds.md and bench.md quote the gate checks run again on the rebuild the bench used."""
    r = _json("views-gates.json")["rebuild"]
    m1 = [run["decode_share"]["60"] for run in r["M1_runs"]]
    b = r["build"]
    for page in ("worlds.md", "bench.md"):
        _assert_quoted(
            DOCS / page,
            f"{m1[0]:.1%}, {m1[1]:.1%}",
            f"{m1[2]:.1%}",
            f"+{r['M2']['student_gain_last_quarter']:.2f}",
            f"drop {r['M3']['drop']:.2f}",
            f"{r['M4']['finished']:.1%} finished",
            f"{b['build_s'] / 60:.1f} min",
        )
    _assert_quoted(
        DOCS / "worlds.md",
        f"({b['teacher']['train_s']:.0f} and {b['student']['train_s']:.0f} s)",
        f"teacher {r['M2']['teacher_lines']:.2f}, student {r['M2']['student_lines']:.2f} per",
    )


def test_smol_temperature_figures_match_their_json():
    """Each row of the smol world's temperature probe: its M3 drop, the first-letter scores
    and M4, as docs/smol-temperature.json has them."""
    for run in _json("smol-temperature.json")["runs"]:
        _assert_temperature_row(run)
        assert not run["passed"]["M3"]


def test_smol_deeper_student_figures_match_their_json_and_the_spec():
    """The 10-layer probe's rows, the rule's choice (the largest temperature whose gates all
    pass) as ``SmolSpec`` has it, and the first gated spec's gate table
    (docs/smol-gates-10-layers.json)."""
    from npd_core.toy.smol import SmolSpec

    probe = _json("smol-deeper.json")
    for run in probe["runs"]:
        _assert_temperature_row(run)
    passing = [r["temperature"] for r in probe["runs"] if all(r["passed"].values())]
    assert probe["chosen"] == {"layers": 10, "temperature": max(passing)}
    assert (SmolSpec.layers, SmolSpec.temperature) == (10, max(passing))
    gates = _json("smol-gates-10-layers.json")
    assert (gates["spec"]["layers"], gates["temperature"]) == (10, max(passing))
    m2, m3, m4 = gates["M2"], gates["M3"], gates["M4"]
    assert all(gates["passed"].values())
    _assert_quoted(
        DOCS / "worlds.md",
        f"| {m2['student_curve_start']:.1f} → {m2['student_curve_end']:.1f} |",
        f"{m2['teacher']:.1f} − {m2['student']:.1f} = {m2['teacher'] - m2['student']:.1f}",
        f"{m3['teacher_from_prompt']:.1f} / {m3['teacher_off_path']:.1f} (drop {m3['drop']:.1f})",
        f"{m4['finished']:.1%}; {m4['mean_sample_tokens']:.2f} vs {m4['mean_true_tokens']:.2f}",
        f"{probe['build']['build_s'] / 60:.1f} min on an otherwise idle machine",
    )


def test_smol_10_layer_demo_figures_match_their_json():
    """Both six-round demos on the current smol spec (the defaults, then ce by its rule), and
    the share of their training samples right by task."""
    demos = _json("smol-demo-10-layers.json")
    default, ce = demos["default"], demos["ce"]
    assert ce["rule_met"] == (ce["mean_last_three"] >= ce["start_score"]) and not ce["rule_met"]
    right = lambda d, t: d["samples_right_by_task_and_round"][t]  # noqa: E731
    _assert_quoted(
        DOCS / "worlds.md",
        f"{_arrow(default['scores_by_round'])}.",
        f"{default['wall_s'] / 60:.1f} min, peak RSS {default['peak_rss_mib'] / 1024:.1f} GB",
        f"`train.loss=ce` went {_arrow(ce['scores_by_round'])} (mean of the last three "
        f"{ce['mean_last_three']:.1f}; {ce['wall_s'] / 60:.1f} min)",
        *(
            f"| {right(default, t)[0]}% | {right(default, t)[-1]}% | {right(ce, t)[-1]}% |"
            for t in ("first_letter", "successor")
        ),
    )


def test_smol_probed_specs_and_probe_figures_match_their_json():
    """The disjoint and rephrased specs' gates (M3 fails, so neither is adopted), the mixed
    spec's (all pass: ``SmolSpec`` is it), the phrasings chosen, the diagnostic ce demo on the
    disjoint build, and the passes and number-task probes' rows."""
    from npd_core.toy.smol import SmolSpec

    for name in ("smol-disjoint.json", "smol-rephrase.json"):
        spec = _json(name)
        for run in spec["runs"]:
            _assert_temperature_row(run)
        assert not any(r["passed"]["M3"] for r in spec["runs"]) and not spec["adopted"]
        assert spec["spec"]["warm_disjoint"] and all(r["passed"]["M2"] for r in spec["runs"])
        _assert_quoted(
            DOCS / "worlds.md",
            f"{spec['build']['build_s'] / 60:.1f} min on an otherwise idle machine",
        )
    mixed = _json("smol-mixed.json")
    (run,) = mixed["runs"]
    _assert_temperature_row(run)
    assert all(run["passed"].values()) and mixed["passing_temperature"] == run["temperature"]
    assert mixed["spec"]["mix"] == [["first_letter", 0.6], ["successor", 0.4]]
    current = json.loads(json.dumps(asdict(SmolSpec())))  # tuples read back as JSON's lists
    assert {k: current[k] for k in mixed["spec"]} == mixed["spec"]
    assert SmolSpec.temperature == run["temperature"]
    _assert_quoted(
        DOCS / "worlds.md", f"{mixed['build']['build_s'] / 60:.1f} min on an otherwise idle"
    )
    phrasings = _json("smol-phrasings.json")["tasks"]
    chosen = ("first_letter_tell", "addition_plus")
    assert all(phrasings[k]["teacher"] >= 50 for k in chosen)
    assert max(v["teacher"] for k, v in phrasings.items() if k.startswith("successor")) < 50
    probe = _json("smol-disjoint.json")
    demo = probe["diagnostic_demo"]
    trained = demo["train_prompts_greedy"]
    start, check = trained["warm_start"], trained["checkpoint"]
    tasks = _json("smol-tasks.json")["tasks"]
    _assert_quoted(
        DOCS / "worlds.md",
        *(f"{phrasings[k]['teacher']:.1f}" for k in chosen),
        _arrow(demo["scores_by_round"]),
        f"from {start['score']:.1f} at the warm start to {check['score']:.1f} at round 6",
        *(
            f"{t} {start['per_task'][k]:.1f} → {check['per_task'][k]:.1f}"
            for t, k in (("first letter", "first_letter"), ("successor", "successor"))
        ),
        *(
            f"| {r['passes']} | {r['taught']:.1f} | {r['taught_other_words']:.1f} | "
            f"{r['not_taught']:.1f} |"
            for r in _json("smol-passes.json")["runs"]
        ),
        *(
            f"N {op} {tasks[k]['teacher']:.1f} ({tasks[k]['student']:.1f})"
            for op, k in (("+ 2", "plus_two"), ("+ 0", "plus_zero"))
        ),
    )
    assert demo["mean_last_three"] < demo["start_score"]
    rephrased = _json("smol-rephrase.json")["diagnostic_demos"]
    ce, fkl = rephrased["runs"]
    assert (
        ce["final_minus_start"]
        > rephrased["half_width_95"]
        > ce["mean_last_three"] - ce["start_score"]
    )
    _assert_quoted(
        DOCS / "worlds.md",
        *(
            f"| {name} | {_demo_cells(r)}"
            for name, r in (("ce", ce), ("forward KL (the default)", fkl))
        ),
    )


def test_smol_current_spec_demos_match_their_json_and_the_rules():
    """The mixed spec's demos: ce is the better loss and SmolSpec's; the lr whose last three
    rounds average highest is the world's; `npd demo --world smol` is that demo, and whether it
    clears the half-width is as the JSON and the page say."""
    from npd_core.toy.smol import SmolSpec

    mixed = _json("smol-mixed.json")
    demos, demo = mixed["demos"], mixed["npd_demo"]
    ce = [r for r in demos["runs"] if r["loss"] == "ce"]
    (fkl,) = [r for r in demos["runs"] if r["loss"] == "forward_kl"]
    best = max((r for r in ce if r["wall_s"] <= 900), key=lambda r: r["mean_last_three"])
    assert best["mean_last_three"] > max(fkl["mean_last_three"], best["start_score"])
    assert demos["chosen"] == {"loss": SmolSpec.loss, "lr": best["lr"]}
    assert SmolSpec().config_defaults()["train"]["lr"] == pytest.approx(best["lr"])
    assert demo["scores_by_round"] == best["scores_by_round"]
    hw = demos["half_width_95"]
    assert demos["fit"] == (
        best["final_minus_start"] > hw and best["mean_last_three"] - best["start_score"] > hw
    )
    assert not demos["fit"] and demo["final_minus_start"] < hw  # as the page says: short of it
    name = {"ce": "ce", "forward_kl": "forward KL"}
    by_task = demos["held_out_by_task"]
    _assert_quoted(
        DOCS / "worlds.md",
        *(
            f"| {name[r['loss']]}, {r['lr']:.0e} | ".replace("e-0", "e-")
            + _rounds(r["scores_by_round"])
            for r in demos["runs"]
        ),
        *(_demo_cells(r) for r in demos["runs"]),
        _arrow(demo["scores_by_round"]),
        f"{demo['wall_s'] / 60:.1f} min, peak RSS "
        f"{max(demo['peak_rss_mib'].values()) / 1024:.1f} GB",
        f"It ends {demo['final_minus_start']:.1f} points above its warm",
        *(
            " → ".join(
                f"{by_task[k]['per_task'][t]:.1f}" for k in ("warm_start", "round=3", "round=6")
            )
            for t in ("first_letter", "successor")
        ),
    )


def _rounds(scores: list[float]) -> str:
    """A demo's held-out scores after its start, as the pages list them: '51.8, 51.2, …'."""
    return ", ".join(f"{x:.1f}" for x in scores[1:])


def _arrow(scores: list[float]) -> str:
    """The same with the start first: '49.7 → 51.8, 51.2, …'."""
    return f"{scores[0]:.1f} → {_rounds(scores)}"


def _demo_cells(r: dict) -> str:
    """A smol demo row's cells after its name: scores by round, final − start, mean of the
    last three, wall time and peak RSS."""
    return (
        f"{_rounds(r['scores_by_round'])} | {r['final_minus_start']:+.1f} | "
        f"{r['mean_last_three']:.1f} | {r['wall_s'] / 60:.1f} min, "
        f"{max(r['peak_rss_mib'].values()) / 1024:.1f} GB |"
    )


def _assert_temperature_row(run: dict) -> None:
    """A smol gates run's row: temperature, M3 drop, first-letter scores, M4."""
    m3, m4 = run["M3"], run["M4"]
    first = m3["by_task"]["first_letter"]
    length = f"{m4['length_error']:+.1%}".replace("-", "−")
    row = (
        f"| {run['temperature']} | {m3['drop']:.1f} | {first['teacher_from_prompt']:.1f} / "
        f"{first['teacher_off_path']:.1f} | {m4['finished']:.1%}; {length} |"
    )
    assert row in _text(DOCS / "worlds.md"), f"worlds.md lacks {row!r}"


def test_sampled_reverse_kl_demo_figures_match_their_json():
    page = RESULTS / "2026-12-07-bench-toy.md"
    lo, hi = sorted(_json("sampled-reverse-kl-demo.json")["runs"], key=lambda r: r["lr"])
    assert all(x["score"] == 0.0 for r in (lo, hi) for x in r["rounds"])
    lo_rounds, hi_rounds = ({x["round"]: x for x in r["samples_by_round"]} for r in (lo, hi))
    _assert_quoted(
        page,
        f"{hi_rounds[3]['finished']:.0%} of round 3's finished, "
        f"{hi_rounds[4]['finished']:.0%} of round 4's",
        f"shrank to {lo_rounds[5]['tokens']:.1f} tokens on average by round 5",
    )

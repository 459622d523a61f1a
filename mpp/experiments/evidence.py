"""The evidence in the docs, written from the committed results files, so it cannot drift from them.

    python -m mpp.experiments.evidence                                     # print the full section
    python -m mpp.experiments.evidence --write README.md docs/evidence.md  # replace each between its markers

Two sections: the full one (docs/evidence.md, between EVIDENCE_START and EVIDENCE_END) and the README's
headline (between HEADLINE_START and HEADLINE_END). Tests check that both equal what this module writes from
benchmarks/results/.
"""

import argparse
import json
from pathlib import Path

from mpp.experiments.harness import pm, table

EVIDENCE_START = "<!-- evidence: written by python -m mpp.experiments.evidence; edit the results, not this text -->"
EVIDENCE_END = "<!-- evidence: end -->"
HEADLINE_START = "<!-- headline: written by python -m mpp.experiments.evidence; edit the results, not this text -->"
HEADLINE_END = "<!-- headline: end -->"
RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
FILES = {"grey": "gap_grey.json", "colour": "gap_colour.json", "ablation": "ablation.json"}
ARMS = ("scratch", "mpp", "supervised")


def interval(d: dict) -> str:
    return "no interval (one seed)" if d["low"] is None else f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"


def rates(grid: list[float]) -> str:
    return "[" + ", ".join(f"{x:.3g}" for x in grid) + "]"


def commit_line(r: dict) -> str:
    git = r["git"]
    code = (
        "unknown code"
        if git["commit"] is None
        else f"code at {git['commit'][:7]}" + (" with uncommitted changes" if git["dirty"] else "")
    )
    started = r["date"][:16].replace("T", " ")
    # the reason for a protocol change is stated in the protocol history; the command names only the flag
    command = r["command"].split(" --protocol-note ")[0] + (
        " --protocol-note …" if "--protocol-note" in r["command"] else ""
    )
    return f"`{command}`, {code}, started {started} UTC, {r['wall_time_s'] / 60:.0f} min on {r['machine']}"


def protocol_history(plan: dict) -> list[str]:
    """A line on each change of protocol after the experiment started (the reasons recorded, oldest first) and on
    the relaunches after stops."""
    said = []
    earlier = plan.get("earlier_protocols") or []
    reasons = [old["protocol_note"] for old in earlier if old.get("protocol_note")] + [plan.get("protocol_note")]
    if earlier:
        started = earlier[0].get("date", "?")[:16].replace("T", " ")
        said.append(
            f"The protocol changed {len(earlier)} time(s) after the experiment started on {started} (every version "
            "kept in its protocol file): " + "; then: ".join(r or "(no reason recorded)" for r in reasons) + "."
        )
    if plan.get("relaunches"):
        said.append(
            f"Relaunched {len(plan['relaunches'])} time(s) after a stop, the plan unchanged, finished runs reused."
        )
    return [" ".join(said), ""] if said else []


def gap_section(r: dict, title: str) -> list[str]:
    cfg, s, floors, primary = r["config"], r["summary"], r["floors"], r["primary"]
    boot, t = primary.get("bootstrap"), primary["per_seed_t"]
    tuning = r["tuning"]
    probe = (
        "linear_10shot_mean"
        if "linear_10shot_mean" in s["mpp"]
        else next(m for m in s["mpp"] if m.startswith("linear_"))
    )
    pixel_probe = f"pixels_{'_'.join(probe.split('_')[:2])}"
    rows = [[arm, pm(s[arm]["test_top1"]), pm(s[arm]["knn20_mean"]), pm(s[arm][probe])] for arm in ARMS]
    rows += [
        ["majority class", pm(floors["majority"]), pm(floors["majority"]), pm(floors["majority"])],
        [
            "raw pixels (1-NN in the first column)",
            pm(floors["pixels_knn1"]),
            pm(floors["pixels_knn20"]),
            pm(floors[pixel_probe]),
        ],
    ]
    hygiene = [v["hygiene"] for v in r["per_seed"].values()]
    converged = tuning["convergence"][-1]
    power = r["protocol"]["power"]
    lines = [
        f"**{title}** — {commit_line(r)}. `{cfg['upstream']}` → `{cfg['downstream']}` "
        f"({'disjoint' if r['protocol']['label_spaces']['disjoint'] else 'SHARED'} label spaces), {cfg['model']} at "
        f"{cfg['img_size']} px / "
        f"patch {cfg['patch_size']}; pretraining {cfg['pretrain_steps']} steps of {cfg['pretrain_batch']} for MPP and "
        "supervised alike; "
        f"{cfg['train_per_class'] or 'all'} labelled images per class downstream; seeds {list(cfg['seeds'])}; "
        f"{hygiene[0]['test_images']} test images.",
        "",
        *protocol_history(r["protocol"]),
        *table(["init", "fine-tuned test top-1", "k-NN (k=20), mean readout", f"{probe.replace('_', ' ')}"], rows),
        "",
        f"Primary comparison, fixed before the run: **MPP − scratch, fine-tuned test top-1 {interval(t)}** (paired "
        "per-seed t-interval)"
        + (
            f"; two-level bootstrap over seeds and test images [{boot['low']:+.3f}, {boot['high']:+.3f}]."
            if boot
            else "."
        ),
        f"Power computed before the run: with {power['seeds']} seeds a true difference of "
        f"{power['detectable_by_spread']['0.01'] or float('nan'):.3f} is found 80% of the time when per-seed "
        "differences spread by "
        f"0.01 ({power['detectable_by_spread']['0.02'] or float('nan'):.3f} at 0.02); the spread observed was "
        f"{t['std'] if t['std'] is not None else float('nan'):.3f}.",
        "",
        "Exploratory (no correction for multiple comparisons): "
        + "; ".join(
            f"{name.split(' (')[0]} {interval(d['test_top1'])}"
            for name, d in r["differences"].items()
            if name != primary["comparison"]
        )
        + "; MPP's frozen encoder − the random-init encoder: "
        + ", ".join(
            f"{m} {interval(d)}" for m, d in r["probes_versus_random_init"]["mpp"].items() if m in ("knn20_mean", probe)
        )
        + ".",
        "",
        "Tuning on seed "
        + str(cfg["seeds"][0])
        + "'s validation split: "
        + "; ".join(f"{a} {c['preset']} lr {c['lr']:.3g}" for a, c in tuning["chosen"].items())
        + "; grids "
        + ", ".join(f"{p} {rates(g)}" for p, g in tuning["grids"].items())
        + "; budget "
        + " → ".join(f"{c['epochs']:g}" for c in tuning["convergence"])
        + " epochs; at the final budget "
        + ", ".join(f"{a} {'converged' if converged[a]['converged'] else 'NOT converged'}" for a in ARMS)
        + ". "
        + "Test images with a near-twin in the labelled training images: "
        f"{max(h['test_with_a_twin_in_train'] for h in hygiene)} "
        f"(most over seeds), in validation: {max(h['test_with_a_twin_in_validation'] for h in hygiene)}.",
        "",
    ]
    return lines


def ablation_section(r: dict) -> list[str]:
    cfg, s, floors, gate, metric = r["config"], r["summary"], r["floors"]["test"], r["gate"], r["config"]["metric"]
    pixel = "pixels_knn20" if metric.startswith("knn20") else f"pixels_{'_'.join(metric.split('_')[:2])}"
    trial = gate["trials"][-1]
    rows = [
        [name, pm(s[name]["test"][metric]), interval(r["versus_default"][name]) if name in r["versus_default"] else "—"]
        for name in s
    ]
    rows += [
        ["majority class", pm(floors["majority"]), "—"],
        ["raw pixels", pm(floors[pixel]), "—"],
        ["chance", f"{r['chance']:.3f}", "—"],
    ]
    lines = [
        f"**Appendix B.1.2 in miniature** — {commit_line(r)}. Pretrained on `{cfg['pretrain_dataset']}`, probed on "
        f"`{cfg['downstream']}` "
        f"({r['protocol']['power']['test_images']} test images); verdict metric `{metric}`; seeds "
        f"{list(cfg['seeds'])}.",
        "",
        *protocol_history(r["protocol"]),
        "Gate (the default must beat the random-init encoder on validation): "
        f"**{'passed' if gate['passed'] else 'NOT passed'}** at "
        f"{gate['steps']} steps, default − random {interval(trial['difference'])}"
        + "".join(f" (at {t['steps']} steps {interval(t['difference'])})" for t in gate["trials"][:-1])
        + f"; on test {interval(gate['on_test']['difference'])}."
        + (
            ""
            if gate["passed"]
            else " So no finding is judged: a metric that cannot show pretraining beating a random encoder "
            "cannot tell two pretrainings apart."
        ),
        "",
        *table(["setting", f"{metric} (test)", "− default, paired"], rows),
        "",
        *table(
            ["the paper's finding", "difference", "verdict"],
            [
                [f["claim"], interval(f["difference"]) if f["difference"] else "—", f["verdict"]]
                for f in r["findings"].values()
            ],
        ),
        "",
    ]
    lengths = {n: d for n, d in r["observations"].items() if n.startswith("length")}
    if lengths:
        lines += [
            "Each doubling of the pretraining length, with its sign: "
            + "; ".join(f"{n} {interval(d)}" for n, d in lengths.items())
            + ".",
            "",
        ]
    if "finetune" in r:
        ft = r["finetune"]
        lines += [
            "Fine-tuned test top-1: "
            + "; ".join(f"{a} {pm(ft['summary'][a]['test_top1'])}" for a in ft["arms"])
            + " — "
            + "; ".join(f"{n} {interval(d)}" for n, d in ft["differences"].items())
            + ".",
            "",
        ]
    return lines


def render(results: Path = RESULTS) -> str:
    """The evidence section (markdown) from the results files present in `results`."""
    found = {k: json.loads((results / f).read_text()) for k, f in FILES.items() if (results / f).is_file()}
    lines = [EVIDENCE_START, ""]
    if "grey" in found:
        lines += gap_section(found["grey"], "Headline: the gap on grey images")
    if "colour" in found:
        lines += gap_section(found["colour"], "Illustration: the gap on colour clip art")
    if "ablation" in found:
        lines += ablation_section(found["ablation"])
    return "\n".join(lines + [EVIDENCE_END])


def render_headline(results: Path = RESULTS) -> str:
    """The README's few lines: the primary comparison, its positive control, the metric shown able to fail, and
    the ablation's findings that were judged (markdown)."""
    lines = [HEADLINE_START, ""]
    rows = []
    grey_file, ablation_file = results / FILES["grey"], results / FILES["ablation"]
    if grey_file.is_file():
        r = json.loads(grey_file.read_text())
        cfg, primary = r["config"], r["primary"]
        control = next(d for name, d in r["differences"].items() if name.startswith("supervised − scratch"))
        probe = r["probes_versus_random_init"]["mpp"].get("linear_10shot_mean")
        where = f"{cfg['upstream']} → {cfg['downstream']}, {len(cfg['seeds'])} seeds"
        rows += [
            [f"MPP − scratch, fine-tuned top-1 (primary; {where})", interval(primary["per_seed_t"])],
            ["supervised − scratch, fine-tuned top-1 (positive control)", interval(control["test_top1"])],
        ]
        if probe:
            rows.append(["MPP encoder − random-init encoder, 10-shot linear probe", interval(probe)])
    if ablation_file.is_file():
        r = json.loads(ablation_file.read_text())
        rows += [
            [f"ablation: {f['claim']} ({r['config']['metric']})", f"{interval(f['difference'])}: {f['verdict']}"]
            for f in r["findings"].values()
            if f["difference"] and f["verdict"] in ("agrees", "disagrees")
        ]
    if rows:
        lines += table(["comparison", "difference [95% interval]"], rows) + [""]
    return "\n".join(lines + [HEADLINE_END])


SECTIONS = ((EVIDENCE_START, EVIDENCE_END, render), (HEADLINE_START, HEADLINE_END, render_headline))


def replace_section(text: str, section: str, start_marker: str = EVIDENCE_START, end_marker: str = EVIDENCE_END):
    start, end = text.index(start_marker), text.index(end_marker) + len(end_marker)
    return text[:start] + section + text[end:]


def rewrite(path: Path, results: Path = RESULTS) -> int:
    """Replace every section whose markers `path` holds; how many it held."""
    text, held = path.read_text(), 0
    for start, end, render_section in SECTIONS:
        if start in text:
            text, held = replace_section(text, render_section(results), start, end), held + 1
    path.write_text(text)
    return held


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Write the evidence sections from benchmarks/results/.")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--write", type=Path, nargs="+", help="markdown files holding a section between its markers")
    args = p.parse_args(argv)
    for path in args.write or []:
        if not rewrite(path, args.results):
            p.error(f"{path} holds neither section's markers ({EVIDENCE_START!r} or {HEADLINE_START!r})")
    if not args.write:
        print(render(args.results))


if __name__ == "__main__":
    main()

"""The benchmark results page, generated: every ``bench_results/*.json`` as one markdown page.

    python -m fewstep_jax.bench.results_doc [--bench_dir=bench_results] [--out=docs/results.md]
    python -m fewstep_jax.bench.results_doc --check     # exit 1 when the page is not what it would write

Each JSON file (and the JSON files one folder down, e.g. ``default_run/pipeline.json``) becomes a
section: its title, the command that produced it, the machine line and its tables. Every number
on the page is read from the JSON; nothing is measured or typed in here. The renderers:

* distillation tables (written by ``fewstep_jax.bench.distill``): that module's own
  :func:`~fewstep_jax.bench.distill.markdown_report`, minus its wall-clock "written" stamp (so the
  page is a pure function of the JSON files) and with its headings moved one level down;
* merged distillation tables without a shared reference (older runs): per testbed a
  :func:`~fewstep_jax.evaluation.tables.markdown_table` and a ``pivot_markdown`` by NFE;
* the teacher-solver table (``bench/solvers.py``), the train-step speed table
  (``bench/train_speed.py``) and the default run's ``pipeline.json``: the same two helpers;
* anything else: its top-level scalar fields.

The command comes from the JSON (``command``, or ``argv``), with any path outside the repository
(``../...``, a folder of the machine it ran on) shown as ``PATH/<file name>``. A JSON that
predates recording its command gets the one written in the ``.md`` of the same name (the header
the benchmark wrote with it), or the one in :data:`COMMANDS_NOT_IN_JSON`, and the page says where
the command came from.

``--check`` compares the page it would write with the file at ``--out`` and exits 1 (printing
the first differing line) when they differ or the file is missing; tests pin the committed page
with it. Rebuild the page after adding or re-running a benchmark.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path

from fewstep_jax.evaluation.tables import fmt, markdown_table, pivot_markdown

PROG = "python -m fewstep_jax.bench.results_doc"
DEFAULT_BENCH_DIR = "bench_results"
DEFAULT_OUT = "docs/results.md"

# Commands of result files whose JSON does not record one and that have no .md beside them.
COMMANDS_NOT_IN_JSON = {
    "train_speed.json": (
        "python -m fewstep_jax.bench.train_speed --out=bench_results/train_speed.json "
        "--variants=torch_eager,torch_eager_1thread,jax,jax_2dev,jax_onednn,jax_xnnpack,jax_bf16 "
        "--mlp_batch_sizes=1024 --unet_batch_sizes=32"
    ),
    "default_run/pipeline.json": "fewstep --config=configs/default.py --workdir=runs/default",
}
REFERENCE_PREFIXES = ("teacher (converged)", "data (same size)")
DISTANCES = ("sw2", "mmd", "fd_mnist", "fd_pca", "fid")
_WRITTEN = re.compile(r" \(written [^)]*\)")
# a path outside the repository in a recorded command (``--mnist=../elsewhere/mnist.npz``)
_OUTSIDE = re.compile(r"(?<=[=\s])\.\./[^\s`]*")


def display_command(cmd: str) -> str:
    """A recorded command as the page shows it: paths outside the repository (``../...``) become
    ``PATH/<file name>``, since they name a folder of the machine the benchmark ran on."""
    return _OUTSIDE.sub(lambda m: "PATH/" + m.group(0).rstrip("/").rsplit("/", 1)[-1], cmd)


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------


def result_files(bench_dir: Path) -> list[Path]:
    """``bench_dir/*.json`` then ``bench_dir/*/*.json``, each group sorted by name."""
    top = sorted(p for p in bench_dir.glob("*.json") if p.is_file())
    sub = sorted(p for p in bench_dir.glob("*/*.json") if p.is_file())
    return top + sub


def kind_of(payload) -> str:
    """``distill``, ``distill_merged``, ``solvers``, ``train_speed``, ``pipeline`` or ``other``."""
    if not isinstance(payload, dict):
        return "other"
    tbs = payload.get("testbeds")
    if isinstance(tbs, dict) and tbs and all(isinstance(v, dict) and "rows" in v for v in tbs.values()):
        refs = [v.get("reference") for v in tbs.values()]
        if "recipes" in payload and "teacher" in payload and all(isinstance(r, dict) for r in refs):
            return "distill"
        if all(isinstance(r, dict) and "straightness" in r for r in refs):
            return "solvers"
        return "distill_merged"
    rows = payload.get("rows")
    if isinstance(rows, list) and rows and isinstance(rows[0], dict):
        if "variant" in rows[0]:
            return "train_speed"
        if "methods" in payload:
            return "pipeline"
    return "other"


def md_header(md: Path) -> tuple[str | None, str | None]:
    """``(title, command)`` from the ``.md`` a benchmark wrote beside its JSON (None when absent)."""
    if not md.is_file():
        return None, None
    lines = md.read_text().splitlines()
    title = next((ln[2:].strip() for ln in lines if ln.startswith("# ")), None)
    for ln in lines:
        m = re.match(r"Command: `([^`]+)`", ln)
        if m:
            return title, m.group(1)
    if lines and re.match(r"`([^`]+)`", lines[0]):
        return title, re.match(r"`([^`]+)`", lines[0]).group(1)
    for i, ln in enumerate(lines):  # a "Commands ..." paragraph followed by a fenced block
        if ln.startswith("Commands"):
            j = next((k for k in range(i, len(lines)) if lines[k].startswith("```")), None)
            if j is None:
                break
            block = []
            for ln2 in lines[j + 1 :]:
                if ln2.startswith("```"):
                    break
                if ln2.strip():
                    block.append(ln2.strip())
            return title, "\n".join(block) or None
    return title, None


def command_of(rel: str, payload, md: Path) -> tuple[str | None, str]:
    """``(command, where it came from)``; the command may span several lines (merged runs)."""
    if isinstance(payload, dict) and payload.get("command"):
        return display_command(str(payload["command"])), "json"
    if isinstance(payload, dict) and payload.get("argv"):
        argv = payload["argv"]
        return display_command(shlex.join(argv) if isinstance(argv, list) else str(argv)), "json"
    _, cmd = md_header(md)
    if cmd:
        return display_command(cmd), f"not recorded in the JSON; from `{md.name}`, written with it"
    if rel in COMMANDS_NOT_IN_JSON:
        return COMMANDS_NOT_IN_JSON[rel], "not recorded in the JSON; the command the table was made with"
    return None, "not recorded"


def command_lines(cmd: str | None, source: str) -> list[str]:
    if cmd is None:
        return ["Command: not recorded."]
    if "\n" in cmd:
        return [f"Commands ({source}):", "", "```", *cmd.splitlines(), "```"]
    return [f"Command: `{cmd}`" + ("" if source == "json" else f" ({source})")]


# ---------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------


def slug(text: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to dashes."""
    s = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return s.replace(" ", "-")


def _seconds(payload) -> str:
    s = payload.get("seconds") if isinstance(payload, dict) else None
    return f" Total: {s:.0f} s." if isinstance(s, (int, float)) else ""


def _is_reference(method: str) -> bool:
    return str(method).startswith(REFERENCE_PREFIXES)


def _distances(rows) -> list[str]:
    return [d for d in DISTANCES if any(d in r for r in rows)]


def _nfes(rows) -> list:
    return sorted({r["nfe"] for r in rows if "nfe" in r and not _is_reference(r.get("method", ""))})


def _columns(rows, preferred) -> list[str]:
    present = {k for r in rows for k in r}
    return [c for c in preferred if c in present]


def render_distill(stem: str, payload) -> tuple[str, list[str]]:
    """``bench.distill.markdown_report`` of the payload, stamp removed, headings one level down."""
    from fewstep_jax.bench.distill import markdown_report

    shown = dict(payload, command=display_command(str(payload.get("command", ""))))
    lines = _WRITTEN.sub("", markdown_report(shown)).rstrip("\n").splitlines()
    title = lines[0][2:].strip() if lines and lines[0].startswith("# ") else stem
    body = []
    for ln in lines[1:]:
        if ln.startswith("## "):
            ln = f"### {stem}: {ln[3:].strip()}"
        body.append(ln)
    while body and not body[0].strip():
        body.pop(0)
    return title, body


def render_distill_merged(stem: str, payload, cmd, source) -> list[str]:
    out = [
        *command_lines(cmd, source),
        "",
        f"Machine: {payload.get('machine', 'not recorded')}.{_seconds(payload)}",
    ]
    if payload.get("note"):
        out += ["", f"Note (from the JSON): {payload['note']}."]
    for name, res in payload["testbeds"].items():
        rows = res["rows"]
        dist = _distances(rows)
        cols = _columns(
            rows,
            [
                "method",
                "nfe",
                "flow_map_mse",
                *dist,
                "steps",
                "batch",
                "train_seconds",
                "wall_seconds",
                "teacher_nfe",
            ],
        )
        out += ["", f"### {stem}: {name}", ""]
        if "reference_nfe" in res:
            out += [f"Reference: adaptive solve, {res['reference_nfe']} NFE.", ""]
        out.append(markdown_table(rows, cols))
        nfes = _nfes(rows)
        sampled = [r for r in rows if not _is_reference(r.get("method", ""))]
        for value in ["flow_map_mse", *dist[:1]]:
            if nfes and any(value in r for r in sampled):
                out += ["", f"{value} by NFE:", "", pivot_markdown(sampled, value, nfes, index=("method",))]
    return out


def render_solvers(stem: str, payload, cmd, source) -> list[str]:
    out = [
        *command_lines(cmd, source),
        "",
        f"Machine: {payload.get('machine', 'not recorded')}.{_seconds(payload)}",
    ]
    if payload.get("path"):
        out += ["", f"Path of the analytic teachers: `{payload['path']}`."]
    for name, res in payload["testbeds"].items():
        rows, ref = res["rows"], res["reference"]
        dist = _distances(rows)
        out += ["", f"### {stem}: {name}", ""]
        out.append(
            "Reference: "
            + ", ".join(f"{k} {fmt(v)}" for k, v in ref.items())
            + ". Flow-map MSE is against it; distances are to the testbed's data."
        )
        refs = [r for r in rows if _is_reference(r.get("method", ""))]
        if refs:
            out += ["", markdown_table(refs, _columns(refs, ["method", "nfe", "flow_map_mse", *dist]))]
        sampled = [r for r in rows if not _is_reference(r.get("method", ""))]
        nfes = _nfes(rows)
        for value in ["flow_map_mse", *dist]:
            if nfes and any(value in r for r in sampled):
                out += ["", f"{value} by NFE:", "", pivot_markdown(sampled, value, nfes, index=("method",))]
    return out


def render_train_speed(stem: str, payload, cmd, source) -> list[str]:
    rows = payload["rows"]
    setting = ", ".join(
        f"{k} {fmt(payload[k])}" for k in ("cores", "steps", "warmup", "repeats", "quick") if k in payload
    )
    out = [*command_lines(cmd, source), "", f"Machine: not recorded in the JSON ({setting})."]
    if payload.get("memory"):
        out += ["", f"Memory column: {payload['memory']}."]
    cols = _columns(
        rows,
        [
            "model",
            "batch_size",
            "variant",
            "devices",
            "threads",
            "xla_flags",
            "params",
            "compile_s",
            "steps_per_s",
            "examples_per_s",
            "peak_rss_mb",
            "cores_busy",
            "ratio_vs_torch_eager",
        ],
    )
    return [*out, "", markdown_table(rows, cols)]


def render_pipeline(stem: str, payload, cmd, source) -> list[str]:
    rows = payload["rows"]
    times = ", ".join(f"{k} {fmt(payload[k])}" for k in ("wall_seconds", "cpu_seconds") if k in payload)
    out = [*command_lines(cmd, source), "", f"Machine: not recorded in the JSON. This run: {times}."]
    if payload.get("methods"):
        out += ["", "Methods: " + ", ".join(f"`{m}`" for m in payload["methods"]) + "."]
    if payload.get("skipped"):
        out += ["", "Skipped: " + ", ".join(f"`{m}`" for m in payload["skipped"]) + "."]
    for name in dict.fromkeys(r.get("testbed", "") for r in rows):
        tb_rows = [r for r in rows if r.get("testbed", "") == name]
        dist = _distances(tb_rows)
        out += ["", f"### {stem}: {name}", ""]
        refs = [r for r in tb_rows if _is_reference(r.get("method", ""))]
        if refs:
            out += [markdown_table(refs, _columns(refs, ["method", "nfe", "flow_map_mse", *dist])), ""]
        sampled = [r for r in tb_rows if not _is_reference(r.get("method", ""))]
        nfes = _nfes(tb_rows)
        first = True
        for value in ["flow_map_mse", *dist]:
            if nfes and any(value in r for r in sampled):
                out += ([] if first else [""]) + [
                    f"{value} by NFE:",
                    "",
                    pivot_markdown(sampled, value, nfes, index=("method",)),
                ]
                first = False
        cost = [r for r in sampled if "train_seconds" in r]
        if cost:
            seen = {r["method"]: r for r in cost}
            out += [
                "",
                markdown_table(
                    list(seen.values()), _columns(cost, ["method", "steps", "batch", "train_seconds"])
                ),
            ]
    return out


def render_other(stem: str, payload, cmd, source) -> list[str]:
    out = [*command_lines(cmd, source)]
    if isinstance(payload, dict):
        scalars = [{"field": k, "value": v} for k, v in payload.items() if not isinstance(v, (dict, list))]
        if scalars:
            out += ["", markdown_table(scalars, ["field", "value"])]
    return out


DEFAULT_TITLES = {
    "solvers": "Teacher solvers on every testbed",
    "train_speed": "Train-step speed: JAX against PyTorch eager",
    "pipeline": "The default run",
    "distill_merged": "Distillation benchmark (merged runs)",
    "other": "Benchmark result",
}
RENDERERS = {
    "distill_merged": render_distill_merged,
    "solvers": render_solvers,
    "train_speed": render_train_speed,
    "pipeline": render_pipeline,
    "other": render_other,
}


def section(bench_dir: Path, path: Path) -> tuple[str, str, list[str]]:
    """``(heading, title, lines)`` of one result file."""
    rel = path.relative_to(bench_dir).as_posix()
    stem = rel[: -len(".json")]
    payload = json.loads(path.read_text())
    kind = kind_of(payload)
    md = path.with_suffix(".md")
    if kind == "distill":
        title, body = render_distill(stem, payload)
    else:
        cmd, source = command_of(rel, payload, md)
        md_title, _ = md_header(md)
        title = md_title or DEFAULT_TITLES[kind]
        body = RENDERERS[kind](stem, payload, cmd, source)
    lines = [f"## {stem}", "", f"**{title}** (`{bench_dir.name}/{rel}`)", "", *body]
    return stem, title, lines


def render(bench_dir: str | Path = DEFAULT_BENCH_DIR) -> str:
    """The whole page for the result files of ``bench_dir``."""
    bench_dir = Path(bench_dir)
    files = result_files(bench_dir)
    if not files:
        raise FileNotFoundError(f"no *.json result files in {bench_dir}")
    sections = [section(bench_dir, p) for p in files]
    head = [
        "# Benchmark results",
        "",
        f"Generated by `{PROG}` from the JSON files in `{bench_dir.name}/`: do not edit by hand. After "
        f"adding or re-running a benchmark, run `{PROG}` again; `{PROG} --check` (run by the tests) "
        "fails while this page is out of date. Every number below is read from those files; what "
        "the tables show is discussed in [findings.md](findings.md), how to rerun them in "
        "[guides/benchmarks.md](guides/benchmarks.md). In the recorded commands a path outside "
        "the repository is shown as `PATH/<file name>`.",
        "",
        "Contents:",
        "",
        *[f"* [{stem}](#{slug(stem)}): {title}" for stem, title, _ in sections],
    ]
    out = head
    for _, _, lines in sections:
        out += ["", *lines]
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench_dir", default=DEFAULT_BENCH_DIR, help="folder of the benchmark JSON files")
    ap.add_argument("--out", default=DEFAULT_OUT, help="the markdown page to write (or to check)")
    ap.add_argument(
        "--check", action="store_true", help="exit 1 when --out differs from what would be written"
    )
    a = ap.parse_args(argv)
    text = render(a.bench_dir)
    out = Path(a.out)
    if a.check:
        if not out.is_file():
            print(f"{out} does not exist; write it with: {PROG} --out={out}")
            return 1
        old = out.read_text()
        if old == text:
            print(f"{out} is up to date")
            return 0
        old_lines, new_lines = old.splitlines(), text.splitlines()
        i = next(
            (k for k, (x, y) in enumerate(zip(old_lines, new_lines)) if x != y),
            min(len(old_lines), len(new_lines)),
        )
        have = old_lines[i] if i < len(old_lines) else "<end of file>"
        want = new_lines[i] if i < len(new_lines) else "<end of file>"
        print(f"{out} is out of date (first difference at line {i + 1}):\n  file: {have}\n  want: {want}")
        print(f"rebuild it with: {PROG} --bench_dir={a.bench_dir} --out={out}")
        return 1
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out} ({len(text.splitlines())} lines from {len(result_files(Path(a.bench_dir)))} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

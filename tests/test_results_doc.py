"""docs/results.md is generated from bench_results/*.json by fewstep_jax/bench/results_doc.py."""

import json
from pathlib import Path

import pytest

from fewstep_jax.bench import results_doc
from fewstep_jax.evaluation.tables import fmt

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench_results"
PAGE = ROOT / "docs" / "results.md"


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("results_doc") / "results.md"
    assert results_doc.main([f"--bench_dir={BENCH}", f"--out={out}"]) == 0
    return out.read_text()


def test_every_result_file_has_a_section_with_its_command(page):
    files = results_doc.result_files(BENCH)
    assert len(files) >= 20
    for p in files:
        stem = p.relative_to(BENCH).as_posix()[: -len(".json")]
        assert f"\n## {stem}\n" in page, stem
        payload = json.loads(p.read_text())
        if isinstance(payload, dict) and payload.get("command"):
            assert f"`{results_doc.display_command(payload['command'])}`" in page, stem
        if isinstance(payload, dict) and payload.get("machine"):
            assert f"Machine: {payload['machine']}" in page, stem


def test_cells_are_the_json_numbers(page):
    payload = json.loads((BENCH / "distill_trajectory.json").read_text())
    rows = payload["testbeds"]["gmm8"]["rows"]
    row = next(r for r in rows if r["method"] == "traflow" and r["nfe"] == 1)
    assert f"| traflow | 1 | {fmt(row['flow_map_mse'])} | {fmt(row['sw2'])} |" in page
    assert "(written " not in page  # the page is a pure function of the JSON files


def test_paths_outside_the_repository_are_shown_as_placeholders():
    cmd = "python -m x --set testbed.mnist_path=../elsewhere/data/mnist.npz --mnist=../m.npz --out=a/b.json"
    assert results_doc.display_command(cmd) == (
        "python -m x --set testbed.mnist_path=PATH/mnist.npz --mnist=PATH/m.npz --out=a/b.json"
    )


def test_check_passes_on_the_committed_page(capsys):
    assert results_doc.main([f"--bench_dir={BENCH}", f"--out={PAGE}", "--check"]) == 0
    assert "up to date" in capsys.readouterr().out


def test_check_fails_on_a_modified_or_missing_page(tmp_path, capsys):
    text = PAGE.read_text()
    edited = text.replace("| traflow | 1 |", "| traflow | 1 | 0 |", 1)
    assert edited != text
    bad = tmp_path / "results.md"
    bad.write_text(edited)
    assert results_doc.main([f"--bench_dir={BENCH}", f"--out={bad}", "--check"]) == 1
    assert "out of date" in capsys.readouterr().out
    assert results_doc.main([f"--bench_dir={BENCH}", f"--out={tmp_path / 'none.md'}", "--check"]) == 1

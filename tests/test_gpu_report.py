"""``benchmark/gpu_report.py --device cpu --quick``: the GPU report's code on tiny sizes, every row of its table."""
from __future__ import annotations

import json

import pytest
import torch

from benchmark import gpu_report
from benchmark import gpu
from benchmark.gpu import train_row

pytestmark = pytest.mark.usefixtures("one_thread")

QUICK_ROWS = ["pytest -m cuda", "D0 fp32 eager", "D0 fp16 eager", "D0 fp32 fastest", "D0 fp16 fastest",
              "batch 2 D0 fp32 eager", "batch 2 D0 fp16 fastest", "train D0 amp", "train D0 amp + checkpointing"]


def table_rows(text: str):
    """{first cell: cells} of the markdown table's body."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] not in ("row", "---"):
            rows[cells[0]] = cells
    return rows


def test_quick_cpu_report_has_every_row(tmp_path, capsys):
    out = tmp_path / "report.json"
    code = gpu_report.main(gpu_report.parse_args(["--device", "cpu", "--quick", "--threads", "1",
                                                  "--json", str(out)]))
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "| row | setting | ms | images/s | MiB (RSS) | note |" in printed
    rows = table_rows(printed)
    assert list(rows) == QUICK_ROWS
    assert rows["pytest -m cuda"][5].endswith("skipped") or "skipped in" in rows["pytest -m cuda"][5]
    for name in ("D0 fp32 eager", "D0 fp32 fastest", "batch 2 D0 fp32 eager"):
        ms, fps = float(rows[name][2]), float(rows[name][3])
        batch = 2 if name.startswith("batch") else 1
        assert ms > 0 and fps == pytest.approx(1000.0 * batch / ms, rel=0.01)  # FPS = images / time
    assert rows["D0 fp16 eager"][5] == "fp16 needs CUDA"
    for name in ("train D0 amp", "train D0 amp + checkpointing"):
        assert "finite" in rows[name][5] and "3 steps" in rows[name][1]
    payload = json.loads(out.read_text())
    assert [r["name"] for r in payload["rows"]] == QUICK_ROWS and payload["quick"] is True
    assert len(payload["rows"][-1]["data"]["losses"]) == 3
    assert torch.get_num_threads() == 1  # the caller's thread count is restored


def test_models_past_the_time_budget_are_rows_saying_so(tmp_path, capsys):
    code = gpu_report.main(gpu_report.parse_args(["--device", "cpu", "--quick", "--threads", "1", "--no_tests",
                                                  "--max_minutes", "1e-9", "--json", str(tmp_path / "r.json")]))
    captured = capsys.readouterr()
    rows = table_rows(captured.out)
    assert code == 1 and "D0 fp32 eager" in captured.err
    assert all("left out: over --max_minutes" in rows[f"D0 {m}"][5] for m in ("fp32 eager", "fp16 fastest"))
    assert "train D0 amp" in rows


@pytest.mark.parametrize("losses, note", [
    ([3.0 - 0.1 * i for i in range(20)], "finite, decreasing"),
    ([1.0 + 0.01 * i for i in range(20)], "finite, not decreasing"),
    ([3.0 - 0.1 * i for i in range(19)] + [float("nan")], "NOT FINITE"),
])
def test_training_row_checks_finite_and_falling_losses(monkeypatch, losses, note):
    """The step is replaced by one returning the given losses: the row's verdict follows them."""
    returned = iter(losses)

    def fake_step(*args, **kwargs):
        return "ok", torch.tensor(next(returned)), torch.tensor(0.0), ()

    monkeypatch.setattr(gpu, "optimizer_step", fake_step)
    row = train_row(0, batch_size=1, size=128, steps=20, device=torch.device("cpu"))
    assert note in row.note and row.ok == (note == "finite, decreasing")
    assert row.data["losses"][:19] == pytest.approx(losses[:19])


def test_bad_arguments_are_one_line(capsys):
    assert gpu_report.main(gpu_report.parse_args(["--device", "cpu", "--runs", "0"])) == 1
    assert capsys.readouterr().err.startswith("error: --max_minutes must be > 0")

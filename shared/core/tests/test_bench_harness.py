"""verger.core.bench: interleaved timing, peak memory, FLOPs and the report folder."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from verger.core.bench import Report, Timing, compare, count_flops, measure_peak_memory, speedups
from verger.core.bench.report import new_figure


def test_compare_interleaves_rounds_after_warmup() -> None:
    calls: list[str] = []
    fns = {name: (lambda n=name: calls.append(n)) for name in ("a", "b", "c")}
    timings = compare(fns, warmup=2, repeats=4)
    assert calls[:6] == ["a", "a", "b", "b", "c", "c"]  # warm-up, each candidate alone
    rounds = [calls[6 + 3 * r : 9 + 3 * r] for r in range(4)]
    assert rounds == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    for name, t in timings.items():
        assert t.name == name and t.repeats == 4
        assert t.median_s == statistics.median(t.times_s)
        assert t.min_s <= t.median_s <= t.max_s


def test_compare_inner_calls_are_averaged() -> None:
    count = {"n": 0}

    def f() -> None:
        count["n"] += 1

    compare({"f": f}, warmup=1, repeats=3, inner=5)
    assert count["n"] == 1 + 3 * 5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"repeats": 0}, "repeats"), ({"warmup": -1}, "warmup"), ({"inner": 1.5}, "inner")],
)
def test_compare_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        compare({"f": lambda: None}, **kwargs)
    with pytest.raises(ValueError, match="non-empty"):
        compare({})
    with pytest.raises(TypeError, match="callable"):
        compare({"f": 3})  # type: ignore[dict-item]


def test_speedups_are_ratios_of_medians() -> None:
    def t(name: str, med: float) -> Timing:
        return Timing(name, med, med, med, med, 0.0, (med,))

    ratios = speedups({"base": t("base", 2.0), "fast": t("fast", 0.5)}, baseline="base")
    assert ratios == {"base": 1.0, "fast": 4.0}
    with pytest.raises(ValueError, match="baseline"):
        speedups({"a": t("a", 1.0)}, baseline="zz")


def test_cpu_peak_memory_closed_form() -> None:
    def fn() -> None:
        a = torch.empty(1000, dtype=torch.float32)  # 4000 B
        b = torch.empty(2000, dtype=torch.float32)  # 8000 B -> live 12000 (the peak)
        del a
        c = torch.empty(500, dtype=torch.float32)  # live 10000
        v = b.view(40, 50)  # a view: no new storage
        v.add_(1.0)  # in place: no new storage
        del b, c, v

    assert measure_peak_memory(fn, device="cpu") == 12000


def test_cpu_peak_memory_ignores_existing_tensors_and_is_stable() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    x = torch.randn(32, 64)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # grads exist already: backward accumulates in place

    def step() -> None:
        model(x).square().mean().backward()

    first = measure_peak_memory(step, device="cpu")
    second = measure_peak_memory(step, device="cpu")
    assert first == second
    # The hidden activation (32x256 fp32) and its GELU are both saved for backward.
    assert first >= 2 * 32 * 256 * 4
    assert measure_peak_memory(lambda: x.mul_(1.0), device="cpu") == 0


def test_peak_memory_rejects_unknown_device() -> None:
    with pytest.raises(ValueError, match="device"):
        measure_peak_memory(lambda: None, device="meta")


def test_count_flops_matmul_and_backward() -> None:
    a = torch.randn(8, 16, requires_grad=True)
    b = torch.randn(16, 4, requires_grad=True)
    assert count_flops(lambda: a @ b) == 2 * 8 * 16 * 4
    # backward of a matmul is two more matmuls of the same size
    assert count_flops(lambda: (a @ b).sum().backward()) == 3 * 2 * 8 * 16 * 4


def test_count_flops_in_place_accumulation_counts_like_out_of_place() -> None:
    x, y, acc = torch.randn(3, 8, 16), torch.randn(3, 16, 4), torch.randn(3, 8, 4)
    out_of_place = count_flops(lambda: torch.baddbmm(acc, x, y))
    assert out_of_place == 3 * 2 * 8 * 16 * 4
    assert count_flops(lambda: acc.clone().baddbmm_(x, y)) == out_of_place
    m, w, c = torch.randn(8, 16), torch.randn(16, 4), torch.randn(8, 4)
    assert count_flops(lambda: c.clone().addmm_(m, w)) == count_flops(lambda: torch.addmm(c, m, w))


def test_report_writes_metrics_markdown_and_png(tmp_path) -> None:
    report = Report(tmp_path / "out", title="Bench")
    report.metric("speedup", 1.5)
    report.metrics_from({"ms": 3, "ok": True}, prefix="x_")
    report.table("Rows", [{"name": "a", "value": 0.123456}, {"name": "b|c", "value": 2}])
    fig, ax = new_figure()
    ax.plot([0, 1], [1, 0])
    png = report.plot("curve", fig)
    out = report.write()
    assert json.loads((out / "metrics.json").read_text()) == {
        "speedup": 1.5,
        "x_ms": 3,
        "x_ok": True,
    }
    text = (out / "report.md").read_text()
    assert "# Bench" in text and "`speedup`" in text and "0.1235" in text and "b\\|c" in text
    assert "![curve](curve.png)" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*tmp"))  # no temporary files left behind


def test_report_rejects_bad_metrics(tmp_path) -> None:
    report = Report(tmp_path)
    with pytest.raises(ValueError, match="not finite"):
        report.metric("loss", float("nan"))
    with pytest.raises(ValueError, match="metric name"):
        report.metric("has space", 1.0)
    with pytest.raises(TypeError, match="list"):
        report.metric("xs", [1, 2])  # type: ignore[arg-type]
    report.metric("t", torch.tensor(2.5))  # tensors and numpy scalars become plain numbers
    assert report.metrics["t"] == 2.5

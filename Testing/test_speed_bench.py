"""bench/bench_inference.py runs on a CPU with a tiny model on real slices and reports consistently."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from ultrasam.resources import SAMPLE_VOLUME

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_inference  # noqa: E402


def test_tiny_benchmark_on_real_slices(tmp_path):
    volume = SAMPLE_VOLUME
    output = tmp_path / "figures.json"

    figures = bench_inference.main(["--device", "cpu", "--model", "tiny", "--volume", str(volume), "--slices", "2",
                             "--clicks", "2", "--batch", "2", "--json", str(output),
                                    "--precision", "float32"])

    assert json.loads(output.read_text()) == json.loads(json.dumps(figures))
    assert figures["slices"] == 2 and figures["slice_shape"] == [256, 256]
    reference, engine = figures["reference"], figures["engine"]
    for key, ratio in figures["speedup"].items():
        assert ratio == pytest.approx(reference[key] / engine[key])
    assert engine["propagated_slices"] == reference["propagated_slices"] == 2  # both walks reached both slices
    assert engine["click_ms_min"] <= engine["click_ms"]
    # Both slices embedded in one turn of batch 2 per path; the figure is that turn's seconds per slice.
    for path in (reference, engine):
        assert path["embed_ms_per_slice_turns"] == [path["embed_ms_per_slice"]]
    assert figures["engine_setup"]["attention_blocks"] == 4
    # Same weights, same box, same one-pass semantics: the engine's masks are the reference's.
    assert figures["mask_iou"]["min"] >= 0.98
    assert 0.01 < figures["mask_iou"]["mean_mask_area"] < 0.99  # masks are not trivially empty or full


def test_refuses_a_missing_volume(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench_inference.main(["--device", "cpu", "--volume", str(tmp_path / "none.nii.gz")])
    assert "no volume at" in capsys.readouterr().err


def test_paths_take_turns_and_alternate_who_goes_first():
    order = []

    def run(name):
        return lambda turn: order.append((name, turn)) or float(turn)

    seconds = bench_inference.in_turns({"reference": run("reference"), "engine": run("engine")}, 3)

    assert order == [("reference", 0), ("engine", 0), ("engine", 1), ("reference", 1), ("reference", 2), ("engine", 2)]
    assert seconds == {"reference": [0.0, 1.0, 2.0], "engine": [0.0, 1.0, 2.0]}


@pytest.mark.skipif(sys.platform == "win32", reason="the GIL emulation needs usleep through ctypes.PyDLL (POSIX)")
def test_gil_benchmark_reports_each_kind_of_run_as_held_over_alone(tmp_path):
    import bench_gil
    from ultrasam.resources import COMPACT_V1_MODEL

    if not COMPACT_V1_MODEL.is_file():
        pytest.skip("the compact-v1 model file is not installed")
    figures = bench_gil.main(["--repeats", "1", "--json", str(tmp_path / "gil.json")])

    assert json.loads((tmp_path / "gil.json").read_text()) == json.loads(json.dumps(figures))
    assert set(figures["rows"]) == {"in-process worker thread, click", "through the client, click",
                                    "through the client, 40-slice propagation"}
    for row in figures["rows"].values():
        assert row["ratio"] == pytest.approx(row["held_ms"] / row["alone_ms"], rel=0.01)

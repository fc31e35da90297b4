"""benchmarks/run_all.py: a smoke run writes the performance page; the renderers read every script's JSON."""
import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_run_all():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("run_all", ROOT / "benchmarks" / "run_all.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_quick_run_writes_the_page(tmp_path):
    out = tmp_path / "performance.md"
    run_all = load_run_all()
    notes = "### A dated investigation\n\nmeasured by hand, 2026-12-03"
    out.write_text("# Performance\n\n| figure | old generated table |\n\n" + run_all.NOTES_MARKER + "\n\n" + notes + "\n")
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3"}
    # The stitching benchmark alone keeps this a smoke test; the other sections are rendered below.
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--quick", "--no-peers",
         "--skip", "samplers,model_step", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    page = out.read_text()
    assert "at commit `" in page and "Smoke run" in page
    assert "| stitching ms, overlap 0.5, gaussian" in page and "| ≤ 0.5 |" in page
    assert "blending alone" in page
    assert "| subjects/s, 3 small-size BraTS subjects, model 0.1 s each (a GPU's share), overlapped vs" in page
    assert "| ms per subject to make ready, 3 small-size BraTS subjects (T1+T2+label), later runs: memory-mapped and" in page
    assert "| class-weighted 96³ windows/s, one subject memory-mapped vs in RAM (ours) |" in page
    # the generated part is replaced, the notes below the marker are carried over once, after it
    assert "old generated table" not in page and page.count(notes) == 1
    assert page.index(run_all.NOTES_MARKER) < page.index(notes)
    assert not list(tmp_path.glob(".*partial"))


def test_a_page_without_the_marker_is_kept_whole_below_it(tmp_path):
    run_all = load_run_all()
    page = tmp_path / "performance.md"
    assert run_all.kept_notes(page) == ""
    page.write_text("# Performance\n\nhand-made table\n")
    notes = run_all.kept_notes(page)
    assert "hand-made table" in notes and notes.startswith("## Earlier page")
    rendered = run_all.render([], "abc123", "2026-01-01 00:00 UTC", False, notes)
    page.write_text(rendered)
    assert run_all.kept_notes(page) == notes  # a second run keeps them as they are


def test_sections_render_ours_peer_ratio_target_and_met():
    run_all = load_run_all()
    samplers = [
        {"method": "numpy memory-copy floor, (X,Y,Z,C) layout", "kind": "floor", "windows_s": [1000, 900, 1100]},
        {"method": "numpy memory-copy floor, (C,X,Y,Z) layout", "windows_s": [800, 700, 900]},
        {"method": "highres3d ClassWeightedSampler", "kind": "sampler", "setup_ms": 3.0, "windows_s": [950, 900, 990]},
        {"method": "TorchIO LabelSampler", "kind": "peer_sampler", "windows_s": [900, 800, 950]},
        {"method": "MONAI RandCropByLabelClassesd + ClassesToIndicesd", "kind": "peer_sampler", "windows_s": [500, 1, 2]},
        {"method": "augmented windows/s, device: accelerator", "kind": "augmented", "windows_s": [35.0, 30, 40],
         "note": "57 CPU-ms/window"},
        {"method": "input wait, plain", "kind": "wait", "windows_s": [1, 1, 1], "wait_fraction": 0.25, "note": ""},
        {"method": "highres3d ClassWeighted + CPU rotation/scaling", "kind": "augment", "windows_s": [45.0, 40, 50]},
        {"method": "MONAI RandAffined (on pre-cut windows)", "kind": "peer_augment", "windows_s": [20.0, 19, 21]},
        {"method": "TorchIO RandomAffine (on pre-cut windows)", "kind": "peer_augment", "windows_s": [25.0, 24, 26]},
    ]
    rows = run_all.sampler_rows(samplers)
    rotation = next(r for r in rows if "rotation" in r[0])
    assert rotation[1:] == ["45.0", "25.0", "1.80", "≥ 2.0", "no"] and rotation[0].endswith("TorchIO RandomAffine (on pre-cut windows)")
    assert rows[-2][1:] == ["35.0", "-", "-", "≥ 1,000", "no"] and "57 CPU-ms/window" in rows[-2][0]
    assert rows[-1][0].endswith("% of the step waiting") and rows[-1][1] == "25"
    assert rows[0][1:] == ["950", "900", "1.06", "≥ 1.0", "yes"]
    assert rows[2][3:] == ["0.95", "≥ 0.90", "yes"] and rows[3][-1] == "yes"
    inference = {"ours": [{"method": "highres3d", "overlap": 0.5, "mode": "gaussian", "total": 0.3, "stitch": 0.1,
                           "alone": 0.05, "in_place": 0.02, "in_place_ring": 0.06, "samples": 15,
                           "stitch_quartiles": [0.08, 0.125]}],
                 "peers": {"rows": [{"method": "MONAI swi", "overlap": 0.5, "mode": "gaussian", "total": 0.2,
                                     "stitch": 0.1, "samples": 10, "stitch_quartiles": [0.09, 0.11]}]}}
    cache = {"subjects": 6, "size": "full", "rows": [
        {"method": run_all.disk_cache.RAM, "seconds": 0.5}, {"method": run_all.disk_cache.DISK_FIRST, "seconds": 0.6},
        {"method": run_all.disk_cache.DISK_LATER, "seconds": 0.002}, {"method": run_all.disk_cache.MONAI_LATER,
                                                                      "seconds": 0.3},
        {"method": run_all.disk_cache.DISK_READ, "seconds": 0.03},
        {"method": run_all.disk_cache.WINDOWS_RAM, "windows_s": 800}, {"method": run_all.disk_cache.WINDOWS_MAPPED,
                                                                       "windows_s": 760}]}
    read, later, first, against_ram, windows = run_all.cache_rows(cache)
    assert read[1:4] == ["30.0", "300.0", "10.0x faster"]
    assert later[1:4] == ["2.0", "300.0", "150.0x faster"] and first[1:4] == ["600.0", "-", "-"]
    assert against_ram[2:4] == ["500.0 (ours, ram)", "250.0x faster"] and windows[1:4] == ["760", "800 (ours, RAM)", "0.95"]
    stitching = run_all.inference_rows(inference)[0]
    assert stitching[1:] == ["100", "100", "1.00", "≤ 0.5", "no"]
    assert "blending alone 50 ms = 0.50 of MONAI's; in place after each model call 20 ms, one ring 60 ms" in stitching[0]
    assert "stitching quartiles: ours 80 to 125 ms, MONAI 90 to 110 ms over 15 and 10 samples" in stitching[0]
    step = {"min_s": 1.0}
    model = {"ours": {"default": [{"size": 32, "batch": 1, "train": step, "forward": step}]},
             "peer": [{"size": 32, "batch": 1, "train": {"min_s": 2.0}, "forward": {"min_s": 0.5}}]}
    train, forward = run_all.model_rows(model)
    assert train[3:] == ["2.00", "≥ 1.0 (MONAI / ours)", "yes"] and forward[3] == "0.50"
    model["volume"] = {"float32": {"median_s": 0.8}, "bfloat16": {"median_s": 0.5}, "agreement_dice": 0.99261,
                       "shape": [64, 64, 48]}
    precision = run_all.model_rows(model)[-1]
    assert precision[1:4] == ["500", "800 (ours, float32)", "1.60"]
    assert "Dice 0.9926" in precision[0] and "synthetic 64×64×48 subject" in precision[0]
    folder = {"subjects": 6, "size": "full", "model_seconds": 0.5,
              "rows": [{"method": run_all.FOLDER_SEQUENTIAL, "subjects_s": 0.8},
                       {"method": run_all.FOLDER_OVERLAPPED, "subjects_s": 1.2},
                       {"method": run_all.FOLDER_MONAI, "subjects_s": 1.5}]}
    versus_monai, versus_before = run_all.folder_rows(folder)
    assert versus_monai[1:4] == ["1.20", "1.50", "0.80"] and "MONAI" in versus_monai[0]
    assert versus_before[1:4] == ["1.20", "0.80", "1.50"] and "6 full-size" in versus_before[0]
    page = run_all.render([("Sampling", "python benchmarks/samplers.py", rows)], "abc123", "2026-01-01 00:00 UTC", False)
    assert "| figure | ours | peer | ratio | target | met |" in page and "`abc123`" in page


def load_gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks" / "gpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_benchmark_measures_the_targets_first_and_keeps_every_row_as_it_comes(tmp_path):
    """The GPU run gets one short try: what it measured before a time limit must survive, targets first."""
    import json
    from types import SimpleNamespace

    gpu = load_gpu_bench()
    args = SimpleNamespace(precisions=("float32", "bfloat16"), batches=(1, 2, 4))
    assert gpu.jobs(args)[:5] == [("float32", 1), ("float32", "whole"), ("bfloat16", 1), ("bfloat16", "whole"),
                                  ("float32", "augment")]
    assert sorted(gpu.jobs(args), key=str) == sorted(
        [(p, j) for p in args.precisions for j in (1, 2, 4, "whole")] + [("float32", "augment"), ("float32", "windows")],
        key=str)
    assert gpu.jobs(args)[-1] == ("float32", "windows")  # not a target: measured last

    path = tmp_path / "ours.json"
    rows = gpu.Rows(str(path), earlier=[])
    row = dict(method="highres3d", precision="float32", what="train", batch=1, size=96, seconds=0.5, windows_s=2.0,
               versions="keras")
    rows.add(row)
    assert json.loads(path.read_text()) == [row]  # on disk after the first row, not only at the end
    rows.add(dict(row, what="whole volume", size="240x240x155", seconds=0.8))
    assert len(json.loads(path.read_text())) == 2 and not list(tmp_path.glob("*.partial"))

    # ours alone (the peer was cut off): a table without ratios; with the peer, targets are judged
    alone = gpu.table(list(rows))
    assert "| train 1x96³, windows/s | float32 | 2.0 | - | - |  |" in alone
    assert "| whole volume 240x240x155, s | float32 | 0.80 | - | - | < 1 s (met) |" in alone
    monai = dict(row, method="MONAI HighResNet", seconds=0.4, windows_s=2.5)
    judged = gpu.table(list(rows) + [monai])
    assert "| train 1x96³, windows/s | float32 | 2.0 | 2.5 | 0.80 | ≥ 1.0 (missed) |" in judged
    augmented = dict(row, what="augment", batch=4, windows_s=1500.0)
    assert "| float32 | 1500 | - | - | ≥ 1,000 (met) |" in gpu.table([augmented])
    delivered = dict(row, what="pipeline", batch=4, cores=2, windows_s=900.0, host_cpu_ms_per_window=0.3)
    assert "2 host cores, volumes on the device" in gpu.table([delivered])
    assert "| float32 | 900 | - | - | ≥ 1,000 (missed) |" in gpu.table([delivered])
    # a smoke run's sizes are not judged against the targets
    assert "(not judged: smoke-run size)" in gpu.table([dict(augmented, size=16)])
    assert "(met)" not in gpu.table([dict(row, what="whole volume", size="32x32x24", seconds=0.5)])
    windows = dict(row, what="windows", batch=4, size="240x240x155", window=96, seconds=0.4)
    assert "in 96³ windows (overlap 0.25, gaussian, 4 per call), s | float32 | 0.40 | 0.80 | 2.00 |" in gpu.table(
        [windows, dict(windows, method="MONAI HighResNet", seconds=0.8)])


def test_a_recorded_gpu_run_is_what_the_performance_page_shows(tmp_path):
    """The GPU machine keeps nothing: its rows are recorded in the repository, and run_all renders them."""
    import json

    gpu = load_gpu_bench()
    rows = [dict(method="highres3d", precision="float32", what="train", batch=1, size=96, seconds=0.07,
                 windows_s=14.0, versions="keras 3, backend jax"),
            dict(method="MONAI HighResNet", precision="float32", what="train", batch=1, size=96, seconds=0.09,
                 windows_s=11.0, versions="torch 2, NVIDIA H200")]
    ours, peer, record = tmp_path / "ours.json", tmp_path / "peer.json", tmp_path / "results" / "gpu.json"
    ours.write_text(json.dumps(rows[:1]))
    peer.write_text(json.dumps(rows[1:]))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_bench.py"), "--part", "none", "--merge",
                           str(ours), str(peer), "--record", str(record), "--commit", "abc123", "--measured",
                           "2026-12-04 17:03 UTC"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(record.read_text())["rows"] == rows
    gpu.ROOT = tmp_path  # the section names the record relative to the repository
    section = "\n".join(gpu.recorded_section(record))
    assert "`bash benchmarks/gpu.sh` at commit `abc123`, measured 2026-12-04 17:03 UTC" in section
    assert "NVIDIA H200" in section and "`results/gpu.json`" in section
    assert "| train 1x96³, windows/s | float32 | 14.0 | 11.0 | 1.29 | ≥ 1.0 (met) |" in section
    assert gpu.recorded_section(tmp_path / "none.json") == []
    # nothing to record is an error, not an empty record
    empty = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_bench.py"), "--part", "none", "--record",
                            str(tmp_path / "empty.json")], capture_output=True, text=True)
    assert empty.returncode == 2 and "no rows to record" in empty.stderr and not (tmp_path / "empty.json").exists()


def test_sampler_rows_pool_every_rounds_samples():
    """Alternating rounds only help if each row's repetitions from every round end up in one median."""
    import os
    from unittest import mock

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        with mock.patch.dict(os.environ):  # the script sets thread variables for its own process
            spec = importlib.util.spec_from_file_location("samplers_bench", ROOT / "benchmarks" / "samplers.py")
            samplers = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(samplers)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    ours = dict(method="ours", kind="sampler", setup_ms=2.0, samples=[100.0, 110.0])
    peer = dict(method="peer", kind="peer_sampler", setup_ms=None, samples=[90.0])
    once = dict(method="only in round 1", kind="peer_sampler", setup_ms=None, samples=[5.0])
    rounds = [[ours, peer, once], [dict(ours, setup_ms=4.0, samples=[300.0]), dict(peer, samples=[95.0, 400.0])]]
    pooled = {r["method"]: r for r in samplers.pool_rounds(rounds)}
    assert pooled["ours"]["samples"] == [100.0, 110.0, 300.0] and pooled["ours"]["windows_s"] == (110.0, 100.0, 300.0)
    assert pooled["ours"]["setup_ms"] == 3.0 and pooled["ours"]["rounds"] == 2
    assert pooled["peer"]["windows_s"] == (95.0, 90.0, 400.0) and pooled["peer"]["setup_ms"] is None
    assert pooled["only in round 1"]["rounds"] == 1
    assert rounds[0][0]["samples"] == [100.0, 110.0]  # the measured rows are not changed in place

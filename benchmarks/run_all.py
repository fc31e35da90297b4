"""Run every CPU benchmark and write the figures to docs/performance.md.

Runs ``samplers.py``, ``inference.py``, ``infer_folder.py``, ``disk_cache.py`` and ``model_step.py`` one after the
other (never side by side), each with ``--json``, and renders one table:
each figure with ours, the peers', the ratio, the target and whether it is
met, under the commit and the date of the run.  The peers' interpreter comes
from ``--peers-python`` / ``$HIGHRES3D_PEERS_PYTHON`` (benchmarks/README.md);
without it the peers' columns stay empty.

    .venv/bin/python benchmarks/run_all.py            # the full run (tens of minutes)
    .venv/bin/python benchmarks/run_all.py --quick    # smoke run, figures meaningless

The page is rewritten down to the line ``NOTES_MARKER``; what follows it
(hand-written, dated investigations) is carried over unchanged, so a new run
never loses them.  A page without the marker is kept whole below it.  The
page is replaced atomically: an interrupted run leaves the old one.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import _peers  # benchmarks/_peers.py: this script's folder is sys.path[0]
import disk_cache
import gpu_bench
from infer_folder import MONAI as FOLDER_MONAI
from infer_folder import OVERLAPPED as FOLDER_OVERLAPPED
from infer_folder import SEQUENTIAL as FOLDER_SEQUENTIAL
from inference import quartile_range

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NOTES_MARKER = "<!-- Notes below this line are written by hand; benchmarks/run_all.py keeps them. -->"


def kept_notes(page: Path) -> str:
    """The hand-written notes of an existing page: everything after NOTES_MARKER, or the whole page without one."""
    if not page.is_file():
        return ""
    text = page.read_text()
    if NOTES_MARKER in text:
        return text.split(NOTES_MARKER, 1)[1].strip("\n")
    if not text.strip():
        return ""
    # A page from before the marker: nothing on it is thrown away, it moves below.
    return "## Earlier page (kept whole by run_all.py)\n\n" + text.strip("\n")


def run(script: str, args: list[str], json_path: Path, peers_python: str | None, env: dict) -> object:
    """Run one benchmark script with ``--json`` and return what it wrote (None when it failed)."""
    peer_args = ["--peers-python", peers_python] if peers_python else ["--no-peers"]
    cmd = [sys.executable, str(HERE / script), *args, *peer_args, "--json", str(json_path)]
    print(f"$ {' '.join(cmd)}", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=sys.stderr, stderr=sys.stderr)
    if done.returncode != 0 or not json_path.is_file():
        print(f"{script} failed (exit {done.returncode}); its figures are left out", file=sys.stderr, flush=True)
        return None
    return json.loads(json_path.read_text())


def fmt(value, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def sampler_rows(rows: list[dict]) -> list[list[str]]:
    """Class-weighted sampling against TorchIO / MONAI and the faster copy floor."""
    def med(pred):
        found = [r["windows_s"][0] for r in rows if pred(r)]
        return found[0] if found else None

    ours = med(lambda r: r.get("kind") == "sampler" and "ClassWeighted" in r["method"])
    setup = next((r.get("setup_ms") for r in rows if r.get("kind") == "sampler" and "ClassWeighted" in r["method"]), None)
    floor = max(r["windows_s"][0] for r in rows if "memory-copy floor" in r["method"])
    torchio = med(lambda r: r.get("kind") == "peer_sampler" and "TorchIO" in r["method"])
    monai = med(lambda r: r.get("kind") == "peer_sampler" and "ClassesToIndicesd" in r["method"])
    out = []
    for name, peer in (("TorchIO LabelSampler", torchio), ("MONAI RandCropByLabelClassesd (cached indices)", monai)):
        ratio = ours / peer if ours and peer else None
        out.append([f"class-weighted 96³ windows/s vs {name}", fmt(ours), fmt(peer), fmt(ratio, 2), "≥ 1.0",
                    "-" if ratio is None else ("yes" if ratio >= 1.0 else "no")])
    ratio = ours / floor if ours and floor else None
    out.append(["class-weighted windows/s vs fastest copy floor", fmt(ours), f"{fmt(floor)} (floor)", fmt(ratio, 2),
                "≥ 0.90", "-" if ratio is None else ("yes" if ratio >= 0.9 else "no")])
    out.append(["class-weighted setup, ms per volume", fmt(setup, 1), "-", "-", "≤ 20",
                "-" if setup is None else ("yes" if setup <= 20 else "no")])
    # Rotation and scaling on the CPU, one thread: ours (windows cut and resampled) against the
    # faster peer transform on windows already cut, as samplers.py times them.
    rotated = med(lambda r: r.get("kind") == "augment")
    peers = [r for r in rows if r.get("kind") == "peer_augment"]
    if rotated and peers:
        best = max(peers, key=lambda r: r["windows_s"][0])
        ratio = rotated / best["windows_s"][0]
        out.append([f"class-weighted 96³ windows + ±10° rotation / ±10 % scaling on the CPU, 1 thread, windows/s vs "
                    f"{best['method']}", fmt(rotated, 1), fmt(best["windows_s"][0], 1), fmt(ratio, 2), "≥ 2.0",
                    "yes" if ratio >= 2.0 else "no"])
    # As training gets them: batches of 4 on 2 cores, our tf.data pipeline against the peers' loaders.
    batches = med(lambda r: r.get("kind") == "pipeline" and r["method"].startswith("tf.data pipeline, 2 cores, plain"))
    for r in rows:
        if r.get("kind") == "peer_pipeline":
            peer = r["windows_s"][0]
            out.append([f"class-weighted 96³ windows/s delivered as batches of 4 (2 cores), tf.data vs {r['method']}",
                        fmt(batches), fmt(peer), fmt(batches / peer if batches and peer else None, 2), "-", "-"])
    for r in rows:
        if r.get("kind") == "pipeline":
            target = "≥ 1,000" if "on-device" in r["method"] else "-"
            met = "-" if target == "-" else ("yes" if r["windows_s"][0] >= 1000 else "no")
            out.append([r["method"] + " windows/s", fmt(r["windows_s"][0]), "-", "-", target, met])
        elif r.get("kind") == "augmented":
            met = "yes" if r["windows_s"][0] >= 1000 else "no"
            out.append([f"{r['method']} windows/s ({r['note']})", fmt(r["windows_s"][0], 1), "-", "-", "≥ 1,000", met])
        elif r.get("kind") == "wait":
            out.append([r["method"] + ", % of the step waiting", fmt(100 * r["wait_fraction"]), "-", "-", "-", "-"])
    return out


def inference_rows(data: dict) -> list[list[str]]:
    """Stitching (whole call minus model time) against MONAI's sliding_window_inference."""
    peers = (data.get("peers") or {}).get("rows", [])
    monai = {(r["overlap"], r["mode"]): r for r in peers if r["method"] == "MONAI swi"}
    out = []
    for r in data["ours"]:
        if r["mode"] not in ("crop", "average", "gaussian"):
            continue
        ref = monai.get((r["overlap"], "gaussian" if r["mode"] == "gaussian" else "constant"))
        ratio = r["stitch"] / ref["stitch"] if ref and ref["stitch"] > 0 else None
        alone = ""
        if r.get("alone") is not None:
            alone = f"; blending alone {r['alone'] * 1e3:.0f} ms" + (
                f" = {r['alone'] / ref['stitch']:.2f} of MONAI's" if ref and ref["stitch"] > 0 else "")
        if r.get("in_place") is not None:
            alone += f"; in place after each model call {r['in_place'] * 1e3:.0f} ms" + (
                f", one ring {r['in_place_ring'] * 1e3:.0f} ms" if r.get("in_place_ring") is not None else "")
        spread = ""
        if r.get("stitch_quartiles") and ref and ref.get("stitch_quartiles"):
            # The samples' spread tells a miss from noise where a ratio sits near its target.
            spread = (f"; stitching quartiles: ours {quartile_range(r)} ms, MONAI {quartile_range(ref)} ms"
                      f" over {r['samples']} and {ref['samples']} samples")
        out.append([f"stitching ms, overlap {r['overlap']}, {r['mode']} (total ms: ours {r['total'] * 1e3:.0f}"
                    + (f", MONAI {ref['total'] * 1e3:.0f}" if ref else "") + alone + spread + ")",
                    fmt(r["stitch"] * 1e3), fmt(ref["stitch"] * 1e3) if ref else "-", fmt(ratio, 2), "≤ 0.5",
                    "-" if ratio is None else ("yes" if ratio <= 0.5 else "no")])
    return out


def folder_rows(data: dict) -> list[list[str]]:
    """Segmenting a folder with a GPU-fast model: overlapped I/O against one after another and MONAI's loop."""
    rate = {r["method"]: r["subjects_s"] for r in data["rows"]}
    ours = rate.get(FOLDER_OVERLAPPED)
    out = []
    for name, peer in (("MONAI Dataset + DataLoader(num_workers=2) + Invertd + SaveImaged", rate.get(FOLDER_MONAI)),
                       ("one subject after another (before)", rate.get(FOLDER_SEQUENTIAL))):
        ratio = ours / peer if ours and peer else None
        out.append([f"subjects/s, {data['subjects']} {data['size']}-size BraTS subjects, model {data['model_seconds']} s "
                    f"each (a GPU's share), overlapped vs {name}", fmt(ours, 2), fmt(peer, 2), fmt(ratio, 2), "-", "-"])
    return out


def cache_rows(data: dict) -> list[list[str]]:
    """Making the training volumes ready: the disk cache against preprocessing at every start and MONAI's PersistentDataset."""
    rows = {r["method"]: r for r in data["rows"]}

    def seconds(name):
        return rows[name]["seconds"] if name in rows else None

    what = f"{data['subjects']} {data['size']}-size BraTS subjects (T1+T2+label)"
    out = []
    for ours, peer, label in (
            (disk_cache.DISK_READ, disk_cache.MONAI_LATER, "later runs: memory-mapped and read once vs "
                                                           "PersistentDataset's load"),
            (disk_cache.DISK_LATER, disk_cache.MONAI_LATER, "later runs: memory-mapped (read as windows are cut) vs "
                                                            "PersistentDataset's load"),
            (disk_cache.DISK_FIRST, disk_cache.MONAI_FIRST, "first run: preprocessed and written vs PersistentDataset's "
                                                            "first pass"),
            (disk_cache.DISK_LATER, disk_cache.RAM, "later runs vs training.cache: ram (preprocessed at every start)")):
        a, b = seconds(ours), seconds(peer)
        peer_cell = fmt(b * 1e3, 1) + (" (ours, ram)" if peer == disk_cache.RAM else "") if b is not None else "-"
        out.append([f"ms per subject to make ready, {what}, {label}", fmt(a * 1e3 if a is not None else None, 1),
                    peer_cell, fmt(b / a if a and b else None, 1) + ("x faster" if a and b else ""), "-", "-"])
    mapped, in_ram = rows.get(disk_cache.WINDOWS_MAPPED), rows.get(disk_cache.WINDOWS_RAM)
    if mapped and in_ram:
        out.append(["class-weighted 96³ windows/s, one subject memory-mapped vs in RAM (ours)", fmt(mapped["windows_s"]),
                    fmt(in_ram["windows_s"]) + " (ours, RAM)", fmt(mapped["windows_s"] / in_ram["windows_s"], 2), "-",
                    "-"])
    return out


def model_rows(data: dict) -> list[list[str]]:
    """Training step and forward pass against MONAI's HighResNet, float32 and bfloat16."""
    peer = {(r["size"], r["batch"]): r for r in data.get("peer", [])}
    out = []
    for variant, results in data["ours"].items():
        for r in results:
            p = peer.get((r["size"], r["batch"]))
            for what in ("train", "forward"):
                ours = r[what]["min_s"] * 1e3
                theirs = p[what]["min_s"] * 1e3 if p else None
                ratio = theirs / ours if theirs else None
                target = "≥ 1.0 (MONAI / ours)" if what == "train" else "-"
                met = "-" if ratio is None or what != "train" else ("yes" if ratio >= 1.0 else "no")
                out.append([f"{what} ms, {r['batch']}x{r['size']}³, {variant}", fmt(ours), fmt(theirs), fmt(ratio, 2),
                            target, met])
    # inference.precision: the whole-volume pass in each precision and how far the segmentations agree.
    volume = data.get("volume") or {}
    if "float32" in volume and "bfloat16" in volume:
        f32, bf16 = (volume[p]["median_s"] * 1e3 for p in ("float32", "bfloat16"))
        dice = volume.get("agreement_dice")
        agree = f"; segmentations agree to Dice {dice:.4f}" if dice is not None else ""
        shape = "×".join(map(str, volume["shape"])) + " " if volume.get("shape") else ""
        out.append([f"whole-volume predict_volume ms, synthetic {shape}subject, bfloat16 vs float32 (ours{agree}; "
                    "inference.precision: auto picks bfloat16 where the CPU computes it natively)",
                    fmt(bf16), f"{fmt(f32)} (ours, float32)", fmt(f32 / bf16, 2), "-", "-"])
    return out


def render(sections: list[tuple[str, str, list[list[str]]]], commit: str, date: str, quick: bool,
           notes: str = "") -> str:
    lines = [
        "# Performance",
        "",
        f"Written by `benchmarks/run_all.py{' --quick' if quick else ''}` at commit `{commit}` on {date}, "
        f"{os.cpu_count()} CPUs, 1-min load average {os.getloadavg()[0]:.2f} at the end.",
        "Ratios compare ours with a peer measured in the same run; absolute times depend on the machine "
        "and whatever else it runs.",
    ]
    if quick:
        lines += ["", "**Smoke run (`--quick`): too few repetitions for the figures to mean anything.**"]
    for title, command, rows in sections:
        lines += ["", f"## {title}", "", f"`{command}`", ""]
        if not rows:
            lines.append("(not run, or failed: see the run's output)")
            continue
        lines += ["| figure | ours | peer | ratio | target | met |", "|---|---|---|---|---|---|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    gpu = gpu_bench.recorded_section()
    lines += ["", "## GPU", ""] + (gpu or [
        "`benchmarks/gpu.sh` (JAX backend) has not been run: no GPU run is recorded in benchmarks/results/gpu.json. "
        "It is one device call (benchmarks/README.md, \"The GPU figures\")."]) + ["", NOTES_MARKER, ""]
    if notes:
        lines += [notes, ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run of every benchmark")
    parser.add_argument("--out", default=str(ROOT / "docs" / "performance.md"), help="where to write (default: %(default)s)")
    parser.add_argument("--skip", default="", help="comma-separated benchmarks to leave out: samplers,inference,infer_folder,disk_cache,model_step")
    parser.add_argument("--keep", metavar="DIR", help="keep each benchmark's JSON here; a JSON already there is reused")
    _peers.add_arguments(parser)
    args = parser.parse_args()
    peers_python = _peers.resolve(args)
    skip = {s for s in args.skip.split(",") if s}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    commit = (commit or "unknown") + (" (with uncommitted changes)" if dirty else "")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    q = ["--quick"] if args.quick else []
    plans = [
        ("samplers", "Sampling and the input pipeline", "samplers.py", q, sampler_rows),
        ("inference", "Stitching (2×240×240×155, 96³ windows, trivial model)", "inference.py",
         # Five rounds: a stitching figure is the median of whole call minus model pass, each
         # ±30 ms on 2 cores, and 15 paired samples per cell move less from run to run than 9.
         ["--quick"] if args.quick else ["--reps", "3", "--rounds", "5"], inference_rows),
        ("infer_folder", "Segmenting a folder (load, predict, restore, write)", "infer_folder.py",
         q or ["--rounds", "3"], folder_rows),
        ("disk_cache", "Training volumes made ready (training.cache: disk)", "disk_cache.py",
         q or ["--rounds", "2"], cache_rows),
        ("model_step", "HighResNet3D step vs MONAI HighResNet (float32 and bfloat16)", "model_step.py",
         q + ["--jit", "off", "--precision", "both"] + ([] if args.quick else ["--sizes", "32,64", "--batches", "1"]),
         model_rows),
    ]
    sections = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for key, title, script, extra, rows_of in plans:
            if key in skip:
                continue
            path = folder / f"{key}.json"
            if args.keep and path.is_file():
                print(f"reusing {path}", file=sys.stderr, flush=True)
                data = json.loads(path.read_text())
            else:
                data = run(script, extra, path, peers_python, env)
            command = f"python benchmarks/{script} {' '.join(extra)}".strip()
            sections.append((title, command, rows_of(data) if data is not None else []))
    out = Path(args.out)
    notes = kept_notes(out)
    partial = out.with_name(f".{out.name}.partial")
    partial.write_text(render(sections, commit, date, args.quick, notes))
    os.replace(partial, out)
    kept = f", keeping {len(notes.splitlines())} lines of notes below the marker" if notes else ""
    print(f"wrote {out}{kept}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

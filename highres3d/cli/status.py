"""``highres3d status PATH...``: where each run stands: iteration, best Dice, training now (where) or how it ended.

PATH is a run folder or any folder above run folders (``training.output_dir``,
an experiment folder): every run under it is listed.  For the runs of a job
array it answers "which are still training, on which node, and which stopped
and need ``--resume``" without reading the scheduler's logs.
"""
from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "status", help="where each run under a folder stands: iteration, best Dice, training now (where) or ended",
        description=__doc__,
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="a run folder, or a folder with run folders under it")
    parser.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from highres3d.errors import Highres3dError
    from highres3d.training.run import RunFolder, find_runs

    problems, lines = [], []
    for root in map(Path, args.paths):
        if not root.is_dir():
            problems.append(f"{root}: no such folder")
            continue
        runs = find_runs(root)
        if not runs:
            problems.append(f"{root}: no run folder (with state.json) here or below")
        for path in runs:
            try:
                status = RunFolder(path).status()
            except Highres3dError as err:
                problems.append(str(err))
                continue
            name = str(path.relative_to(root)) if path != root else str(path)
            of = f"/{status.max_iter}" if status.max_iter is not None else ""
            best = (f"best Dice {status.best_score:.4f} at {status.best_iteration}"
                    if status.best_score is not None else "no validation yet")
            where = ""
            if status.last_session is not None and not status.training_now:
                session = status.last_session
                job = session.get("scheduler", {}).get("SLURM_JOB_ID")
                where = f"; last on {session.get('host', '?')}" + (f" (job {job})" if job else "")
            lines.append(f"{name}: iteration {status.iteration}{of}, {best}; {status.describe()}{where}")
    print("\n".join(lines))
    if problems:
        raise Highres3dError(f"{len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))
    return 0

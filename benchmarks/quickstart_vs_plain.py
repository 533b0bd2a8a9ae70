"""The quick start against the plain CompressAI loop, given the same minutes side by side, scored on
the test photos (which no setting was chosen on).

Both trainings start together, one torch thread each, so a busy machine slows them alike; the
quick start gets `trainer.max_time` (its schedule follows the time it has), the plain loop the
same wall-clock budget. Then `evaluate.py` codes the test photos with each codec (and
JPEG, WebP, AVIF on the same photos) and prints the tables; the last lines say how many steps
each made and how loaded the machine was.

    python benchmarks/quickstart_vs_plain.py [--minutes 15] [--out logs/bench/quickstart_vs_plain]
        [--data test_photos] [-- extra train.py overrides]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load() -> str:
    """The machine's load averages (1, 5, 15 minutes), for the record."""
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def hms(minutes: float) -> str:
    """Lightning's "DD:HH:MM:SS" for a number of minutes."""
    seconds = round(60 * minutes)
    return f"00:{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--out", default="logs/bench/quickstart_vs_plain")
    parser.add_argument("--data", default="test_photos", help="evaluate.py's data preset")
    parser.add_argument("overrides", nargs="*", help="extra train.py overrides")
    args = parser.parse_args()
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    print(f"load before: {load()}")
    quick_log, plain_log = open(out / "quickstart.log", "w"), open(out / "plain.log", "w")
    quick = subprocess.Popen(
        [
            sys.executable,
            "train.py",
            "experiment=quickstart",
            f"trainer.max_time={hms(args.minutes)}",
            f"hydra.run.dir={out / 'quickstart'}",
            "callbacks.progress_bar=null",
            *args.overrides,
        ],
        cwd=REPO,
        env=env,
        stdout=quick_log,
        stderr=subprocess.STDOUT,
    )
    plain = subprocess.Popen(
        [
            sys.executable,
            "benchmarks/plain_loop.py",
            f"--minutes={args.minutes}",
            "--threads=1",
            f"--out={out / 'plain.codec'}",
        ],
        cwd=REPO,
        env=env,
        stdout=plain_log,
        stderr=subprocess.STDOUT,
    )
    if quick.wait() or plain.wait():
        sys.exit(f"a training failed: see {out}/quickstart.log and {out}/plain.log")
    print(f"load after training: {load()}")
    # One evaluation each (the two are the same architecture: together they would form one
    # curve); the baselines are coded once and cached.
    codecs = {"quickstart": out / "quickstart" / "checkpoints" / "last.ckpt"}
    codecs["plain"] = out / "plain.codec"
    for name, ckpt in codecs.items():
        subprocess.run(
            [
                sys.executable,
                "evaluate.py",
                f"ckpt={ckpt}",
                f"data={args.data}",
                f"hydra.run.dir={out / f'evaluate-{name}'}",
            ],
            cwd=REPO,
            check=True,
        )
    trained = re.search(r"Trained: +(.*)", (out / "quickstart.log").read_text())
    print(f"quick start: {trained.group(1) if trained else 'see quickstart.log'}")
    print((out / "plain.log").read_text().strip().splitlines()[-1])
    print(f"load at the end: {load()}")


if __name__ == "__main__":
    main()

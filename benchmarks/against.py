"""Time to ready of this tree against another commit, measured side by side.

    python benchmarks/against.py 98dc6da            # 7 rounds, 2 workers
    python benchmarks/against.py HEAD~3 --rounds 9 --workers 3
    python benchmarks/against.py 98dc6da --this HEAD   # two commits, not the work tree

Each round starts a ``LocalVMCluster`` (TLS, each VM enrolling its own key) from this
tree and one from the other commit, alternating which goes first, each in a fresh
interpreter, and times it from the constructor until every worker has joined. The
other commit is checked out into a temporary ``git worktree`` that is removed after.
The figure is the ratio of the medians: a change's cost in time to ready, on the same
machine under the same load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: Run in a fresh interpreter whose first import path is the tree under test.
_ONE_START = """
import asyncio, sys, time
sys.path.insert(0, sys.argv[1])
from distributed import Client
import dask_secure_cloud
assert dask_secure_cloud.__file__.startswith(sys.argv[1]), dask_secure_cloud.__file__
from dask_secure_cloud import LocalVMCluster

async def main(n):
    started = time.perf_counter()
    async with LocalVMCluster(n_workers=n, asynchronous=True) as cluster:
        async with Client(cluster, asynchronous=True) as client:
            await client.wait_for_workers(n, timeout=120)
            elapsed = time.perf_counter() - started
            assert await client.submit(sum, [1, 2]) == 3
    print(elapsed)

asyncio.run(main(int(sys.argv[2])))
"""


def time_to_ready(tree: Path, workers: int) -> float:
    done = subprocess.run(
        [sys.executable, "-c", _ONE_START, str(tree), str(workers)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tempfile.gettempdir(),  # not this tree: only sys.argv[1] is imported
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"a cluster from {tree} failed:\n{done.stderr[-3000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("commit", help="the commit to compare this tree with")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--this", help="a commit to measure instead of the work tree")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    this_name = args.this or "this tree"
    with tempfile.TemporaryDirectory() as scratch:
        made: list[Path] = []

        def checkout(commit: str, name: str) -> Path:
            tree = Path(scratch) / name
            git = ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q"]
            subprocess.run([*git, str(tree), commit], check=True)
            made.append(tree)
            return tree

        try:
            other = checkout(args.commit, "other")
            this = checkout(args.this, "this") if args.this else ROOT
            here: list[float] = []
            there: list[float] = []
            for i in range(args.rounds):
                pair = [(this, here), (other, there)]
                for tree, times in pair if i % 2 == 0 else reversed(pair):
                    times.append(time_to_ready(tree, args.workers))
        finally:
            for tree in made:
                git = ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)]
                subprocess.run(git, check=False)
    a, b = statistics.median(here), statistics.median(there)
    print(
        f"time to ready, 1 scheduler + {args.workers} workers, median of {args.rounds}: "
        f"{args.commit} {b:.2f} s; {this_name} {a:.2f} s; ratio {a / b:.2f}"
    )
    print(f"  {this_name}: {' '.join(f'{t:.2f}' for t in here)}")
    print(f"  {args.commit}: {' '.join(f'{t:.2f}' for t in there)}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    main()

"""A/B of the LESA head's training step between this tree and another revision, on one machine.

    rm -rf /tmp/base && mkdir /tmp/base && git archive REV | tar -x -C /tmp/base
    python3 benchmarks/head_ab.py --baseline /tmp/base [--batches 4 32 256] [--rounds 3] [--json F]

Each round times, in a fresh process per tree, benchmarks/gpu_bench.py's eager head step (7,186
labels, all four losses, the optimizer) at each batch size, baseline first, then this tree, so
drift between rounds hits both alike. Prints steps/s per tree and the ratio this / baseline per
round. The baseline tree must have benchmarks/gpu_bench.py with head_training.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
PROBE = """
import json, sys, torch
sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".")
import gpu_bench
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
rates = {}
for batch in %r:
    rate = gpu_bench.head_training(device, batch, 7186, %d, False)
    rates[batch] = rate[0] if isinstance(rate, tuple) else rate
print(json.dumps(rates))
"""


def steps_per_s(tree: Path, batches, iters: int) -> dict[int, float]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE % (list(batches), iters)], cwd=tree, check=True, capture_output=True, text=True
    ).stdout
    return {int(k): v for k, v in json.loads(out.strip().splitlines()[-1]).items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", required=True, type=Path, help="an exported tree of the other revision")
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 32, 256])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if not (args.baseline / "benchmarks" / "gpu_bench.py").is_file():
        parser.error(f"{args.baseline}: no benchmarks/gpu_bench.py there; export a revision with git archive")
    rounds = []
    for r in range(args.rounds):
        base = steps_per_s(args.baseline, args.batches, args.iters)
        this = steps_per_s(HERE, args.batches, args.iters)
        rounds.append({"baseline": base, "this": this})
        print(
            f"round {r + 1}: "
            + "; ".join(
                f"batch {b}: {base[b]:.1f} -> {this[b]:.1f} steps/s ({this[b] / base[b]:.2f}x)" for b in args.batches
            ),
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rounds, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

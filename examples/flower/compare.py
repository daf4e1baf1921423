"""Compare the global adapters of two run directories (e.g. a Flower run and a `hetlora simulate` run).

    python compare.py runs/flower_hetlora runs/sim_sequential
"""

import argparse
import sys

from hetlora.fl.checkpoint import load_checkpoint


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_a")
    p.add_argument("run_b")
    p.add_argument("--atol", type=float, default=1e-5, help="largest difference counted as equal")
    args = p.parse_args()
    cks = [load_checkpoint(d, restore_rng=False) for d in (args.run_a, args.run_b)]
    for d, ck in zip((args.run_a, args.run_b), cks):
        if ck is None:
            print(f"{d}: no checkpoint", file=sys.stderr)
            return 2
    (ra, a, ranks_a, _), (rb, b, ranks_b, _) = cks
    ta = a.A + a.B + [a.head_W, a.head_b]
    tb = b.A + b.B + [b.head_W, b.head_b]
    if ra != rb or [t.shape for t in ta] != [t.shape for t in tb]:
        print(f"different rounds ({ra} vs {rb}) or adapter shapes")
        return 1
    diff = max(float((x.double() - y.double()).abs().max()) for x, y in zip(ta, tb))
    ranks_equal = list(ranks_a) == list(ranks_b)
    same = diff <= args.atol and ranks_equal
    print(f"after round {ra}: max |a - b| = {diff:.2e}, client ranks {'equal' if ranks_equal else 'differ'}"
          f" -> {'same global adapter' if same else 'DIFFERENT'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

"""How large is each cell's output h at initialisation? (Why the seed form starts so slowly.)

The seed cell outputs h = tanh(c ⊙ o) with no sigmoid on o: at initialisation both c and the raw pre-activation o are
small, so h is their product, and its multiplicative input m = a ⊙ b is itself a product of two small affine maps.
This script feeds the same random bytes through a freshly initialised layer of every form and prints the RMS of h and
c over a segment, with the default config (orthogonal init, 64-dim embedding as in the CPU convergence study). The
logic: `mlstm.studies.init_scale`.

    python scripts/init_scale.py [--hidden 406,446,500] [--seeds 3] [--out FILE.md]
"""

from __future__ import annotations

import argparse

from mlstm.cli import publish
from mlstm.studies import init_scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", default="406,446,500")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--embedding", type=int, default=64)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    publish(init_scale.report(args.hidden, args.seeds, args.embedding), args.out)


if __name__ == "__main__":
    main()

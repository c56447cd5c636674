"""The size ladder on one GPU and the paper presets' step times: the Python half of `scripts/gpu_study.sh`.

    python scripts/gpu_study.py --data DATA_DIR --out OUT --work WORK [--dry-run] [--jobs N] [--deadline-s S]

The study itself (grids, selection, fresh seeds, the worker pool, the deadline) is `mlstm.studies.gpu_study`.
"""

import sys

from mlstm.studies.gpu_study import main

if __name__ == "__main__":
    sys.exit(main())

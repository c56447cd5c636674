"""What `scripts/bench.py` does with its flags: a preset and the flags that override it -> settings and rows ->
the timed table (markdown on stdout, JSON and markdown files rewritten after every row). The timing itself:
`mlstm.bench.steps`."""

from __future__ import annotations

import json
import sys

from mlstm.atomic import write_atomic
from mlstm.bench import steps as bench
from mlstm.errors import UserError


def run(args) -> int:
    """Run the benchmark described by scripts/bench.py's parsed arguments; the exit status (1 if a row failed)."""
    preset = bench.PRESETS.get(args.preset, {})
    pick = lambda flag, key, default: flag if flag is not None else preset.get(key, default)  # noqa: E731
    if args.iters < 1 or args.warmup < 0:
        raise UserError("--iters must be >= 1 and --warmup >= 0")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be a positive integer, got {args.threads}")
    if args.optim is not None:
        from mlstm.config import check_group_choices

        check_group_choices([f"optim={args.optim}"])
    settings = bench.Settings(
        device=bench.resolve_device(pick(args.device, "device", "auto")),
        dtype=pick(args.dtype, "dtype", "fp32"),
        threads=pick(args.threads, "threads", None),
        iters=args.iters,
        warmup=args.warmup,
        tf32=args.tf32,
        optim=args.optim,
        init=pick(args.init, "init", None),
    )
    if args.iters < 20:
        print(f"note: --iters {args.iters} < 20: fine for a smoke test, not for reported numbers", file=sys.stderr)
    groups = bench.groups_for(
        args.preset,
        cells=args.cells,
        hidden=args.hidden,
        batch=args.batch,
        seq_len=args.seq_len,
        embedding=args.embedding,
        vocab=args.vocab,
    )
    rows = bench.plan(
        [row for g in groups for row in g.rows()],
        baselines=not args.no_baselines,
        multiple=bench.baseline_multiple(settings.device),
    )

    def save(table: list[dict]) -> None:
        if args.json:
            write_atomic(args.json, json.dumps(table, indent=1) + "\n")
        if args.markdown:
            write_atomic(args.markdown, bench.markdown(table))

    table = bench.run(rows, settings, on_result=save)
    print(bench.markdown(table), end="")
    return 1 if any(r["error"] for r in table) else 0

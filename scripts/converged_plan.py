"""The next step of one cell in the converged study, from its tuning runs so far (mlstm.studies.converged.next_step).

    python scripts/converged_plan.py --runs results/convergence/converged/runs --dataset enwik8_sample --preset lstm_1m

Prints one line: `resume RATE[,RATE...]` (a grid run is unfinished, or a rate lacks a tuning seed: run those rates'
tuning sweep again), `extend RATE` (the choice sits at the grid's edge: run that rate on the tuning seeds),
`final RATE` (the choice lies strictly inside: run the fresh seeds there) or `none`.
"""

import argparse

from mlstm.cli import exit_on_user_error
from mlstm.studies.converged import next_step
from mlstm.studies.runs import load_runs


@exit_on_user_error
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", required=True, help="the study's tuning runs (results/convergence/converged/runs)")
    parser.add_argument("--dataset", required=True, help="the dataset config of the sweep, e.g. enwik8_sample")
    parser.add_argument("--preset", required=True, help="the variant preset, e.g. mlstm_paper_1m")
    args = parser.parse_args(argv)
    step, rates = next_step(load_runs([args.runs]), args.dataset, args.preset)
    print(" ".join([step, ",".join(f"{rate:g}" for rate in rates)]).rstrip())


if __name__ == "__main__":
    main()

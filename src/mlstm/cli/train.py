"""`make train ARGS=...` / `python -m mlstm.cli.train key=value ...` (also under torchrun for DDP)."""

import hydra
from omegaconf import DictConfig

from mlstm.cli import CONFIG_DIR, exit_on_user_error, hydra_entry
from mlstm.distributed import secondary_rank_overrides
from mlstm.trainer import train


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
@exit_on_user_error  # inside Hydra too, so a bad job in a multirun says one line
def task(cfg: DictConfig) -> float:
    result = train(cfg)
    # the return value is what Hydra's sweepers optimise: the tuning rule's score (mlstm.tuning.run_score), the mean
    # validation bpc over the last quarter of the budget, +inf for a diverged run
    return result.get("score", float("nan"))


# under torchrun, ranks > 0 write no .hydra/ files and no job log (rank 0's run directory is the run's)
main = hydra_entry(task, secondary_rank_overrides())

if __name__ == "__main__":
    main()

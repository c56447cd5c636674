"""`make params ARGS="experiment=..."`: the parameter count of any config, without training or downloading data.

The model is built on PyTorch's meta device (shapes only, no memory, no initialisation). The vocabulary size comes
from the dataset config (`vocab_size`: 205 for enwik8, 27 for text8); for a local file it is read from the file.
The last line printed is `parameters: N`.
"""

import hydra
from omegaconf import DictConfig

from mlstm.cli import CONFIG_DIR, NO_OUTPUT_DIR, exit_on_user_error, hydra_entry
from mlstm.model import count_parameters


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
@exit_on_user_error
def task(cfg: DictConfig) -> None:
    count = count_parameters(cfg)
    print(
        f"cell: {cfg.cell.name}{'/' + cfg.cell.form if cfg.cell.get('form') else ''}  "
        f"hidden: {cfg.cell.hidden_size}  layers: {cfg.model.num_layers}  dataset: {cfg.dataset.name}"
    )
    print(f"parameters: {count}")


main = hydra_entry(task, NO_OUTPUT_DIR)

if __name__ == "__main__":
    main()

"""``python -m qat.export ckpt_path=<run>/checkpoints/last.ckpt``: export a checkpoint again.

An entry point, like ``train.py``: the work is in :mod:`qat.lit.reexport` (it rebuilds the model
from the training run's Hydra config, which is the app's business, not the exporters').
"""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

CONFIG_PATH = "../../configs"


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="export_ckpt")
def main(cfg: DictConfig) -> None:
    from qat.lit.reexport import main_cli

    main_cli(cfg)


if __name__ == "__main__":
    os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[2]))
    main()

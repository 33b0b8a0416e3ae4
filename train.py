"""Train (and export) a quantized model: ``python train.py +experiment=resnet_int4``.

All the work is in :func:`qat.lit.train`; see README "Configs" for the groups.
"""

import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

# Relative paths in configs/paths/default.yaml hang off the project root, wherever we run from.
os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))
# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. On a shared or
# oversubscribed CPU (other jobs, DDP processes on one box) spinning threads wait for a core
# that is busy elsewhere: a ResNet-20 step went from 0.45 s to 2-3 s on a 2-core machine with
# one core taken. On cores of its own a run trains faster with spinning threads (each parallel
# op then skips a wake-up; docs/benchmarks.md): set OMP_WAIT_POLICY=ACTIVE to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from qat.lit.config import ConfigError
from qat.lit.divergence import DivergenceError
from qat.lit.errors import disk_full
from qat.lit.train import train
from qat.quant.quantizer import NonFiniteError


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | dict | None:
    try:
        return train(cfg)
    except ConfigError as err:
        # A config mistake: one clear line, not a traceback.
        logging.getLogger("qat").error("invalid config: %s", err)
        sys.exit(2)
    except (DivergenceError, NonFiniteError) as err:
        # Training went wrong in a way the message explains (and says how to go on from the
        # last checkpoint): one line too.
        logging.getLogger("qat").error("training stopped: %s", err)
        sys.exit(3)
    except Exception as err:  # a full disk, whatever wrapped the OSError; the rest re-raised
        full = disk_full(err)
        if full is None:
            raise
        # Every file the run writes is written beside its destination and renamed into place,
        # so what was on disk before (the last checkpoint, an export) is whole.
        run_dir = Path(cfg.paths.output_dir)
        then = (
            f"re-export with python -m qat.export ckpt_path={run_dir / 'checkpoints/last.ckpt'}"
            if (run_dir / "results.json").is_file()
            else f"resume with hydra.run.dir={run_dir} ckpt_path=last"
        )
        logging.getLogger("qat").error(
            "training stopped: %s; the files already written are intact (checkpoints/last.ckpt "
            "is the last whole checkpoint): free some space, then %s",
            full,
            then,
        )
        sys.exit(3)


if __name__ == "__main__":
    main()

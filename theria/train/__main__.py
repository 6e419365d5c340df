"""`python -m theria.train [overrides]`: Hydra's entry point around the plain `train(cfg)`."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from theria.config import register_configs
from theria.distributed import print0
from theria.train import CONF_DIR
from theria.train.build import ConfigError
from theria.train.loop import NonFiniteLossError, train
from theria.train.rundir import set_run_id

register_configs()
set_run_id()  # before Hydra resolves hydra.run.dir / hydra.sweep.dir (conf/config.yaml)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    try:
        results = train(cfg)
    except (ConfigError, NonFiniteLossError) as e:
        print(f"[theria.train] error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    test = results["test"]["query_loss_post"]
    print0(  # every rank of a dist=ddp job returns the results; rank 0 reports them
        f"[theria.train] meta-test query loss {test['mean']:.4g} ± {test['ci95']:.2g} "
        f"(95% CI, {test['n']} tasks)\n"
        f"  results:     {results['run_dir']}/results.json\n"
        f"  tensorboard: tensorboard --logdir {results['tensorboard'] or '(disabled)'}\n"
        f"  checkpoint:  {results['checkpoint']}"
    )
    return test["mean"]  # for sweepers that optimize


if __name__ == "__main__":
    main()

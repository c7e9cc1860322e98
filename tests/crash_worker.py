"""Training process that dies (os._exit) right after the asynchronous save of step ``die_at``
was started, i.e. while orbax writes it in the background (used by tests/test_train.py).
argv: die_at overrides..."""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
os.environ["JAX_PLATFORMS"] = "cpu"


def main():
    from tfm_jax.checkpoint import Checkpointer
    from tfm_jax.config import load_config
    from tfm_jax.train import train

    die_at = int(sys.argv[1])
    save = Checkpointer.save

    def save_then_die(self, step, state):
        save(self, step, state)
        if step == die_at:
            os._exit(17)

    Checkpointer.save = save_then_die
    train(load_config(None, sys.argv[2:]))


if __name__ == "__main__":
    main()

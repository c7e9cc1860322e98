"""Training process that dies (os._exit) right after the asynchronous save of step ``die_at``
was started, i.e. while orbax writes it in the background (used by tests/unit/train/test_train.py).
argv: die_at overrides..."""

import os
import sys

# The same XLA CPU set-up as the test process (8 fake devices, the run on the first): a resume
# continues on the machine and set-up it stopped on, and the native kernels' OpenBLAS results can
# differ in the last bit between XLA thread-pool configurations.
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"


def main():
    from tfm_jax.train.checkpoint import Checkpointer
    from tfm_jax.config import load_config
    from tfm_jax.train import train

    die_at = int(sys.argv[1])
    save = Checkpointer.save

    def save_then_die(self, step, state):
        save(self, step, state)
        if step == die_at:
            os._exit(17)

    Checkpointer.save = save_then_die
    import jax
    train(load_config(None, sys.argv[2:]), devices=jax.devices()[:1])


if __name__ == "__main__":
    main()

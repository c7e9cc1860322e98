"""One process of a 2-process `jax.distributed` training run on localhost (used by
tests/integration/test_multiprocess.py). argv: port process_id run_dir corpus_path cache_dir overrides..."""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402


def main():
    port, pid, run_dir, corpus, cache = sys.argv[1:6]
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=int(pid))
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    from tfm_jax.config import load_config
    from tfm_jax.train import train

    cfg = load_config(None, sys.argv[6:] + [f"run.dir={run_dir}", f"data.path={corpus}",
                                            f"data.cache_dir={cache}"])
    res = train(cfg)
    print(f"process {pid} done: step {res.final_step} loss {res.last_loss:.6f}", flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()

"""``python -m tfm_jax ...`` == ``tfm-jax ...``."""

import sys

from tfm_jax.core import interrupts

interrupts.install()        # first: a Ctrl-C while the CLI is still importing exits cleanly too
interrupts.note("while starting, nothing saved")

from tfm_jax.cli import main  # noqa: E402

sys.exit(main())

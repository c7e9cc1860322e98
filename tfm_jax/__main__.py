"""``python -m tfm_jax ...`` == ``tfm-jax ...``."""

import sys

from tfm_jax.cli import main

sys.exit(main())

"""User-fixable errors the command line turns into exit code 2 with one message.

Kept in a module without heavy imports so the CLI can name them without importing numpy, jax or
orbax (``tfm-jax config show`` stays light). ``ConfigError`` lives in :mod:`tfm_jax.config`.
"""


class DataError(ValueError):
    """A user-fixable data problem (bad path, encoding, too little data); the message says what to do."""


class CheckpointMismatch(ValueError):
    """The checkpoint's tree does not match the configured model/optimizer."""


class CheckpointDamaged(ValueError):
    """A checkpoint step folder that cannot be read (a truncated or corrupt file); the message
    names the step folder and the cause."""

"""The errors genlab raises for problems with what the user gave it.

Every ``GenlabError`` reaches the user of the ``genlab`` command as one line,
``genlab: error: <message>`` with exit status 2 and no traceback (``GENLAB_DEBUG=1`` shows it).
Messages name the flag as typed (``--train.batch-size``) or the file, and say what is wrong.
"""

from __future__ import annotations


class GenlabError(Exception):
    """A known problem with the user's input: a flag, a config, a file or a run folder."""


class ConfigError(GenlabError, ValueError):
    """A config file or override is invalid (unknown key, wrong type, out of range, missing file)."""


class FileFormatError(GenlabError, ValueError):
    """A file exists but cannot be read as what it should be (truncated, empty, foreign, not JSON)."""


class RunFolderError(GenlabError):
    """A run folder cannot be used as asked (it holds a run, it has nothing to resume, ...)."""


class CheckpointMismatchError(FileFormatError):
    """Weights on disk and the model built from its config disagree (the message names every key)."""

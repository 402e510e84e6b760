"""Error types whose message is shown to the user as one line, with exit code 2.

Raise these for bad input (config, data files, checkpoints, launch environment); the CLI
turns them into ``cafedist: error: <message>`` and exit status 2. Messages must name the
file or field at fault and say what was expected.
"""


class CafeError(Exception):
    """Base class: a user-facing error (bad input), reported without a traceback."""

    exit_code = 2


class ConfigError(CafeError):
    """A config field is unknown, has the wrong type, or an impossible value."""


class DataError(CafeError):
    """A dataset folder or HDF5 store is missing, malformed, or of another schema version."""


class CheckpointError(CafeError):
    """A checkpoint cannot be used (corrupt, other config, unreadable)."""


class RunDirError(CheckpointError):
    """A run directory holds a run this one may not continue: ``problem`` says what it holds,
    ``advice`` what a ``train`` command can do about it (compare, which has no ``--resume``,
    gives its own)."""

    def __init__(self, problem: str, advice: str = ""):
        super().__init__(f"{problem}; {advice}" if advice else problem)
        self.problem, self.advice = problem, advice


class DistError(CafeError):
    """The distributed launch environment is inconsistent, or a collective failed/timed out."""


class TrainingDiverged(CafeError):
    """Parameters or losses became non-finite or astronomically large (e.g. too high a lr)."""

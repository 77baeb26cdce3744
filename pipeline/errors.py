"""The one exception type users see: a message that names the problem and the fix."""


class PipelineError(Exception):
    """Bad input or a failed stage, explained in plain words (no traceback needed)."""

"""The one root of every error a user can cause (a bad recipe, data file, cluster file, flag).

Each entry point (the CLI, the worker) catches `UserError` once, prints its message as one line
and exits with `UserError.exit_code`; anything else is a bug and shows its traceback.
Standard library only: both sides import it.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix; the message names the file/line/key/node and the fix."""

    # 2: bad input. A subclass whose fix is on the machines rather than in the input uses 1
    # (SshSetupError, SandboxError, StageError); TrainingDiverged uses 4. README "Exit codes".
    exit_code = 2

"""Mistakes a user can fix end in one sentence that says what to do, not a traceback."""

import os
import sys
import urllib.error


class UserError(Exception):
    """A mistake the user can fix: printed as one sentence, without a traceback."""

    exit_code = 2


class Interrupted(UserError):
    exit_code = 130  # the shell's code for a program ended by Ctrl-C


def run_command(main_function):
    """Runs a script's main(); a mistake the user can fix ends in one sentence."""
    try:
        main_function()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)


def keras_download_cache():
    """Where `keras.utils.get_file` keeps (and first looks for) its downloads."""
    keras_home = os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))
    return os.path.join(keras_home, "datasets")


def is_download_error(error):
    """`keras.utils.get_file` reports a failed download as a plain Exception, raised
    while it handled urllib's URLError (an HTTPError is one)."""
    return isinstance(error, urllib.error.URLError) or isinstance(
        error.__context__, urllib.error.URLError
    )

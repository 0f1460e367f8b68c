"""The harness behind scripts/run, scripts/test and scripts/bench (Python 3.11, standard library).

The commands are tiny: Python puts `scripts/` first on the import path of a script there, so they
import `lib.…` directly. Library code raises `HarnessError` for anything the user can act on;
each command's `main()` (through `lib.cli.entry`) prints it and exits non-zero.
"""

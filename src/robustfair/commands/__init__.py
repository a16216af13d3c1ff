"""Sub-commands of the ``robustfair`` command line. Each module here defines ``command`` (a click
command or group), which the command line adds under its own name."""

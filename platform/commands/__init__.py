"""The `stageflow` command and its subcommands (validate, run, resume, status, report, submit,
ui): the top layer; nothing imports it."""

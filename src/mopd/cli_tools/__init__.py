"""What the `mopd` commands for the daily loop do (validate, schema, recipes, init, eval), apart from the CLI.

`mopd.cli` only registers commands and turns errors into one line and exit status 2; the work is here, as plain
functions a test or a notebook can call. This layer sits between `cli` and `recipe` (pyproject's import-linter
contract).
"""

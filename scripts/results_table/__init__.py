"""The pieces of ``scripts/results.py``, one concept a module.

- ``rows``: the table's models and rows, their configs and run directories;
- ``running``: the float run and the multirun over the rows per model, and ``--reexport``;
- ``carry``: the saved table and float weights, for rows carried over from earlier runs;
- ``collect``: the figures of every row, from the runs or carried over;
- ``machine``: the machine the page names;
- ``cells``, ``goals``, ``render``, ``plots``: the page (``docs/results.md``) and its plots;
- ``wandb_log``: the table as a W&B run.
"""

"""How a run happens: the training and evaluation drivers (``training``, ``evaluation``), the task registry
(``tasks``), the run directory (``rundir``), Hydra's additions (``hydra_setup``), callbacks, loggers and the console.
Nothing is re-exported: import each name from its module. See docs/architecture.md."""

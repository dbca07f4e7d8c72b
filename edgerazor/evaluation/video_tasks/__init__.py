"""lmms-eval task configs for local video benchmarks (Video-MME and MLVU layouts) and the functions they name.

The YAML files are lmms-eval task configs; ``edgerazor.evaluation.video`` fills in where the rows and clips
are (``--data-dir``) before lmms-eval builds the tasks, so no task ever reaches the hub.
"""

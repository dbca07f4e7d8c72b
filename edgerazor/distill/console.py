"""The Trainer's log lines as numbers: ``step 3/10 | loss 4.213 | ... | lr 9.00e-04 | lafd 1:1 2:0.5``.

transformers prints each log dict with every float turned into a quoted string
(``{'loss': '4.213', ...}``); these callbacks replace its progress bar's and printer's log output
with one readable line per logging step, and leave ``state.log_history`` untouched (numbers).
"""

from __future__ import annotations

import numbers
import re

from transformers.trainer_callback import PrinterCallback, ProgressCallback

_LAFD_LAYER = re.compile(r"^lafd_layer_(\d+)$")
_SKIP = {"total_flos", "lafd_layers"}  # lafd_layers repeats the per-layer frequencies shown as "lafd"


def _number(key: str, value) -> str:
    if hasattr(value, "item"):  # a 0-d tensor or numpy scalar
        value = value.item()
    if isinstance(value, bool) or isinstance(value, numbers.Integral):
        return str(value)
    if isinstance(value, numbers.Real):
        if key == "learning_rate":
            return f"{value:.2e}"
        if key == "epoch":
            return f"{value:.2f}"
        return f"{value:.4g}"
    return str(value)


def format_log_line(logs: dict, step: int | None = None, max_steps: int | None = None) -> str:
    """One line: the step, then every logged value as a number with a precision that fits it."""
    parts = [f"step {step}/{max_steps}" if max_steps else f"step {step}"] if step is not None else []
    layers = []
    for key, value in logs.items():
        match = _LAFD_LAYER.match(key)
        if match:
            layers.append(f"{match.group(1)}:{_number(key, value)}")
        elif key not in _SKIP:
            parts.append(f"{'lr' if key == 'learning_rate' else key} {_number(key, value)}")
    if layers:
        parts.append("lafd " + " ".join(layers))  # layer: fraction of steps LAFD chose it
    return " | ".join(parts)


class LogLineProgressCallback(ProgressCallback):
    """The Trainer's progress bar, with each log written above it as one ``format_log_line``."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            self.training_bar.write(format_log_line(logs, state.global_step, state.max_steps))


class LogLinePrinterCallback(PrinterCallback):
    """``disable_tqdm``: the log lines alone, printed."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_local_process_zero and logs:
            print(format_log_line(logs, state.global_step, state.max_steps))


def use_log_lines(trainer) -> None:
    """Swap the Trainer's default progress bar or printer for the ones above (a notebook's bar is kept)."""
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(LogLineProgressCallback)
    elif trainer.pop_callback(PrinterCallback) is not None:
        trainer.add_callback(LogLinePrinterCallback)

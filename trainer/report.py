"""Where training reports itself: a live progress line on the terminal, and the trackers users look at.

`log.jsonl` and `loss.png` in the run folder are always written (trainer/train.py). Beside them,
`--report-to` sends the same scalars (loss, lr, grad norm, samples/s, validation loss overall and per
t level) and the sample grids to

- `tensorboard`: event files in RUN/tensorboard/ (`tensorboard --logdir RUN/tensorboard`); needs the
  `tensorboard` package (`pip install flowcurate[report]`).
- `wandb`: a Weights & Biases run in RUN/wandb/. Without WANDB_API_KEY or WANDB_MODE in the
  environment the run is offline (no account needed; `wandb sync RUN/wandb/offline-run-*` uploads it
  later); with them, wandb's own settings apply.

Only rank 0 reports. The progress line (tqdm on stderr) shows step, steps/s, samples/s and an ETA from
values the loop already has on the host: it never reads a tensor, so it adds no device sync per step.

    reporter = Reporter(run_folder, ("tensorboard",), config_dict)
    reporter.scalars(step, {"loss": 0.41, "lr": 1e-4})
    reporter.image(step, "samples", pil_image)
    reporter.close()
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from flowcurate.formats.config import ConfigError

REPORT_TARGETS = ("tensorboard", "wandb", "none")


class ReportError(ConfigError):
    """A tracker that was asked for is unknown or cannot be used (its package is not installed)."""


def parse_report_to(values: list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """--report-to values (repeatable, or comma-separated) -> the trackers, "none" dropped."""
    names = [n.strip() for v in values or () for n in v.split(",") if n.strip()]
    unknown = sorted(set(names) - set(REPORT_TARGETS))
    if unknown:
        raise ReportError(f"--report-to {', '.join(unknown)}: choose from {', '.join(REPORT_TARGETS)}")
    targets = tuple(dict.fromkeys(n for n in names if n != "none"))
    for name in targets:  # before the run folder is touched
        if importlib.util.find_spec(name) is None:
            raise ReportError(f"--report-to {name} needs the {name} package: pip install 'flowcurate[report]' "
                              f"(or pip install {name})")
    return targets


class Reporter:
    """The trackers named in `targets`, opened in `folder`; a no-op when there are none."""

    def __init__(self, folder: Path, targets: tuple[str, ...], config: dict | None = None):
        self.targets = targets
        self._tb = self._wandb = None
        if "tensorboard" in targets:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ReportError("--report-to tensorboard needs the tensorboard package: "
                                  "pip install 'flowcurate[report]' (or pip install tensorboard)") from e
            self._tb = SummaryWriter(log_dir=str(Path(folder) / "tensorboard"))
        if "wandb" in targets:
            try:
                import wandb
            except ImportError as e:
                raise ReportError("--report-to wandb needs the wandb package: "
                                  "pip install 'flowcurate[report]' (or pip install wandb)") from e
            offline = not (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE"))
            self._wandb = wandb.init(dir=str(folder), project=os.environ.get("WANDB_PROJECT", "flowcurate"),
                                     name=Path(folder).name, config=config or {},
                                     mode="offline" if offline else None)

    def scalars(self, step: int, values: dict) -> None:
        """Numbers under their names; a list (e.g. validation loss per t level) becomes name/0, name/1..."""
        flat = {}
        for name, v in values.items():
            if isinstance(v, (list, tuple)):
                flat.update({f"{name}/{i}": float(x) for i, x in enumerate(v)})
            elif v is not None:
                flat[name] = float(v)
        if self._tb is not None:
            for name, v in flat.items():
                self._tb.add_scalar(name, v, step)
        if self._wandb is not None:
            self._wandb.log(flat, step=step)

    def image(self, step: int, tag: str, image) -> None:
        """A PIL image (a sample grid)."""
        if self._tb is not None:
            import numpy as np

            self._tb.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")
        if self._wandb is not None:
            import wandb

            self._wandb.log({tag: wandb.Image(image)}, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def progress_bar(start: int, total: int, enabled: bool = True):
    """A tqdm bar over training steps on stderr: step/total, steps/s and an ETA (the loop adds samples/s
    and the loss at each log interval). Redrawn each second on a terminal, every 10 s into a log file."""
    import sys

    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, disable=not enabled, desc="train",
                smoothing=0.1, mininterval=1.0 if sys.stderr.isatty() else 10.0)

"""The run's scalar log: ``metrics.jsonl`` (always) and TensorBoard, plus the rich summaries (trajectory grids,
histograms, the eval table).  The I/O edge of :mod:`r3_rl.tracking`; the scalars themselves are computed by the
pure functions of :mod:`r3_rl.tracking.metrics`."""
from __future__ import annotations

import json
import math
import numbers
from pathlib import Path
from typing import Any

from r3_rl.tracking.metrics import eval_metrics
from r3_rl.trajectory import Tree


def _append_whole_lines(path: Path) -> Any:
    """``path`` open for appending, a last line cut off mid-write (a killed run) removed first: the next row would
    otherwise be glued onto it, a line no reader can parse in the middle of the file."""
    if path.exists():
        with open(path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)
    return open(path, "a")


class MetricsLogger:
    """Writes scalars to ``metrics.jsonl`` (always) and TensorBoard (``log.tensorboard``), plus rich summaries.

    Non-finite values are kept in the JSONL (as ``NaN``, which Python's json reads back) but not sent to
    TensorBoard, whose charts break on them.
    """

    def __init__(self, run_dir: Path, tensorboard: bool = True, slots: int | None = None) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir = run_dir
        self.slots = slots  # image cells per trajectory grid (rounds + 1): every grid at the same scale
        self.jsonl = _append_whole_lines(run_dir / "metrics.jsonl")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            tb_dir = run_dir / "tb"
            fresh = not any(tb_dir.glob("events.out.tfevents.*"))
            # a run's first writer marks its start (a SessionLog START at step 0): TensorBoard's Python loader
            # (``--load_fast=false``) takes the first START of a run as its beginning and purges only on a later
            # one, so without it the purge a rewind writes was ignored there and replayed steps were drawn twice
            self.tb = SummaryWriter(log_dir=str(tb_dir), purge_step=0 if fresh else None)

    def rewind(self, step: int, keep_evals: bool = True) -> None:
        """Forget what was logged after the checkpoint at ``step``: a resumed run replays those steps.

        ``metrics.jsonl`` keeps lines with ``step < step`` and the evals logged at ``step`` (before the
        checkpoint was written; training line ``step`` is replayed), so no step appears twice.  TensorBoard
        gets ``purge_step=step`` (it hides every older event at or past ``step``), and the kept evals at
        ``step`` are logged again after the purge.  ``keep_evals=False``: the evals at ``step`` came after the
        checkpoint (the final one's "after" eval, which a resumed finished run runs again), so they go too.
        """
        path = self.run_dir / "metrics.jsonl"
        self.jsonl.close()
        kept, evals = [], []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
                at = int(row["step"])
            except (ValueError, KeyError, TypeError):
                continue  # a run killed mid-write leaves a partial last line
            is_eval = any(k.startswith(("eval/", "eval_tag/", "0_eval/")) for k in row)  # 0_eval/synergy too
            if at < step or (at == step and is_eval and keep_evals):
                kept.append(line)
                if at == step:
                    evals.append(row)
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept))
        tmp.replace(path)
        self.jsonl = open(path, "a")
        if self.tb is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb.close()
            self.tb = SummaryWriter(log_dir=str(self.run_dir / "tb"), purge_step=step)
            for row in evals:
                for k, v in row.items():
                    if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                        self.tb.add_scalar(k, v, step)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        # any real number: numpy scalars (np.float32, np.int64) too, which a reward's or a plug-in's figures often
        # are; bools become 0/1.  Anything else (text, lists) is not a scalar.
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, numbers.Real)}
        self.jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in clean.items():
                if math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def log_trajectories(self, trees: list[Tree], step: int, prefix: str = "trajectories", limit: int = 4) -> None:
        """A few full trajectories as framed image grids + markdown text (full R3 chains first, longest first),
        and reward/advantage histograms of the step's sampled nodes."""
        if self.tb is None:
            return
        from r3_rl.tracking.tensorboard import add_histograms, add_trajectories

        add_trajectories(self.tb, trees, step, prefix=prefix, limit=limit, slots=self.slots)
        if prefix == "trajectories":
            add_histograms(self.tb, trees, step)
        self.tb.flush()

    def log_eval(self, report: dict[str, Any], step: int, trees: list[Tree] | None = None, name: str = "eval") -> None:
        """Eval scalars, the per-round table as text and (when given) a few eval trajectories."""
        self.log(eval_metrics(report), step)
        self.log_eval_summaries(report, step, trees, name)

    def log_eval_summaries(self, report: dict[str, Any], step: int, trees: list[Tree] | None = None,
                           name: str = "eval") -> None:
        """An eval's table and trajectory grids, without its scalars: what a rewind logs again from the eval's
        files after TensorBoard's purge hid them (:meth:`rewind` re-logs the scalars itself)."""
        if self.tb is None:
            return
        from r3_rl.eval.evaluate import markdown_table

        self.tb.add_text("eval/table", f"**{name}**\n\n" + markdown_table(report), step)
        if trees:
            self.log_trajectories(trees, step, prefix="eval_trajectories")
        self.tb.flush()

    def close(self) -> None:
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()

"""Train once in a fresh process and print the metrics as JSON (used by the fault tests).

python -m tests.train_once TASK HYPERPARAMETERS_JSON DATA_DIR CACHE_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from worker.training import TrainingContext, run_training

if __name__ == "__main__":
    task, hp, data_dir, cache_dir = sys.argv[1:5]
    ctx = TrainingContext(data_dir=Path(data_dir), cache_dir=Path(cache_dir), show_progress_bar=False)
    print(json.dumps([m.model_dump() for m in run_training(task, json.loads(hp), ctx).metrics]))

"""What every entry point does around its body: parse the stage's flags, set up tracking, and turn the
errors a user can fix into one line and a non-zero exit."""
from __future__ import annotations

import sys
from typing import Callable


def run_entrypoint(stage: str, body: Callable, argv: list[str] | None = None) -> None:
    from grpo.config import ConfigError, parse_args
    from grpo.data import DataError
    from grpo.finetune import NumericsError
    from grpo.model import ModelError
    from grpo.tracking import TrackingError
    from grpo.trainer_process import TrainerProcessError

    cfg = parse_args(stage, argv)
    try:
        from grpo import tracking

        tracking.setup()
        body(cfg)
    except (ConfigError, DataError, ModelError, NumericsError, TrackingError, TrainerProcessError) as e:
        sys.exit(f"grpo {stage}: error: {e}")
    except KeyboardInterrupt:
        sys.exit(f"grpo {stage}: interrupted; rerun with the same run id to resume")

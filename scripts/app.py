"""Chat with a saved model in the browser and watch it work (Gradio, served on 127.0.0.1).

    python scripts/app.py --model runs/quickstart/sft/model

Needs the optional extra: pip install -e ".[app]". Everything lives in training/app.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(REPO_ROOT))

from training.app import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())

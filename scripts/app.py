"""Chat with a saved model in the browser and watch it work (Gradio, served on 127.0.0.1).

    python scripts/app.py --model runs/quickstart/sft/model

Needs the optional extra: pip install -e ".[app]". Everything lives in apps/web.py.
"""

from __future__ import annotations

from apps.web import main

if __name__ == "__main__":
    raise SystemExit(main())

"""The model card template, shipped as package data so installed (non-editable) copies find it."""

from pathlib import Path

TEMPLATE_PATH = Path(__file__).resolve().parent / "minigpt_card_template.md"

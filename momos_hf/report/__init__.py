"""What a MoMos model costs and holds: description length, compressors, BDM (`complexity`); model cards (`card`)."""

from .card import is_generated_card, render_card
from .complexity import ComplexityReport, complexity_report

__all__ = ["ComplexityReport", "complexity_report", "is_generated_card", "render_card"]

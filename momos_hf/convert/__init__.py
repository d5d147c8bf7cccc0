"""Converting a model: targets, calibration (input moments, block by block), the `Converter`, resumable blocks."""

from .converter import ConversionOptions, Converter

__all__ = ["ConversionOptions", "Converter"]

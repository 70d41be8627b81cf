"""Datasets read from files or built in, never downloaded: the corrupted digits the demo and the study train on."""
from .digits import CORRUPTIONS, DigitsSplit, DigitsTask, corrupted_digits

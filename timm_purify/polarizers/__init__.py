"""Polarizer modules: small trainable layers inserted into a frozen model.

Each kind lives in its own file and registers itself under a name with
:func:`register_polarizer`; :func:`build_polarizer` builds one by that name.
"""

from __future__ import annotations

from . import cnpd  # noqa: F401 - registers the class-conditional kinds
from ._base import POLARIZERS, Polarizer, build_polarizer, register_polarizer
from .npd import NeuralPolarizer

__all__ = ["POLARIZERS", "Polarizer", "NeuralPolarizer", "build_polarizer", "register_polarizer"]

"""Multiplicative LSTM (Krause et al., 2016) against LSTM on character-level language modelling."""

__version__ = "0.1.0"

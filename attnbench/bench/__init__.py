"""Measurement: timers, memory meters, FLOP counting, sweeps and the results table."""

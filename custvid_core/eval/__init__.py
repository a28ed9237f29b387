"""Measurements on generated clips."""

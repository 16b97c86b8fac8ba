"""Helpers shared by the test suites (unit, integration, acceptance, faults)."""

"""Helpers shared by the tests (not tests): subprocess runs, tiny runs, texts, a local Hub."""

"""Fakes shared by the tests: one place, so a test seam is never a method of a production class."""

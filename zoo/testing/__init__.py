"""Helpers for testing zoo without the internet (see ``zoo.testing.hub_server``)."""

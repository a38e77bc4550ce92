"""Orchestration of the published methods on top of arch -> scores -> plan -> surgery -> train -> export."""

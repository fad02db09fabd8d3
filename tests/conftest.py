"""Shared fixtures: a fake clock here; real servers come from the fixture modules imported below."""

from __future__ import annotations

"""Fixtures shared by the whole suite; each fixtures module belongs to the package it exercises."""

from tests.fixtures.production import *  # noqa: F403
from tests.fixtures.serving import *  # noqa: F403
from tests.fixtures.training import *  # noqa: F403

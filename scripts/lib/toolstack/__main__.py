"""python3 -m lib.toolstack (from scripts/): run the guest or the verdict self-test under xl."""

from ..cli import entry
from . import main

entry(main)

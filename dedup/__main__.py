"""`python -m dedup`: the standalone SSCD dedup command (flowcurate dedup), issue #3."""

import sys

print("python -m dedup: not yet available in this version (the standalone SSCD dedup command (flowcurate dedup), issue #3).", file=sys.stderr)
sys.exit(2)

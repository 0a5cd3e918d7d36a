"""`python -m pipeline`: the Beam curation pipeline (flowcurate run), issue #5."""

import sys

print("python -m pipeline: not yet available in this version (the Beam curation pipeline (flowcurate run), issue #5).", file=sys.stderr)
sys.exit(2)

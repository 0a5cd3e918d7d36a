"""`python -m trainer`: the MM-DiT trainer (flowcurate train / sample), issue #4."""

import sys

print("python -m trainer: not yet available in this version (the MM-DiT trainer (flowcurate train / sample), issue #4).", file=sys.stderr)
sys.exit(2)

import sys
from pathlib import Path

# Lets test modules import the shared `cases` module.
sys.path.insert(0, str(Path(__file__).parent))
